"""Assembling, writing and printing one run: results.json + scores.npz + report.html + a table."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from oodforge.data.benchmark import Benchmark
from oodforge.evaluation.result import GROUPS, Evaluation, percent, summary
from oodforge.runs.folder import scores_digest, write_together
from oodforge.util.errors import ConfigError


@dataclass
class MethodRun:
    """One method of a run: what results.json says of its model, its evaluation, its training and checkpoint.

    ``model`` holds the model's description and parameter count, not the model, so a run is light to ship
    between processes (a Ray task returns one) and its weights never leave the device they are on.
    """

    model: dict
    evaluation: Evaluation
    train: dict = field(default_factory=dict)
    checkpoint: str | None = None

    @classmethod
    def of(cls, model: nn.Module, evaluation: Evaluation, train: dict | None = None,
           checkpoint: str | None = None) -> MethodRun:
        """The run of ``model``: ``describe()`` (or the class name) and its parameter count."""
        describe = getattr(model, "describe", None)
        config = describe() if callable(describe) else {"net": type(model).__name__}
        return cls({**config, "parameters": sum(p.numel() for p in model.parameters())}, evaluation, train or {},
                   checkpoint)

    def light(self) -> MethodRun:
        """The same run with the detectors' records instead of their fitted state (a kNN bank, a flow)."""
        return replace(self, evaluation=replace(self.evaluation, detectors={},
                                                records=self.evaluation.detector_records()))

    def block(self) -> dict:
        """This method's fields of results.json (``METHOD_KEYS``; ``tuning`` only when tuned)."""
        evaluation = self.evaluation
        block = {"id_accuracy": evaluation.id_accuracy,
                 "model": {**self.model, "checkpoint": self.checkpoint, "diagnostics": evaluation.diagnostics},
                 "train": self.train, "timings": evaluation.timings, "precision": evaluation.precision}
        if evaluation.tuning is not None:
            block["tuning"] = evaluation.tuning
        return block


METHOD_KEYS = ("id_accuracy", "model", "train", "timings", "precision", "tuning")  # the fields of MethodRun.block


def run_payload(benchmark: Benchmark, runs: dict[str, MethodRun]) -> tuple[dict, dict[str, np.ndarray]]:
    """results.json content and scores for one or several methods: the first method's block at the top level,
    and with several methods every block under ``methods``."""
    several = len(runs) > 1
    blocks = {method: run.block() for method, run in runs.items()}
    first = next(iter(runs))
    payload = {"benchmark": benchmark.name, "id_dataset": benchmark.id_dataset, **blocks[first],
               "ood_sets": benchmark.ood, "detectors": runs[first].evaluation.detector_records(), "results": []}
    failed = {f"{m}/{d}" if several else d: info
              for m, run in runs.items() for d, info in run.evaluation.failed.items()}
    if failed:
        payload["failed_detectors"] = failed
    scores: dict[str, np.ndarray] = {}
    for run in runs.values():
        payload["results"].extend(run.evaluation.results)
        scores.update(run.evaluation.scores)
    if several:
        payload["methods"] = blocks
    return payload, scores


def methods_of(payload: dict) -> dict[str, dict]:
    """method -> its block (``MethodRun.block``) of a results.json; one method's results.json (a bench of one run and
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
    several = len({r["method"] for r in results}) > 1
    accuracy = percent(payload["id_accuracy"], sign=True)
    table = Table(title=escape(f"{payload['benchmark']}: AUROC % (ID accuracy {accuracy})"))
    for column in (["method"] if several else []) + ["detector"] + ood_sets + [*GROUPS, "FPR95"]:
        table.add_column(escape(column), justify="left" if column in ("method", "detector") else "right")
    for line in summary(results):
        table.add_row(*([escape(line["method"])] if several else []), escape(line["detector"]),
                      *(percent(line["auroc"].get(s)) for s in ood_sets), *(percent(line[g]) for g in GROUPS),
                      percent(line["fpr95"]))
    console.print(table)


def results_markdown(payload: dict) -> str:
    """Every metric row of a run as a Markdown table (percentages)."""
    several = len({r["method"] for r in payload["results"]}) > 1
    header = (["method"] if several else []) + ["detector", "OOD set", "group", "AUROC", "AUPR-In", "AUPR-Out", "FPR95"]
    accuracies = {m: v["id_accuracy"] for m, v in payload["methods"].items()} if several else {}
    lines = [f"ID accuracy: {percent(payload['id_accuracy'], sign=True)}" if not several else
             "ID accuracy: " + ", ".join(f"{m} {percent(v, sign=True)}" for m, v in accuracies.items()),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in payload["results"]:
        cells = ([r["method"]] if several else []) + [r["detector"], r["ood_dataset"], r["group"]]
        cells += [percent(r[k]) for k in ("auroc", "aupr_in", "aupr_out", "fpr95")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
