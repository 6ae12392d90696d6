"""The ``oodforge`` command line: demo, train, score, bench, report, generate, datasets."""

from __future__ import annotations

import functools
import inspect
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from oodforge.util.errors import ConfigError, OodforgeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train, synthesize, score and benchmark OOD detectors for image classifiers.")
console = Console(stderr=True)

DEFAULT_DETECTORS = "msp,maxlogit,energy,odin"
PRECISION_HELP = ("auto (bf16-mixed autocast where the CPU or GPU runs bf16 natively, else 32-true), 32-true or "
                  "bf16-mixed.")


def _fail_cleanly(command: Callable) -> Callable:
    """Print oodforge's errors (``OodforgeError``) and the system's (``OSError``: a disk, a permission) as one
    ``error:`` line with exit code 2; anything else is a bug and keeps its traceback. ``--debug`` (or
    ``OODFORGE_DEBUG=1``) shows the traceback of every error. oodforge's warnings are one ``warning:`` line each."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warnings(warnings.showwarning)
                return command(*args, **kwargs)
        except (OodforgeError, OSError) as exc:
            if os.environ.get("OODFORGE_DEBUG", "") not in ("", "0"):
                raise
            message = str(exc)
            if message.startswith("Caught "):  # raised in a DataLoader worker: keep the original message
                message = message.strip().splitlines()[-1].split(": ", 1)[-1]
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (or set "
                                                                 "OODFORGE_DEBUG=1).")) -> None:
    """Train, synthesize, score and benchmark OOD detectors for image classifiers."""
    if debug:
        os.environ["OODFORGE_DEBUG"] = "1"


PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # the oodforge package


def _one_line_warnings(show: Callable) -> Callable:
    """A ``warnings.showwarning`` that prints warnings raised from oodforge as ``warning: <message>``."""

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and str(Path(filename).resolve()).startswith(PACKAGE_DIR):
            console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


def _options(pairs: list[str] | None, what: str) -> dict:
    """``["key=value", ...]`` -> dict with YAML-parsed values (``parse_options``)."""
    from oodforge.util.validation import parse_options

    return parse_options(pairs or [], what)


def _int_list(text: str, flag: str) -> list[int]:
    """``"0,2"`` -> ``[0, 2]``; anything else is refused naming the flag."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must be comma-separated integers, e.g. 0,2") from None


def _evaluate_and_save(model, benchmark, detectors: str, out: Path, train_info: dict, checkpoint: str | None,
                       batch_size: int, quiet: bool, cache: bool, method: str | None = None,
                       detector_dir: Path | None = None, train_subset: int | None = None,
                       tune: bool = False, precision: str = "auto", outliers: str | None = None) -> dict:
    """``score_and_save``, with what it did printed: reused detectors, failed detectors, the table, the files."""
    from oodforge.evaluation.cache import OutputCache
    from oodforge.evaluation.specs import load_fitted_detectors, parse_detector_spec
    from oodforge.runs.payload import print_results
    from oodforge.runs.pipeline import score_and_save

    spec = parse_detector_spec(detectors)
    fitted = load_fitted_detectors(detector_dir, spec) if detector_dir else {}
    if fitted:
        console.print(f"reusing fitted detectors from {escape(str(detector_dir))}: {escape(', '.join(fitted))}")
    results = score_and_save(model, benchmark, spec, out, method=method, train=train_info, checkpoint=checkpoint,
                             cache=OutputCache(enabled=cache), batch_size=batch_size, quiet=quiet, fitted=fitted,
                             train_subset=train_subset, tune=tune, precision=precision, outliers=outliers)
    for info in results.failed.values():
        console.print(f"[yellow]warning:[/yellow] {escape(info['error'])}", highlight=False, soft_wrap=True)
    print_results(results.payload, Console())
    console.print(f"wrote {out / 'results.json'}, {out / 'scores.npz'}, {out / 'report.html'}")
    return results.payload


@app.command()
@_fail_cleanly
def demo(out: Path = typer.Option(Path("runs/demo"), help="Output folder."),
         epochs: int = typer.Option(4, help="Training epochs of the small CNN."),
         detectors: str = typer.Option("all", help="Comma-separated detectors, or 'all'."),
         precision: str = typer.Option("auto", help=PRECISION_HELP),
         quiet: bool = typer.Option(False, "--quiet", help="No progress bars.")) -> None:
    """Train the small CNN on Fashion-MNIST, then score every detector on every OOD set."""
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.training.config import MODEL_CHECKPOINT, TrainConfig
    from oodforge.training.loop import train as run_training
    from oodforge.util.precision import check_precision
    from oodforge.util.validation import check_output_folder

    check_output_folder(out, "--out")
    check_precision(precision)
    bench, skipped = get_benchmark("fashion_mnist").without_missing_ood()  # a missing OOD set: warn, go on
    for message in skipped:
        console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    config = TrainConfig(benchmark="fashion_mnist", epochs=epochs, lr=0.05, precision=precision)
    model = run_training(config, out, resume=True, quiet=quiet)
    _evaluate_and_save(model, bench, detectors, out,
                       {**asdict(config), "history": model.history}, str(out / MODEL_CHECKPOINT), 500, quiet, True,
                       precision=precision)


def train(**options) -> None:
    """Train a classifier (any backbone, head, loss, data mix), then score it on its benchmark."""
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.evaluation.specs import parse_detector_spec
    from oodforge.training.config import MODEL_CHECKPOINT, TrainConfig, with_recipe_detectors
    from oodforge.training.distributed import train_everywhere
    from oodforge.util.validation import check_output_folder

    out, detectors, resume, quiet = (options.pop(name) for name in ("out", "detectors", "resume", "quiet"))
    check_output_folder(out, "--out")
    config = TrainConfig(**_recipe(options)).validate()
    detectors = with_recipe_detectors(detectors, config)
    parse_detector_spec(detectors)  # fail on a bad name or option before training
    bench = get_benchmark(config.benchmark)
    model, scoring = train_everywhere(config, out, bench, resume=resume, quiet=quiet)
    if model is None:
        return  # another DDP process: rank 0 fits the detectors, scores and writes the run folder
    _evaluate_and_save(model, bench, detectors, out, {**asdict(config), "history": model.history},
                       str(out / MODEL_CHECKPOINT), 500, quiet, True, train_subset=config.train_subset,
                       precision=scoring)


def _recipe_options() -> list[inspect.Parameter]:
    """``train``'s options, one per ``TrainConfig`` field (name, type, default and help from the field): a dict
    field ``head_options`` is the repeatable ``--head-option key=value``; ``devices`` is read as text."""
    from oodforge.training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    params = []
    for spec in fields(TrainConfig):
        default = spec.default_factory() if spec.default is MISSING else spec.default
        help_text = spec.metadata.get("help")
        if isinstance(default, dict):
            name, annotation, option = spec.name.removesuffix("s"), list[str] | None, typer.Option(None, help=help_text)
        elif spec.name == "devices":
            name, annotation, option = spec.name, str, typer.Option(str(default), help=help_text)
        else:
            name, annotation, option = spec.name, hints[spec.name], typer.Option(default, help=help_text)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def _recipe(options: dict) -> dict:
    """``train``'s recipe options as ``TrainConfig`` fields (``--head-option k=v`` -> ``head_options``)."""
    recipe = dict(options)
    for name in ("head_option", "loss_option"):
        recipe[name + "s"] = _options(recipe.pop(name), name.replace("_", " "))
    devices = recipe["devices"]
    recipe["devices"] = int(devices) if devices.isdigit() else devices
    return recipe


def _keyword(name: str, annotation: object, option: object) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


train.__signature__ = inspect.Signature([
    _keyword("out", Path, typer.Option(Path("runs/train"), help="Output folder (checkpoints, results).")),
    *_recipe_options(),
    _keyword("detectors", str, typer.Option(DEFAULT_DETECTORS, help="Detectors scored after training, or 'all'.")),
    _keyword("resume", bool, typer.Option(True, help="Continue from OUT/last.ckpt if present.")),
    _keyword("quiet", bool, typer.Option(False, "--quiet")),
])
train = app.command(name="train")(_fail_cleanly(train))


@app.command()
@_fail_cleanly
def score(benchmark: str = typer.Option(..., help="Benchmark: a registered name or a YAML file (see "
                                                      "the YAML benchmarks guide)."),
          model: str = typer.Option(..., help="An oodforge checkpoint; a backbone name with --weights; "
                                             "torchvision:NAME, timm:NAME or module:pkg.mod:factory."),
          weights: Path | None = typer.Option(None, help="Weights (state dict) for --model, e.g. resnet20-*.th."),
          model_head: str | None = typer.Option(None, help="Dotted name of the final linear layer of a "
                                                "torchvision:/timm:/module: network, when not found by itself."),
          detectors: str = typer.Option(DEFAULT_DETECTORS, help="Comma-separated detectors, or 'all'."),
          out: Path = typer.Option(Path("runs/score"), help="Output folder."),
          batch_size: int = typer.Option(500), cache: bool = typer.Option(True, help="Reuse cached outputs."),
          detector_dir: Path | None = typer.Option(None, help="Reload fitted detectors (e.g. the flow) from "
                                                   "this folder, such as an earlier run's OUT/detectors."),
          tune: bool = typer.Option(False, "--tune", help="Also score each detector with parameters chosen on "
                                    "the benchmark's validation data (rows '<detector>[tuned]'); without a "
                                    "val.id set, min(1000, 20%) of the ID training images are held out for it."),
          precision: str = typer.Option("auto", help=PRECISION_HELP),
          quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Score a trained or pretrained classifier with post-hoc detectors on a benchmark."""
    from oodforge.data.benchmarks import get_benchmark
    from oodforge.evaluation.specs import parse_detector_spec
    from oodforge.models.loading import load_model, training_outliers
    from oodforge.util.precision import check_precision
    from oodforge.util.validation import check_output_folder

    check_output_folder(out, "--out")
    check_precision(precision)
    parse_detector_spec(detectors)
    bench = get_benchmark(benchmark)
    classifier, checkpoint = load_model(model, weights, bench, head=model_head)
    if tune:
        bench.check_validation()
    _evaluate_and_save(classifier, bench, detectors, out, {}, checkpoint, batch_size, quiet, cache,
                       detector_dir=detector_dir, tune=tune, precision=precision,
                       outliers=training_outliers(checkpoint) if tune else None)


@app.command()
@_fail_cleanly
def bench(config: Path = typer.Argument(..., help="YAML file: benchmark, detectors, seeds, runs."),
          out: Path = typer.Option(Path("runs/bench"), help="Output folder."),
          runs: str | None = typer.Option(None, help="Comma-separated run names: only these (e.g. one part per "
                                                     "machine; a later full call resumes and combines them)."),
          executor: str = typer.Option("local", help="local (one run x seed after another, here) or ray (each "
                                                     "run x seed a Ray task; needs the ray extra: "
                                                     "pip install oodforge\\[ray])."),
          address: str | None = typer.Option(None, help="With --executor ray: the Ray cluster (auto, "
                                                        "ray://HEAD:10001); default: a local Ray instance."),
          rescore: bool = typer.Option(False, "--rescore", help="Score every run x seed again, even those whose "
                                                                "run folder holds an evaluation of the same model "
                                                                "made the same way."),
          seeds: str | None = typer.Option(None, help="Comma-separated seeds: only these of the config's (e.g. "
                                                      "one seed per machine; a later full call combines them)."),
          quiet: bool = typer.Option(False, "--quiet")) -> None:
    """Train and score several recipes (and seeds) from a config file into one results.json + report."""
    from oodforge.bench.jobs import run_bench
    from oodforge.util.validation import check_output_folder

    check_output_folder(out, "--out")
    run_bench(config, out, quiet=quiet, only=runs.split(",") if runs else None, executor=executor, address=address,
              rescore=rescore, seeds=_int_list(seeds, "--seeds") if seeds else None)


@app.command()
@_fail_cleanly
def report(run_dir: Path = typer.Argument(..., help="Folder with results.json and scores.npz.")) -> None:
    """Write RUN_DIR/report.html: results table, ROC curves, score histograms."""
    from oodforge.runs.report import write_report

    console.print(f"wrote {write_report(run_dir)}")


def _register_generate() -> None:
    from oodforge.cli.generate import generate_app

    for command in generate_app.registered_commands:
        command.callback = _fail_cleanly(command.callback)
    app.add_typer(generate_app, name="generate")


_register_generate()


def _register_guard() -> None:
    from oodforge.cli.guard import guard_app, predict

    for command in guard_app.registered_commands:
        command.callback = _fail_cleanly(command.callback)
    app.add_typer(guard_app, name="guard")
    app.command(name="predict")(_fail_cleanly(predict))


def _register_serve() -> None:
    from oodforge.cli.monitor import monitor
    from oodforge.cli.serve import serve

    app.command(name="serve")(_fail_cleanly(serve))
    app.command(name="monitor")(_fail_cleanly(monitor))


_register_guard()
_register_serve()


@app.command()
def datasets() -> None:
    """List registered datasets and benchmarks, and whether their files are found."""
    from oodforge.data.benchmarks import BENCHMARKS, get_benchmark
    from oodforge.data.datasets import DATASETS, data_root, load_dataset

    out = Console()
    out.print(f"data root: {data_root()} (set OODFORGE_DATA to change)")
    for name in DATASETS.names():
        try:
            found = f"{len(load_dataset(name, 'test'))} test images"
        except Exception as exc:  # report, do not stop
            found = f"[red]{str(exc).splitlines()[0]}[/red]"
        out.print(f"  {name:15s} {found}", highlight=False)
    for name in BENCHMARKS.names():
        b = get_benchmark(name)
        out.print(f"benchmark {name}: ID {b.id_dataset}; OOD " + ", ".join(f"{k} ({v})" for k, v in b.ood.items()))
