"""Prediction rows written as CSV or JSON Lines, with the same fields and values as ``Prediction`` (and the HTTP
answers): name, label, probability, score, p_value, decision (``in`` / ``out``), error."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import TextIO

from oodforge.deploy.guard import Prediction
from oodforge.util.errors import ConfigError

FORMATS = ("csv", "jsonl")
FIELDS = tuple(f.name for f in fields(Prediction))


@dataclass
class Tally:
    """What a prediction run saw: images, those flagged OOD, those that could not be read."""

    images: int = 0
    flagged: int = 0
    failed: int = 0

    def add(self, prediction: Prediction) -> None:
        """Count one prediction."""
        self.images += 1
        self.flagged += prediction.decision == "out"
        self.failed += prediction.error is not None

    def summary(self) -> str:
        """One line: ``N images, K flagged OOD (x%), E unreadable``."""
        read = self.images - self.failed
        share = 100.0 * self.flagged / read if read else 0.0
        return f"{self.images} images, {self.flagged} flagged OOD ({share:.1f}%), {self.failed} unreadable"


def check_format(format: str) -> str:
    """``format`` when it is csv or jsonl, else one ``ConfigError`` naming ``--format``."""
    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    return format


def write_rows(predictions: Iterable[Prediction], stream: TextIO, format: str, tally: Tally | None = None
               ) -> Iterator[Prediction]:
    """Write each prediction to ``stream`` as it comes (counting it in ``tally``) and pass it on."""
    check_format(format)
    writer = csv.DictWriter(stream, fieldnames=FIELDS, lineterminator="\n") if format == "csv" else None
    if writer is not None:
        writer.writeheader()
    for prediction in predictions:
        row = prediction.as_dict()
        if writer is not None:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            stream.write(json.dumps(row) + "\n")
        if tally is not None:
            tally.add(prediction)
        yield prediction
