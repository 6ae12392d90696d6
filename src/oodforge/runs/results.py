"""``OODResults``: the ``Evaluation`` of a run together with its results.json content, as ``evaluate_ood`` and
``score_and_save`` return it; prints as a table (also in notebooks) and writes a run folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from oodforge.evaluation.result import Evaluation
from oodforge.runs.payload import save_run


@dataclass(repr=False)
class OODResults(Evaluation):
    """An ``Evaluation`` plus ``payload``, the results.json it was written as (or would be)."""

    payload: dict = field(default_factory=dict)

    @classmethod
    def of(cls, evaluation: Evaluation, payload: dict) -> OODResults:
        """``evaluation`` with its run's ``payload`` (several methods: their rows and accuracy of the first)."""
        fields = {name: getattr(evaluation, name) for name in evaluation.__dataclass_fields__}
        return cls(**{**fields, "id_accuracy": payload["id_accuracy"], "results": payload["results"]},
                   payload=payload)

    def write(self, out: str | Path) -> Path:
        """Write results.json, scores.npz and report.html into ``out``."""
        save_run(Path(out), self.payload, self.scores)
        return Path(out)
