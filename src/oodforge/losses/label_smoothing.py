"""Label smoothing (LS) and adaptive label smoothing (ALS) training losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodforge.losses.base import LOSSES, LossInputs
from oodforge.util.errors import ConfigError


def other_classes_mask(index: Tensor, num_classes: int) -> Tensor:
    """Boolean (N, C) mask that is True everywhere except at column ``index[n]`` of row n."""
    if num_classes < 2:
        raise ConfigError(f"label smoothing needs at least 2 classes, got num_classes={num_classes}")
    return ~F.one_hot(index, num_classes).bool()


def smoothed_targets(labels: Tensor, num_classes: int, eps: float) -> Tensor:
    """Target distributions with 1 - eps on the label and eps / (C - 1) on every other class."""
    return torch.where(other_classes_mask(labels, num_classes), eps / (num_classes - 1), 1.0 - eps)


def off_class_spread(probs: Tensor, index: Tensor, eps: float) -> Tensor:
    """Per-row sqrt(1/(C-1) * sum_{i != k} (p_i - pbar)^2 + eps), k = ``index``, pbar = mean over i != k.

    ``eps`` > 0 keeps the gradient finite when all non-k probabilities are equal (zero spread).
    """
    num_others = probs.shape[1] - 1
    others = other_classes_mask(index, probs.shape[1])
    mean = (probs * others).sum(dim=1, keepdim=True) / num_others
    variance = ((probs - mean).square() * others).sum(dim=1) / num_others
    return torch.sqrt(variance + eps)


@LOSSES.register("ls")
class LabelSmoothing(nn.Module):
    """Cross-entropy to a smoothed target: 1 - eps on the label, eps / (C - 1) elsewhere.

    Note the eps / (C - 1) convention: PyTorch's ``label_smoothing`` spreads eps / C over all classes.
    """

    def __init__(self, eps: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= eps < 1.0:
            raise ConfigError(f"ls: eps must be in [0, 1), got eps={eps}")
        self.eps = eps

    def forward(self, batch: LossInputs) -> Tensor:
        log_probs = torch.log_softmax(batch.logits, dim=1)
        targets = smoothed_targets(batch.labels, log_probs.shape[1], self.eps)
        return -(targets * log_probs).sum(dim=1).mean()


@LOSSES.register("als")
class AdaptiveLabelSmoothing(nn.Module):
    """ALS: CE(y, p) + weight * sqrt(1/(C-1) * sum_{i != k} (p_i - pbar)^2 + eps), batch mean.

    k = argmax p (``target="pred"``) or the label (``target="label"``); pbar = mean of the non-k
    probabilities; ``eps`` is a small numerical constant, not a smoothing amount.
    """

    def __init__(self, weight: float = 1.0, target: str = "pred", eps: float = 1e-8) -> None:
        super().__init__()
        if weight < 0:
            raise ConfigError(f"als: weight must be >= 0, got weight={weight}")
        if target not in ("pred", "label"):
            raise ConfigError(f"als: target must be 'pred' or 'label', got target={target!r}")
        if eps <= 0:
            raise ConfigError(f"als: eps must be > 0 for a finite gradient at zero spread, got eps={eps}")
        self.weight = weight
        self.target = target
        self.eps = eps

    def forward(self, batch: LossInputs) -> Tensor:
        probs = torch.softmax(batch.logits, dim=1)
        index = batch.labels if self.target == "label" else probs.argmax(dim=1)
        spread = off_class_spread(probs, index, self.eps)
        return F.cross_entropy(batch.logits, batch.labels) + self.weight * spread.mean()
