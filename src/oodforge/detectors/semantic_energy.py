"""Semantic-driven energy: energy score plus the max cosine to class centres in feature space.

R(x) = max_c cos(h(x), mu_c); the combined score is -E(x) + beta * R(x) (higher = more ID). The
centres come from the model (``model.class_centres``, attached after training with the ``sde``
loss) when it has them, else they are fitted as class means of L2-normalized training features.
The helpers ``cosine_to_centres`` and ``representation_score`` are shared with
``oodforge.losses.energy``, which imports them from here (losses depend on detectors, never the
reverse, so no import cycle can form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.logits import energy_score


def cosine_to_centres(features: Tensor, centres: Tensor) -> Tensor:
    """Cosine similarity of every feature row to every centre, shape (N, C)."""
    if features.ndim != 2 or centres.ndim != 2:
        raise ValueError(
            f"features and centres must be 2-D, got shapes {tuple(features.shape)} and {tuple(centres.shape)}"
        )
    if features.shape[1] != centres.shape[1]:
        raise ValueError(f"features have dimension {features.shape[1]} but centres have {centres.shape[1]}")
    return F.normalize(features, dim=1) @ F.normalize(centres, dim=1).T


def representation_score(features: Tensor, centres: Tensor) -> Tensor:
    """R(x) = max_c cos(h(x), mu_c), shape (N,)."""
    return cosine_to_centres(features, centres).max(dim=1).values


def normalized_class_means(features: Tensor, labels: Tensor) -> Tensor:
    """Means of the L2-normalized features of each class present in ``labels``, shape (K, D)."""
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {features.shape[0]} feature rows")
    normalized = F.normalize(features.float(), dim=1)
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = normalized.new_zeros(len(classes), normalized.shape[1]).index_add_(0, inverse, normalized)
    counts = torch.bincount(inverse, minlength=len(classes)).to(sums.dtype)
    return sums / counts[:, None]


@DETECTORS.register("representation")
class Representation(Detector):
    """Max cosine similarity of h(x) to the class centres, R(x) = max_c cos(h(x), mu_c).

    ``centre_source_`` says where the centres came from: ``"model"`` (``model.class_centres``)
    or ``"class_means"`` (means of normalized training features; classes absent from the
    training labels get no centre).
    """

    needs_fit = True

    def _fit(self, train: ModelOutputs) -> None:
        model_centres = getattr(self.model_, "class_centres", None) if self.model_ is not None else None
        if model_centres is not None:
            self.centres_ = model_centres.detach().float()
            self.centre_source_ = "model"
        elif train.labels is None:
            raise ValueError(
                f"{type(self).__name__} needs class centres: the model has no 'class_centres' and "
                "the training outputs have no labels to fit class means from"
            )
        else:
            self.centres_ = normalized_class_means(train.features, train.labels)
            self.centre_source_ = "class_means"
        if self.centres_.ndim != 2 or self.centres_.shape[1] != train.features.shape[1]:
            raise ValueError(
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

    def __init__(self, beta: float = 1.0, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.beta = beta
        self.temperature = temperature

    def _score(self, outputs: ModelOutputs) -> Tensor:
        energy = energy_score(outputs.logits.float(), self.temperature)
        return energy + self.beta * self._representation(outputs)
