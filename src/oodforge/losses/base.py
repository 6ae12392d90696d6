"""The training-loss API: one ``LossInputs`` in, one scalar out; registered by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from oodforge.util.registry import Registry


@dataclass
class LossInputs:
    """What the training loop hands a loss for one batch."""

    logits: Tensor  # training logits of the ID batch (margin heads apply their margins)
    labels: Tensor  # (B,)
    features: Tensor  # penultimate features of the ID batch
    id_logits: Tensor  # test-time logits of the ID batch (no margin); same as logits for linear heads
    outlier_logits: Tensor | None = None  # test-time logits of the outlier batch, if any
    outlier_features: Tensor | None = None


LOSSES: Registry[nn.Module] = Registry("loss")


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Plain cross-entropy on the ID batch."""

    def forward(self, batch: LossInputs) -> Tensor:
        return F.cross_entropy(batch.logits, batch.labels)


def create_loss(name: str, **kwargs) -> nn.Module:
    """Build the loss registered as ``name``; a loss may own parameters (e.g. class centres)."""
    return LOSSES.create(name, **kwargs)
