"""ASH (Djurisic et al., ICLR 2023): prune each sample's small penultimate activations, reshape the rest, energy."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import CHUNK_ROWS, row_slices
from oodforge.detectors.head import head_logits
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError

VARIANTS = ("p", "b", "s")


@DETECTORS.register("ash")
class ASH(Detector):
    """Score = logsumexp(head(ash(h))): activation shaping of the penultimate features h, then energy.

    Per sample, the K = D - round(D * percentile / 100) largest activations are kept (at least one) and
    the rest set to 0, as ``torch.topk`` does in the official code (github.com/andrijazz/ash, ``ash.py``).
    Variant ``p`` keeps them as they are; ``b`` sets each kept one to s1 / K; ``s`` multiplies them by
    exp(s1 / s2), with s1 the sum of all activations before pruning and s2 the sum after. The official
    code applies ASH to the pooled penultimate activations (after ``avgpool``, before ``fc``) and so
    does this detector, as does OpenOOD's ASHNet (which uses ``ash_b``); ASH placed deeper inside a
    network is not reproduced. Meant for non-negative (post-ReLU) features. Defaults ``s`` at 90 are
    the official configs for CIFAR-10, CIFAR-100 and ImageNet (``config/*.yml``: ``ash_s@90``); the
    percentile grid is OpenOOD v1.5's (``configs/postprocessors/ash.yml``). Needs the classifier's head
    (``fit(train, model)``).
    """

    requires: ClassVar[tuple[str, ...]] = ("features", "head")
    search_space: ClassVar[dict[str, list]] = {"variant": ["p", "b", "s"],
                                               "percentile": [65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0]}

    def __init__(self, variant: str = "s", percentile: float = 90.0) -> None:
        self.variant = variant
        self.percentile = percentile

    def _check(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"ash: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not 0.0 <= self.percentile < 100.0:
            raise ConfigError(f"ash: percentile must be in [0, 100), got {self.percentile}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        classifier(self, "ash")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        model = classifier(self, "ash")
        return shaped_energy(model, outputs.features, lambda h: ash_features(h, self.variant, self.percentile))


def ash_features(features: Tensor, variant: str, percentile: float) -> Tensor:
    """ASH-p/b/s of each row of ``features`` (N, D), float64."""
    x = features.double()
    k = kept_count(x.shape[1], percentile)
    values, index = x.topk(k, dim=1)
    total = x.sum(dim=1)
    kept = (total / k)[:, None].expand_as(values) if variant == "b" else values
    shaped = torch.zeros_like(x).scatter_(1, index, kept)
    if variant == "s":
        shaped *= safe_ratio(total, values.sum(dim=1)).exp()[:, None]
    return shaped


def kept_count(width: int, percentile: float) -> int:
    """How many activations per sample stay: D - round(D * percentile / 100) (numpy's rounding), at least 1."""
    width = int(width)  # a traced shape is a tensor, which round() does not take
    return max(1, width - round(width * percentile / 100.0))


def safe_ratio(total: Tensor, kept: Tensor) -> Tensor:
    """total / kept, and 1 where ``kept`` is 0 (all kept activations zero: the scale then changes nothing)."""
    return torch.where(kept != 0, total / torch.where(kept != 0, kept, torch.ones_like(kept)), torch.ones_like(kept))


def classifier(detector: Detector, name: str) -> nn.Module:
    """The model given to ``fit`` (with a ``.head``), or a ValueError that says how to give it."""
    model = getattr(detector, "model_", None)
    if not isinstance(getattr(model, "head", None), nn.Module):
        raise ConfigError(f"{name} needs the classifier: call fit(train, model) with a model that has .head")
    return model


def shaped_energy(model: nn.Module, features: Tensor, shape: Callable[[Tensor], Tensor]) -> Tensor:
    """logsumexp(model.head(shape(features))) per row, float32, ``CHUNK_ROWS`` rows at a time."""
    features = features.detach()
    if features.ndim != 2:
        raise ConfigError(f"features must be (N, D), got {tuple(features.shape)}")
    parts = [energy_score(head_logits(model, shape(features[rows])).double())
             for rows in row_slices(features.shape[0], features.shape[1], CHUNK_ROWS)]
    return torch.cat(parts).float().to(features.device) if parts else features.new_zeros(0, dtype=torch.float32)
