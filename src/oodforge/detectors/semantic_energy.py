"""Semantic-driven energy: energy score plus the max cosine to class centres in feature space.

R(x) = max_c cos(h(x), mu_c); the combined score is -E(x) + beta * R(x) (higher = more ID). The
centres come from the model (``model.class_centres``, attached after training with the ``sde``
loss) when it has them, else they are fitted as class means of L2-normalized training features.
The shared score math lives in ``oodforge.scores`` (losses use it too).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.scores import energy_score, normalized_class_means, representation_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("representation")
class Representation(Detector):
    """Max cosine similarity of h(x) to the class centres, R(x) = max_c cos(h(x), mu_c).

    ``centre_source_`` says where the centres came from: ``"model"`` (``model.class_centres``)
    or ``"class_means"`` (means of normalized training features; classes absent from the
    training labels get no centre).
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train")

    def _fit(self, train: ModelOutputs) -> None:
        model_centres = getattr(self.model_, "class_centres", None) if self.model_ is not None else None
        if model_centres is not None:
            self.centres_ = model_centres.detach().float()
            self.centre_source_ = "model"
        elif train.labels is None:
            raise ConfigError(
                f"{type(self).__name__} needs class centres: the model has no 'class_centres' and "
                "the training outputs have no labels to fit class means from"
            )
        else:
            self.centres_ = normalized_class_means(train.features, train.labels)
            self.centre_source_ = "class_means"
        if self.centres_.ndim != 2 or self.centres_.shape[1] != train.features.shape[1]:
            raise ConfigError(
                f"class centres of shape {tuple(self.centres_.shape)} do not fit features of "
                f"dimension {train.features.shape[1]}"
            )

    def _representation(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.float()
        return representation_score(features, self.centres_.to(features.device))

    def _score(self, outputs: ModelOutputs) -> Tensor:
        return self._representation(outputs)


@DETECTORS.register("semantic_energy")
class SemanticEnergy(Representation):
    """Semantic-driven energy score -E(x) + beta * R(x); ``beta`` and ``temperature`` are options.

    The linear combination with beta = 1.0 is our default; the paper's exact combination could
    not be checked.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {"beta": [0.0, 1.0, 3.0, 10.0, 30.0, 100.0]}

    def __init__(self, beta: float = 1.0, temperature: float = 1.0) -> None:
        self.beta = beta
        self.temperature = temperature

    def _check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"semantic_energy: temperature must be positive, got {self.temperature}")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        energy = energy_score(outputs.logits.float(), self.temperature)
        return energy + self.beta * self._representation(outputs)
