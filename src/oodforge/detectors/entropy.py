"""Negative Shannon entropy of the softmax: sum_c p_c log p_c (higher = more confident = more ID)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import CHUNK_ROWS, row_slices


@DETECTORS.register("entropy")
class Entropy(Detector):
    """Score = -H(p) = sum_c p_c log p_c of the softmax p, in [-log C, 0]; 0 for a one-hot posterior.

    The classic predictive-entropy baseline, as in GEN's official benchmark (github.com/XixiLiu95/GEN,
    ``benchmark.py``: ``shannon_entropy``); no options.
    Computed from ``log_softmax`` in float64, so saturated rows give exactly 0 * log 0 = 0.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits",)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        logits = outputs.logits.detach()
        parts = [negative_entropy(logits[rows]) for rows in row_slices(logits.shape[0], logits.shape[1], CHUNK_ROWS)]
        return torch.cat(parts).float() if parts else logits.new_zeros(0, dtype=torch.float32)


def negative_entropy(logits: Tensor) -> Tensor:
    """sum_c p_c log p_c of softmax(logits) per row, float64."""
    log_probs = torch.log_softmax(logits.double(), dim=1)
    return (log_probs.exp() * log_probs).sum(dim=1)
