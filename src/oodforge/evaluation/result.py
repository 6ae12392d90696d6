"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from oodforge.detectors import Detector
from oodforge.evaluation.specs import detector_record


@dataclass
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


def mean_auroc(results: list[dict], detector: str, group: str, method: str | None = None) -> float:
    """Mean AUROC of ``detector`` over the OOD sets of ``group``."""
    values = [r["auroc"] for r in results if r["detector"] == detector and r["group"] == group
              and (method is None or r["method"] == method)]
    return float(np.mean(values)) if values else float("nan")
