"""Assembling, writing and printing one run: results.json + scores.npz + report.html + a table."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from oodforge.data.benchmark import Benchmark
from oodforge.evaluation.result import Evaluation, mean_auroc
from oodforge.runs.folder import scores_digest, write_together
from oodforge.util.errors import ConfigError


def model_summary(model: nn.Module, evaluation: Evaluation, checkpoint: str | None = None) -> dict:
    """The ``model`` block of results.json: config, parameter count, checkpoint, feature diagnostics."""
    describe = getattr(model, "describe", None)
    config = describe() if callable(describe) else {"net": type(model).__name__}
    return {**config, "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint": checkpoint, "diagnostics": evaluation.diagnostics}


def percent(value: float | None) -> str:
    """``0.9123`` -> ``"91.23%"``; None (unlabelled ID test set) -> ``"n/a"``."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


METHOD_KEYS = ("id_accuracy", "model", "train", "timings", "precision", "tuning")  # the fields of method_block


def method_block(model: nn.Module, evaluation: Evaluation, train: dict, checkpoint: str | None) -> dict:
    """One method's fields of results.json (``METHOD_KEYS``; ``tuning`` only when tuned)."""
    block = {"id_accuracy": evaluation.id_accuracy, "model": model_summary(model, evaluation, checkpoint),
             "train": train, "timings": evaluation.timings, "precision": evaluation.precision}
    if evaluation.tuning is not None:
        block["tuning"] = evaluation.tuning
    return block


def run_payload(benchmark: Benchmark, evaluations: dict[str, tuple[nn.Module, Evaluation, dict, str | None]]
                ) -> tuple[dict, dict[str, np.ndarray]]:
    """results.json content and scores for one or several methods (method -> (model, eval, train, ckpt)): the
    first method's block at the top level, and with several methods every block under ``methods``."""
    several = len(evaluations) > 1
    blocks = {method: method_block(*parts) for method, parts in evaluations.items()}
    first_method = next(iter(evaluations))
    payload = {"benchmark": benchmark.name, "id_dataset": benchmark.id_dataset, **blocks[first_method],
               "ood_sets": benchmark.ood, "detectors": evaluations[first_method][1].detector_records(), "results": []}
    failed = {f"{m}/{d}" if several else d: info for m, (_, ev, _, _) in evaluations.items()
              for d, info in ev.failed.items()}
    if failed:
        payload["failed_detectors"] = failed
    scores: dict[str, np.ndarray] = {}
    for _, evaluation, _, _ in evaluations.values():
        payload["results"].extend(evaluation.results)
        scores.update(evaluation.scores)
    if several:
        payload["methods"] = blocks
    return payload, scores


def methods_of(payload: dict) -> dict[str, dict]:
    """method -> its block (``method_block``) of a results.json; one method's results.json (a bench of one run and
    one seed, or ``oodforge score``) keeps its block at the top level instead of in a ``methods`` block."""
    if "methods" in payload:
        return payload["methods"]
    names = list(dict.fromkeys(r["method"] for r in payload.get("results", [])))
    if not names and "id_accuracy" in payload:  # no result row names the method (every detector failed)
        return {}
    if len(names) != 1 or "id_accuracy" not in payload:
        raise ConfigError("not a results.json of oodforge bench or score (no 'methods' block, and not exactly one "
                         f"method in its results: {', '.join(names) or 'none'})")
    return {names[0]: {k: payload[k] for k in METHOD_KEYS if k in payload}}


def save_run(out_dir: Path, payload: dict, scores: dict[str, np.ndarray], report: bool = True,
             extra: dict[str, str] | None = None) -> None:
    """Write results.json, scores.npz, results.md, (by default) report.html and ``extra`` text files
    (name -> content) so that they change together (``oodforge.runs.folder``)."""
    payload = {**payload, "scores_sha256": scores_digest(scores)}
    texts = {"results.json": json.dumps(payload, indent=2) + "\n", "results.md": results_markdown(payload),
             **(extra or {})}
    if report:
        from oodforge.runs.report import report_html

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
    """A table: one row per (method, detector), AUROC per OOD set, mean near/far AUROC and mean FPR95.

    Labels are printed as results.json has them (``knn[k=10]``, ``knn[tuned]``), never read as rich markup.
    """
    console = console or Console()
    results = payload["results"]
    ood_sets = list(payload["ood_sets"])
    methods = list(dict.fromkeys(r["method"] for r in results))
    table = Table(title=escape(f"{payload['benchmark']}: AUROC % (ID accuracy {percent(payload['id_accuracy'])})"))
    for column in (["method"] if len(methods) > 1 else []) + ["detector"] + ood_sets + ["near", "far", "FPR95"]:
        table.add_column(escape(column), justify="left" if column in ("method", "detector") else "right")
    for method in methods:
        for detector in dict.fromkeys(r["detector"] for r in results if r["method"] == method):
            rows = {r["ood_dataset"]: r for r in results if r["method"] == method and r["detector"] == detector}
            cells = [f"{100 * rows[s]['auroc']:.2f}" for s in ood_sets]
            groups = [mean_auroc(results, detector, g, method) for g in ("near", "far")]
            fpr = np.mean([r["fpr95"] for r in rows.values()])
            table.add_row(*([escape(method)] if len(methods) > 1 else []), escape(detector), *cells,
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
