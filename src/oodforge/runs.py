"""Assembling, writing and printing one run: results.json + scores.npz + report.html + a table."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from torch import nn

from oodforge.data.benchmarks import Benchmark
from oodforge.evaluate import Evaluation, mean_auroc
from oodforge.run_folder import scores_digest, write_together


def model_summary(model: nn.Module, evaluation: Evaluation, checkpoint: str | None = None) -> dict:
    """The ``model`` block of results.json: config, parameter count, checkpoint, feature diagnostics."""
    describe = getattr(model, "describe", None)
    config = describe() if callable(describe) else {"net": type(model).__name__}
    return {**config, "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint": checkpoint, "diagnostics": evaluation.diagnostics}


def percent(value: float | None) -> str:
    """``0.9123`` -> ``"91.23%"``; None (unlabelled ID test set) -> ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def run_payload(benchmark: Benchmark, evaluations: dict[str, tuple[nn.Module, Evaluation, dict, str | None]]
                ) -> tuple[dict, dict[str, np.ndarray]]:
    """results.json content and scores for one or several methods (method -> (model, eval, train, ckpt))."""
    several = len(evaluations) > 1
    first_model, first, first_train, first_ckpt = next(iter(evaluations.values()))
    payload = {"benchmark": benchmark.name, "id_dataset": benchmark.id_dataset, "id_accuracy": first.id_accuracy,
               "model": model_summary(first_model, first, first_ckpt), "train": first_train,
               "ood_sets": benchmark.ood, "detectors": first.detector_records(), "precision": first.precision,
               "results": [], "timings": first.timings}
    if first.tuning is not None:
        payload["tuning"] = first.tuning
    failed = {f"{m}/{d}" if several else d: info for m, (_, ev, _, _) in evaluations.items()
              for d, info in ev.failed.items()}
    if failed:
        payload["failed_detectors"] = failed
    scores: dict[str, np.ndarray] = {}
    for method, (model, evaluation, train, ckpt) in evaluations.items():
        payload["results"].extend(evaluation.results)
        scores.update(evaluation.scores)
        if several:
            payload.setdefault("methods", {})[method] = {
                "id_accuracy": evaluation.id_accuracy, "model": model_summary(model, evaluation, ckpt),
                "train": train, "timings": evaluation.timings, "precision": evaluation.precision,
                **({"tuning": evaluation.tuning} if evaluation.tuning is not None else {})}
    return payload, scores


def save_run(out_dir: Path, payload: dict, scores: dict[str, np.ndarray], report: bool = True,
             extra: dict[str, str] | None = None) -> None:
    """Write results.json, scores.npz, results.md, (by default) report.html and ``extra`` text files
    (name -> content) so that they change together (``oodforge.run_folder``)."""
    payload = {**payload, "scores_sha256": scores_digest(scores)}
    texts = {"results.json": json.dumps(payload, indent=2) + "\n", "results.md": results_markdown(payload),
             **(extra or {})}
    if report:
        from oodforge.report import report_html

        texts["report.html"] = report_html(payload, scores, out_dir)

    def write_scores(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **scores)

    writers = {"scores.npz": write_scores} | {name: functools.partial(_write_text, text=text)
                                             for name, text in texts.items()}
    write_together(out_dir, writers)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def print_results(payload: dict, console: Console | None = None) -> None:
    """A table: one row per (method, detector), AUROC per OOD set, mean near/far AUROC and mean FPR95."""
    console = console or Console()
    results = payload["results"]
    ood_sets = list(payload["ood_sets"])
    methods = list(dict.fromkeys(r["method"] for r in results))
    table = Table(title=f"{payload['benchmark']}: AUROC % (ID accuracy {percent(payload['id_accuracy'])})")
    for column in (["method"] if len(methods) > 1 else []) + ["detector"] + ood_sets + ["near", "far", "FPR95"]:
        table.add_column(column, justify="left" if column in ("method", "detector") else "right")
    for method in methods:
        for detector in dict.fromkeys(r["detector"] for r in results if r["method"] == method):
            rows = {r["ood_dataset"]: r for r in results if r["method"] == method and r["detector"] == detector}
            cells = [f"{100 * rows[s]['auroc']:.2f}" for s in ood_sets]
            groups = [mean_auroc(results, detector, g, method) for g in ("near", "far")]
            fpr = np.mean([r["fpr95"] for r in rows.values()])
            table.add_row(*([method] if len(methods) > 1 else []), detector, *cells,
                          *("-" if np.isnan(g) else f"{100 * g:.2f}" for g in groups), f"{100 * fpr:.2f}")
    console.print(table)


def results_markdown(payload: dict) -> str:
    """Every metric row of a run as a Markdown table (percentages)."""
    several = len({r["method"] for r in payload["results"]}) > 1
    header = (["method"] if several else []) + ["detector", "OOD set", "group", "AUROC", "AUPR-In", "AUPR-Out", "FPR95"]
    lines = [f"ID accuracy: {percent(payload['id_accuracy'])}" if not several else
             "ID accuracy: " + ", ".join(f"{m} {percent(v['id_accuracy'])}" for m, v in payload["methods"].items()),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in payload["results"]:
        cells = ([r["method"]] if several else []) + [r["detector"], r["ood_dataset"], r["group"]]
        cells += [f"{100 * r[k]:.2f}" for k in ("auroc", "aupr_in", "aupr_out", "fpr95")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
