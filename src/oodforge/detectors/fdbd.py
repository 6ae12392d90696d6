"""fDBD (Liu & Qin, ICML 2024): mean feature-space distance to the decision boundaries, regularized by a norm."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import column_mean, row_slices
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError


@DETECTORS.register("fdbd")
class FDBD(Detector):
    """Mean distance from h to the decision boundaries between the predicted class and every other class,
    divided by ||h - mu_train|| (or by ||h|| with ``distance_as_normalizer=False``).

    With a linear head f(h) = W h + b and prediction p = argmax f(h), the distance from h to the
    boundary between p and c is |f_p(h) - f_c(h)| / ||w_p - w_c||; the score averages it over the
    C - 1 classes c != p. mu_train is the mean training feature. Sources: Liu & Qin, "Fast Decision
    Boundary based Out-of-Distribution Detector" (ICML 2024, arXiv:2312.11536), the official code
    github.com/litianliu/fDBD-OOD (run_cifar.py: sum over classes, divided by ||h - mu_train||) and
    OpenOOD v1.5's openood/postprocessors/fdbd_postprocessor.py with configs/postprocessors/fdbd.yml
    (``distance_as_normalizer`` True by default, swept over True/False). The official code sums over
    classes; the mean differs by the constant factor 1 / (C - 1). Logits are recomputed from the head
    in float64. The training mean is accumulated ``chunk_rows`` rows at a time.
    """

    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"distance_as_normalizer": [True, False]}
    needs_fit: ClassVar[bool] = True

    def __init__(self, distance_as_normalizer: bool = True, chunk_rows: int = 16384) -> None:
        self.distance_as_normalizer = distance_as_normalizer
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not isinstance(self.distance_as_normalizer, bool):
            raise ConfigError(f"fdbd: distance_as_normalizer must be True or False, got "
                              f"{self.distance_as_normalizer!r}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"fdbd: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        weight, bias = linear_head(self.model_, "fdbd")
        features = train.features.detach()
        if features.ndim != 2 or len(features) == 0 or features.shape[1] != weight.shape[1]:
            raise ConfigError(f"fdbd: train features must be non-empty (N, {weight.shape[1]}) to match the head, "
                             f"got {tuple(features.shape)}")
        if weight.shape[0] < 2:
            raise ConfigError(f"fdbd needs a head with at least 2 classes, got {weight.shape[0]}")
        gaps = torch.cdist(weight, weight, compute_mode="donot_use_mm_for_euclid_dist")
        gaps.fill_diagonal_(1.0)  # the predicted class's own term is 0 / 1
        if not (gaps > 0).all():
            raise ConfigError("fdbd: two classes of the head have identical weight vectors (no decision boundary)")
        self.train_mean_ = column_mean(features, self.chunk_rows)
        self.weight_ = weight.to(features.device)
        self.bias_ = bias.to(features.device)
        self.weight_gaps_ = gaps.to(features.device)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.weight_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"fdbd: features must have shape (N, {dim}), got {tuple(features.shape)}")
        device = features.device
        weight, bias, gaps = self.weight_.to(device), self.bias_.to(device), self.weight_gaps_.to(device)
        mean = self.train_mean_.to(device)
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            logits = chunk @ weight.T + bias
            top, predicted = logits.max(dim=1)
            distances = (top[:, None] - logits) / gaps[predicted]
            mean_distance = distances.sum(dim=1) / (weight.shape[0] - 1)
            norm = (chunk - mean if self.distance_as_normalizer else chunk).norm(dim=1)
            parts.append(mean_distance / norm)
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()
