"""``Evaluation``, what scoring a model gives (``evaluate`` and ``evaluate_ood`` both return one), and the
summaries every table is made of: near/far means and percentages, with one rule for what is missing."""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field

import numpy as np

from oodforge.detectors import Detector
from oodforge.evaluation.specs import detector_record
from oodforge.util.errors import UnknownNameError


@dataclass(repr=False)
class Evaluation:
    """Everything one model's evaluation on a benchmark produced."""

    id_accuracy: float | None
    results: list[dict] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    detectors: dict[str, Detector] = field(default_factory=dict)
    tuning: dict | None = None
    failed: dict[str, dict] = field(default_factory=dict)  # detectors dropped for non-finite scores
    precision: str = "32-true"  # of the network's passes (outputs, detectors and metrics are float32)
    records: dict[str, dict] | None = None  # detector records of a stored evaluation (no fitted detectors kept)

    def detector_records(self) -> dict[str, dict]:
        """{label: name, parameters and needs} of every detector scored, for results.json."""
        if self.records is not None:
            return dict(self.records)
        return {label: detector_record(d) for label, d in self.detectors.items()}

    @property
    def rows(self) -> list[dict]:
        """One dict per (detector, OOD set): auroc, aupr_in, aupr_out, fpr95, group (as in results.json)."""
        return self.results

    def auroc(self, detector: str, ood_dataset: str) -> float:
        """The AUROC of one detector on one OOD set."""
        for row in self.results:
            if row["detector"] == detector and row["ood_dataset"] == ood_dataset:
                return row["auroc"]
        raise UnknownNameError(f"no row for detector {detector!r} on {ood_dataset!r}")

    def summary(self) -> list[dict]:
        """Per (method, detector): AUROC on each OOD set, mean near/far AUROC and mean FPR95 (``summary``)."""
        return summary(self.results)

    def __repr__(self) -> str:
        return text_table(self.results, self.id_accuracy)

    def _repr_html_(self) -> str:
        sets = list(dict.fromkeys(r["ood_dataset"] for r in self.results))
        head = "".join(f"<th>{html.escape(c)}</th>" for c in ["detector", *sets, *GROUPS, "FPR95"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in [
            line["detector"], *(percent(line["auroc"].get(s)) for s in sets), *(percent(line[g]) for g in GROUPS),
            percent(line["fpr95"])]) + "</tr>" for line in self.summary())
        return (f"<p>ID accuracy {percent(self.id_accuracy, sign=True)}; AUROC and FPR95 in %</p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


GROUPS = ("near", "far")


def percent(value: float | None, sign: bool = False) -> str:
    """``0.9123`` -> ``"91.23"`` (``"91.23%"`` with ``sign``); a missing value (None: an unlabelled ID test set;
    NaN: no OOD set in a group) -> ``"-"``. The one rule every table of oodforge follows."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}{'%' if sign else ''}"


def mean_auroc(results: list[dict], detector: str, group: str | None, method: str | None = None) -> float:
    """Mean AUROC of ``detector`` over the OOD sets of ``group`` (None: every set); NaN when there are none."""
    return mean_metric(results, detector, "auroc", group, method)


def mean_metric(results: list[dict], detector: str, metric: str, group: str | None = None,
                method: str | None = None) -> float:
    """Mean ``metric`` of ``detector``'s rows in ``group`` (None: every OOD set); NaN when there are none."""
    values = [r[metric] for r in results if r["detector"] == detector and (group is None or r["group"] == group)
              and (method is None or r["method"] == method)]
    return float(sum(values) / len(values)) if values else float("nan")


def summary(results: list[dict]) -> list[dict]:
    """One line per (method, detector): its AUROC on each OOD set, mean near and far AUROC and mean FPR95 (rates
    in [0, 1]; NaN for a group without sets)."""
    lines = []
    for method in dict.fromkeys(r["method"] for r in results):
        for detector in dict.fromkeys(r["detector"] for r in results if r["method"] == method):
            rows = [r for r in results if r["method"] == method and r["detector"] == detector]
            lines.append({"method": method, "detector": detector, "auroc": {r["ood_dataset"]: r["auroc"] for r in rows},
                          **{g: mean_auroc(rows, detector, g) for g in GROUPS},
                          "fpr95": mean_metric(rows, detector, "fpr95")})
    return lines


def text_table(results: list[dict], id_accuracy: float | None) -> str:
    """``summary`` as plain text: AUROC % per OOD set, near, far and FPR95 %."""
    lines = summary(results)
    sets = list(dict.fromkeys(r["ood_dataset"] for r in results))
    header = ["detector", *sets, *GROUPS, "FPR95"]
    body = [[line["detector"], *(percent(line["auroc"].get(s)) for s in sets), *(percent(line[g]) for g in GROUPS),
             percent(line["fpr95"])] for line in lines]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    buffer = io.StringIO()
    buffer.write(f"ID accuracy {percent(id_accuracy, sign=True)}; AUROC and FPR95 in %\n")
    for row in [header, *body]:
        buffer.write("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip() + "\n")
    return buffer.getvalue().rstrip()
