"""A model's evaluation kept beside it (``evaluation.json`` + ``evaluation.npz``) and reused when the same
model is scored again the same way: same model (weights and code, ``features.model_fingerprint``), detectors,
tuning, benchmark (its definition and every pixel or file of every set the evaluation reads: test, fit and
validation sets), training outliers, training subset, precision and oodforge version (its source, for a
source checkout).

``oodforge bench`` stores each run x seed's evaluation in its run folder, so a later call of the whole config
(after the parts were run with ``--runs``) re-tunes nothing that is already scored; ``--rescore`` ignores the
stored evaluations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from torch import nn

from oodforge.data.benchmark import Benchmark
from oodforge.evaluation.cache import model_fingerprint
from oodforge.evaluation.result import Evaluation
from oodforge.evaluation.sets import evaluated_sets
from oodforge.runs.folder import finish_pending, scores_digest, write_together
from oodforge.util.code_identity import oodforge_identity

EVALUATION_FORMAT = 2  # raised when the way oodforge scores changes (2: heads run in float32 under bf16)
EVALUATION_JSON = "evaluation.json"
EVALUATION_SCORES = "evaluation.npz"


def evaluation_key(model: nn.Module, benchmark: Benchmark, detectors: str, *, tune: bool, outliers: str | None,
                   train_subset: int | None, precision: str) -> str:
    """A hash of everything an evaluation's numbers depend on (``precision`` already resolved)."""
    sets = {name: images.fingerprint() for name, images in evaluated_sets(benchmark, train_subset=train_subset,
                                                                          tune=tune).items()}
    parts = {"model": model_fingerprint(model), "benchmark": dataclasses.asdict(benchmark), "sets": sets,
             "detectors": detectors, "tune": tune, "outliers": outliers, "train_subset": train_subset,
             "precision": precision, "oodforge": oodforge_identity(), "format": EVALUATION_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def save_evaluation(folder: Path, key: str, evaluation: Evaluation) -> None:
    """Write the evaluation's numbers (not its fitted detectors) under ``key``, both files together."""
    record = {"key": key, "id_accuracy": evaluation.id_accuracy, "results": evaluation.results,
              "diagnostics": evaluation.diagnostics, "timings": evaluation.timings, "tuning": evaluation.tuning,
              "failed": evaluation.failed, "precision": evaluation.precision,
              "detectors": evaluation.detector_records(), "scores_sha256": scores_digest(evaluation.scores)}

    def write_scores(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **evaluation.scores)

    write_together(folder, {EVALUATION_SCORES: write_scores,
                            EVALUATION_JSON: lambda path: path.write_text(json.dumps(record, indent=1) + "\n")})


def load_evaluation(folder: Path, key: str) -> Evaluation | None:
    """The evaluation stored in ``folder`` under ``key``; None when there is none, it was made another way
    (another key) or its files do not belong together. Its timings are those of the scoring that made it."""
    finish_pending(folder)
    try:
        record = json.loads((folder / EVALUATION_JSON).read_text())
        if record.get("key") != key:
            return None
        with np.load(io.BytesIO((folder / EVALUATION_SCORES).read_bytes())) as arrays:
            scores = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, KeyError):
        return None
    if scores_digest(scores) != record.get("scores_sha256"):
        return None
    return Evaluation(record["id_accuracy"], record["results"], scores, record["diagnostics"],
                      record["timings"], tuning=record["tuning"], failed=record["failed"],
                      precision=record["precision"], records=record["detectors"])
