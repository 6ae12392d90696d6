"""Logit scaling, LTS (Djurisic et al. 2024): energy of the logits times a per-sample factor from the features."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from oodforge.detectors.ash import kept_count, safe_ratio
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("lts")
class LTS(Detector):
    """Score = logsumexp(S(h) * f(x)), S(h) = (s1 / s2)^2, s1 = sum of relu(h), s2 = sum of its K largest entries.

    K = D - round(D * percentile / 100), at least 1, per sample. The features are passed through a ReLU
    before the sums (as the official code does; the paper states the formula on post-ReLU features); the
    logits themselves are the model's, unchanged but for the scale. A row whose K largest activations are
    all zero keeps S = 1. Source: Djurisic et al., "Logit Scaling for Out-of-Distribution Detection"
    (arXiv:2409.01175; code github.com/andrijazz/lts, ``lts()``). Default percentile 95 (pytorch-ood's
    ``LTS(p=0.05)``); the grid spans the percentiles the authors' configs use. No fit.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits", "features")
    search_space: ClassVar[dict[str, list]] = {"percentile": [65.0, 80.0, 90.0, 95.0, 99.0]}

    def __init__(self, percentile: float = 95.0) -> None:
        self.percentile = percentile

    def _check(self) -> None:
        if not 0.0 <= self.percentile < 100.0:
            raise ConfigError(f"lts: percentile must be in [0, 100), got {self.percentile}")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features, logits = outputs.features.detach(), outputs.logits.detach()
        if features.ndim != 2 or logits.ndim != 2 or features.shape[0] != logits.shape[0]:
            raise ConfigError(f"lts: features (N, D) and logits (N, C) must have as many rows, got "
                              f"{tuple(features.shape)} and {tuple(logits.shape)}")
        scale = logit_scale(features, self.percentile)
        return energy_score(logits.double() * scale[:, None]).float()


def logit_scale(features: Tensor, percentile: float) -> Tensor:
    """S(h) = (sum of relu(h) / sum of its K largest entries)^2 per row, float64, shape (N,)."""
    x = features.double().relu()
    top = x.topk(kept_count(x.shape[1], percentile), dim=1).values.sum(dim=1)
    return safe_ratio(x.sum(dim=1), top).square()
