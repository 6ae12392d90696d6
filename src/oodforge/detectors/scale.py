"""SCALE (Xu, Chen, Franchi & Yao, ICLR 2024): scale penultimate activations by exp(s1 / s2), no pruning."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from oodforge.detectors.ash import classifier, kept_count, safe_ratio, shaped_energy
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.util.errors import ConfigError


@DETECTORS.register("scale")
class SCALE(Detector):
    """Score = logsumexp(head(h * exp(s1 / s2))), s1 = sum of h, s2 = sum of its K largest activations.

    K = D - round(D * percentile / 100), at least 1, per sample, as in the official code
    (github.com/kai422/SCALE, ``openood/networks/scale_net.py``: ``scale()``): ASH-S's scale factor
    applied to the unpruned features. Acts on the pooled penultimate features, as the official code
    does. Default percentile 85 and the grid are the official config's
    (``configs/postprocessors/scale.yml``; OpenOOD v1.5 uses the same default). Meant for non-negative
    (post-ReLU) features. Needs the classifier's head (``fit(train, model)``).
    """

    requires: ClassVar[tuple[str, ...]] = ("features", "head")
    search_space: ClassVar[dict[str, list]] = {
        "percentile": [50.0, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 97.0, 99.0]}

    def __init__(self, percentile: float = 85.0) -> None:
        self.percentile = percentile

    def _check(self) -> None:
        if not 0.0 <= self.percentile < 100.0:
            raise ConfigError(f"scale: percentile must be in [0, 100), got {self.percentile}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        classifier(self, "scale")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        model = classifier(self, "scale")
        return shaped_energy(model, outputs.features, lambda h: scale_features(h, self.percentile))


def scale_features(features: Tensor, percentile: float) -> Tensor:
    """h * exp(sum(h) / sum of the K largest entries of h), per row, float64."""
    x = features.double()
    top = x.topk(kept_count(x.shape[1], percentile), dim=1).values.sum(dim=1)
    return x * safe_ratio(x.sum(dim=1), top).exp()[:, None]
