"""Maximum cosine similarity between features and class weights, for models with a cosine head."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.util.errors import ConfigError


@DETECTORS.register("cosine")
class MaxCosine(Detector):
    """max_j cos(theta_j) from the model's cosine head (SphereFace, CosFace, ArcFace, AdaCos).

    Needs the model: ``fit(train, model)``; its head must have a ``cosine(features)`` method.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "head")

    def supports(self, model) -> bool:
        """Only models with a cosine head (SphereFace, CosFace, ArcFace, AdaCos)."""
        return callable(getattr(getattr(model, "head", None), "cosine", None))

    def _fit(self, train: ModelOutputs) -> None:
        if self.model_ is None:
            raise ConfigError("cosine detector needs the model: call fit(train, model)")
        head = getattr(self.model_, "head", None)
        if not callable(getattr(head, "cosine", None)):
            raise ConfigError(
                f"cosine detector needs a cosine head (sphereface, cosface, arcface, adacos); "
                f"the model's head {type(head).__name__} has no cosine method"
            )

    def _score(self, outputs: ModelOutputs) -> Tensor:
        head = self.model_.head
        weight = next(head.parameters(), None)
        features = outputs.features if weight is None else outputs.features.to(weight)
        with torch.no_grad():
            cos = head.cosine(features)
        return cos.float().max(dim=1).values.to(outputs.features.device)
