"""ReAct (Sun et al. 2021): clip penultimate activations at a training percentile, then energy."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("react")
class ReAct(Detector):
    """Score = logsumexp(head(min(h, c))), c = the ``percentile``-th percentile of all training activations.

    The percentile is over every entry of the training feature matrix, with linear interpolation
    (as ``numpy.percentile``). Needs ``fit(train, model)``: the model's ``.head`` maps the clipped
    features back to logits and is run in eval mode.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"percentile": [80.0, 85.0, 90.0, 95.0, 99.0]}

    def __init__(self, percentile: float = 90.0) -> None:
        self.percentile = percentile

    def _check(self) -> None:
        if not 0.0 <= self.percentile <= 100.0:
            raise ConfigError(f"react: percentile must be in [0, 100], got {self.percentile}")

    def supports(self, model) -> bool:
        """Any module head maps clipped features to logits."""
        return getattr(model, "head", None) is not None

    def _fit(self, train: ModelOutputs) -> None:
        if getattr(self.model_, "head", None) is None:
            raise ConfigError("react needs the classifier: call fit(train, model) with a model that has .head")
        self._check()
        if train.features.numel() == 0:
            raise ConfigError("react needs non-empty training features")
        self.threshold_ = percentile(train.features.detach(), self.percentile)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        head = self.model_.head
        parameter = next(head.parameters(), None)
        features = outputs.features.detach()
        if parameter is not None:
            features = features.to(parameter.device, parameter.dtype)
        was_training = head.training
        head.eval()
        try:
            with torch.no_grad():
                logits = head(features.clamp(max=self.threshold_))
        finally:
            head.train(was_training)
        return energy_score(logits.float()).to(outputs.features.device)


def percentile(values: Tensor, q: float) -> float:
    """The ``q``-th percentile (0..100) of all entries, linearly interpolated like ``numpy.percentile``.

    Unlike ``torch.quantile`` it has no input size limit (which 50,000 x 512 features exceed).
    """
    flat = values.reshape(-1).double()
    position = q / 100.0 * (len(flat) - 1)
    lower = int(position)
    upper = min(lower + 1, len(flat) - 1)
    low = torch.kthvalue(flat, lower + 1).values
    high = torch.kthvalue(flat, upper + 1).values if upper != lower else low
    return (low + (position - lower) * (high - low)).item()
