"""``oodforge guard build|export|info`` and ``oodforge predict``: from a benchmark to a deployed decision."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

guard_app = typer.Typer(no_args_is_help=True, help="Build, inspect and export guarded classifiers (a classifier, an "
                                                   "OOD detector and a calibrated threshold with a known "
                                                   "false-alarm rate).")
console = Console(stderr=True)


@guard_app.command()
def build(benchmark: str = typer.Option(..., help="Benchmark: a registered name or a YAML file."),
          model: str = typer.Option(..., help="An oodforge checkpoint; a backbone name with --weights; "
                                             "torchvision:NAME, timm:NAME or module:pkg.mod:factory."),
          weights: Path | None = typer.Option(None, help="Weights (state dict) for --model."),
          model_head: str | None = typer.Option(None, help="Dotted name of the final linear layer of a "
                                                "torchvision:/timm:/module: network, when not found by itself."),
          detector: str = typer.Option("auto", help="A detector (with options, e.g. knn:k=10), or auto: the best "
                                                    "on the benchmark's validation data."),
          alpha: float = typer.Option(0.05, help="Level: at most this share of ID inputs is flagged OOD."),
          calibration: str | None = typer.Option(None, help="Dataset of ID images to calibrate on (default: the "
                                                 "images the model's training held out, or a share of the ID test "
                                                 "split)."),
          class_conditional: bool = typer.Option(False, "--class-conditional", help="Calibrate per predicted class "
                                                 "(a false-alarm bound per class)."),
          out: Path = typer.Option(..., help="Guard folder to write (guard.safetensors)."),
          precision: str = typer.Option("32-true", help="32-true or bf16-mixed (the precision the guard runs at)."),
          batch_size: int = typer.Option(500),
          seed: int = typer.Option(0, help="Seed of the random calibration share of the ID test split."),
          cache: bool = typer.Option(True, help="Reuse cached outputs."),
          quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Build a guard: fit the detector, calibrate its threshold, report the false-alarm rate, save one artifact."""
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.deploy.build import build_guard
    from oodforge.deploy.conformal import check_alpha
    from oodforge.evaluation.cache import OutputCache
    from oodforge.util.validation import check_output_folder

    check_alpha(alpha, "--alpha")
    check_output_folder(out, "--out")
    result = build_guard(get_benchmark(benchmark), model, weights, detector=detector, alpha=alpha,
                         calibration=calibration, class_conditional=class_conditional, head=model_head,
                         precision=precision, batch_size=batch_size, cache=OutputCache(enabled=cache), seed=seed,
                         quiet=quiet)
    path = result.guard.save(out)
    print_build(result.report, Console())
    console.print(f"wrote {path}")


def print_build(report: dict, out: Console) -> None:
    """The build report: detector, threshold, calibration, and the share flagged on each set."""
    calibration = report["calibration"]
    out.print(f"detector {escape(report['detector'])} {escape(str(report['params']))}; alpha {report['alpha']}; "
              f"threshold {report['threshold']:.6g} (flag OOD when the score is below it)", highlight=False)
    how = {"held_out": "held out of the model's training", "given": "given"}.get(calibration["kind"],
                                                                                  calibration.get("rule", ""))
    out.print(f"calibration: {calibration['images']} images ({escape(calibration['source'])}, {escape(how)})",
              highlight=False)
    if "auto" in report:
        out.print(f"chosen on validation data: {escape(report['auto']['chosen'])} "
                  f"(validation AUROC {100 * report['auto']['val_auroc']:.2f})", highlight=False)
    table = Table("set", "images", "flagged at alpha", title="share flagged OOD")
    table.add_row(f"ID test (false alarms, bound {report['alpha']:.2%})", str(report["id_test"]["images"]),
                  f"{report['id_test']['flagged']:.2%}")
    for name, row in report["val_ood"].items():
        table.add_row(f"validation OOD {escape(name)}", str(row["images"]), f"{row['flagged']:.2%}")
    out.print(table)


@guard_app.command()
def export(guard_dir: Path = typer.Argument(..., help="A guard folder (from oodforge guard build)."),
           format: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
           check: bool = typer.Option(True, help="Check the exported file against the guard on a batch.")) -> None:
    """Export the guard as one model file: a preprocessed batch in, logits, score, p-value and decision out."""
    from oodforge.deploy.export import FORMATS, export_guard
    from oodforge.deploy.guard import load_guard
    from oodforge.util.errors import ConfigError

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = export_guard(load_guard(guard_dir), guard_dir, format, check=check)
    console.print(f"wrote {path}")


@guard_app.command()
def info(guard_dir: Path = typer.Argument(..., help="A guard folder.")) -> None:
    """Print what a guard is: model, detector, alpha, threshold, calibration, classes, versions."""
    import json

    from oodforge.deploy.guard import load_guard

    guard = load_guard(guard_dir)
    print(json.dumps({**guard.describe(), "versions": getattr(guard, "versions", {})}, indent=2, default=str))


def predict(guard_dir: Path = typer.Argument(..., help="A guard folder (from oodforge guard build)."),
            paths: list[Path] = typer.Argument(..., help="Image files, folders or archives (.zip, .tar.gz)."),
            format: str = typer.Option("csv", "--format", help="csv or jsonl."),
            output: Path | None = typer.Option(None, help="File to write (default: standard output)."),
            batch_size: int = typer.Option(256),
            fdr: bool = typer.Option(False, "--fdr", help="Flag by Benjamini-Hochberg over all inputs (false "
                                                          "discovery rate alpha) instead of per input."),
            quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Predict class and OOD decision for every image. Exit code 0: all read; 1: some unreadable (rows with error)."""
    from oodforge.deploy.guard import load_guard
    from oodforge.deploy.inputs import check_paths
    from oodforge.deploy.records import Tally, check_format
    from oodforge.util.validation import check_output_file

    check_format(format)
    check_paths(paths)
    if output is not None:
        check_output_file(output, "--output")
    guard = load_guard(guard_dir)
    tally = Tally()
    if output is None:
        _stream(guard, paths, sys.stdout, format, batch_size, fdr, tally, quiet)
    else:
        from oodforge.util.atomic import atomic_write

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as stream:
                _stream(guard, paths, stream, format, batch_size, fdr, tally, quiet)

        atomic_write(output, write)
    console.print(tally.summary() + (f"; wrote {output}" if output else ""), highlight=False)
    if tally.failed:
        raise typer.Exit(1)


def _stream(guard, paths, stream, format: str, batch_size: int, fdr: bool, tally, quiet: bool) -> None:
    from oodforge.deploy.records import write_rows
    from oodforge.util.progress import progress_bar

    with progress_bar(quiet) as bar:
        task = bar.add_task("predict")
        if fdr:
            from oodforge.deploy.inputs import stream_items

            predictions = guard.predict_items(stream_items(paths, guard.preprocessing), batch_size, fdr=True)
        else:
            predictions = guard.predict_stream(paths, batch_size)
        for _ in write_rows(predictions, stream, format, tally):
            bar.advance(task)
