"""DICE (Sun & Li, ECCV 2022): energy of a final layer sparsified to its largest mean contributions."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import CHUNK_ROWS, column_mean, row_slices
from oodforge.detectors.head import linear_head
from oodforge.detectors.react import percentile
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("dice")
class DICE(Detector):
    """Score = logsumexp((M * W) h + b), M = [V > percentile(V, sparsity)], V = W * mean_train(h) (C, D).

    V_cd = W_cd * mean h_d is each weight's mean contribution over the ID training features; the
    ``sparsity``-th percentile is over all C x D entries of V (signed, linearly interpolated as
    ``numpy.percentile``), and only weights whose contribution exceeds it are kept, as in the official
    code (github.com/deeplearning-wisc/dice, ``models/route.py``: ``RouteDICE``) and OpenOOD v1.5
    (``dice_postprocessor.py``). Default 90 is the official CIFAR setting (``demo-cifar.sh``: ``--p 90``)
    and OpenOOD's, whose sweep holds only 90; the grid adds lower sparsities. The training mean is accumulated in
    float64, ``CHUNK_ROWS`` rows at a time; the masked weight and bias are kept as learned state, so
    scoring needs no model. Needs ``fit(train, model)`` with a linear head.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"sparsity": [10.0, 30.0, 50.0, 70.0, 90.0]}

    def __init__(self, sparsity: float = 90.0) -> None:
        self.sparsity = sparsity

    def _check(self) -> None:
        if not 0.0 <= self.sparsity < 100.0:
            raise ConfigError(f"dice: sparsity must be in [0, 100), got {self.sparsity}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        weight, bias = linear_head(self.model_, "dice")
        features = train.features.detach()
        if features.ndim != 2 or features.shape[1] != weight.shape[1] or len(features) == 0:
            raise ConfigError(f"dice: train features must be non-empty (N, {weight.shape[1]}) to match the head, "
                             f"got {tuple(features.shape)}")
        contribution = weight * column_mean(features, CHUNK_ROWS).cpu()[None, :]
        threshold = percentile(contribution, self.sparsity)
        self.weight_ = weight * (contribution > threshold)
        self.bias_ = bias

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        if features.ndim != 2 or features.shape[1] != self.weight_.shape[1]:
            raise ConfigError(f"dice: features must be (N, {self.weight_.shape[1]}), got {tuple(features.shape)}")
        weight, bias = self.weight_.to(features.device), self.bias_.to(features.device)
        parts = [energy_score(features[rows].double() @ weight.T + bias)
                 for rows in row_slices(features.shape[0], features.shape[1], CHUNK_ROWS)]
        return torch.cat(parts).float() if parts else features.new_zeros(0, dtype=torch.float32)
