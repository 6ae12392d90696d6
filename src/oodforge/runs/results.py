"""``OODResults``: what ``evaluate_ood`` returns; prints as a table (also in notebooks) and writes a run folder."""

from __future__ import annotations

import html
import io
from pathlib import Path

import numpy as np

from oodforge.runs.payload import print_results, save_run
from oodforge.util.errors import UnknownNameError


class OODResults:
    """The results.json rows of one evaluation, its raw scores and its fitted detectors."""

    def __init__(self, payload: dict, scores: dict[str, np.ndarray], detectors: dict | None = None) -> None:
        self.payload = payload
        self.scores = scores
        self.detectors = detectors or {}

    @property
    def rows(self) -> list[dict]:
        """One dict per (detector, OOD set): auroc, aupr_in, aupr_out, fpr95, group."""
        return self.payload["results"]

    @property
    def id_accuracy(self) -> float | None:
        """Top-1 accuracy on the ID test set (None when it has no labels)."""
        return self.payload["id_accuracy"]

    def auroc(self, detector: str, ood_dataset: str) -> float:
        """The AUROC of one detector on one OOD set."""
        for row in self.rows:
            if row["detector"] == detector and row["ood_dataset"] == ood_dataset:
                return row["auroc"]
        raise UnknownNameError(f"no row for detector {detector!r} on {ood_dataset!r}")

    def summary(self) -> list[dict]:
        """Per detector: AUROC % on each OOD set, mean near/far AUROC % and mean FPR95 %."""
        out = []
        for detector in dict.fromkeys(r["detector"] for r in self.rows):
            rows = [r for r in self.rows if r["detector"] == detector]
            line = {"detector": detector, **{r["ood_dataset"]: 100 * r["auroc"] for r in rows}}
            for group in ("near", "far"):
                values = [r["auroc"] for r in rows if r["group"] == group]
                line[group] = 100 * float(np.mean(values)) if values else float("nan")
            line["fpr95"] = 100 * float(np.mean([r["fpr95"] for r in rows]))
            out.append(line)
        return out

    def write(self, out: str | Path) -> Path:
        """Write results.json, scores.npz and report.html into ``out``."""
        save_run(Path(out), self.payload, self.scores)
        return Path(out)

    def __repr__(self) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        print_results(self.payload, Console(file=buffer, width=160, color_system=None))
        return buffer.getvalue().rstrip()

    def _repr_html_(self) -> str:
        lines = self.summary()
        columns = list(lines[0]) if lines else []
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(line[c]))}</td>" for c in columns) + "</tr>"
                       for line in lines)
        accuracy = "n/a" if self.id_accuracy is None else f"{100 * self.id_accuracy:.2f}%"
        return (f"<p>ID accuracy {accuracy}; AUROC and FPR95 in %</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if np.isnan(value) else f"{value:.2f}"
    return str(value)
