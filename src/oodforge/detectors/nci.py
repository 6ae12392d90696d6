"""NCI (Liu & Qin, CVPR 2025): proximity of the centred feature to the predicted class weight, plus a norm term."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import column_mean, row_slices
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError


@DETECTORS.register("nci")
class NCI(Detector):
    """Score = w_p^T (h - mu_train) / ||h - mu_train|| + alpha * ||h||_1, p = the predicted class.

    The first term (pScore) is the projection of the unit-length centred feature onto the predicted
    class's weight vector w_p of the linear head (not normalized by ||w_p||, as in the authors' code);
    the second is an L1 feature-norm filter. mu_train is the mean training feature. Sources: Liu & Qin,
    "Detecting Out-of-Distribution through the Lens of Neural Collapse" (CVPR 2025, arXiv:2311.01479;
    github.com/litianliu/NCI-OOD points to its OpenOOD integration), OpenOOD v1.5's
    openood/postprocessors/nci_postprocessor.py with configs/postprocessors/nci.yml (alpha = 1e-4,
    swept over 1e-4, 1e-3, 1e-2, 0.1). The prediction is the argmax of the head's logits, recomputed in
    float64. The training mean is accumulated ``chunk_rows`` rows at a time.
    """

    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"alpha": [1e-4, 1e-3, 1e-2, 1e-1]}
    needs_fit: ClassVar[bool] = True

    def __init__(self, alpha: float = 1e-4, chunk_rows: int = 16384) -> None:
        self.alpha = alpha
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not self.alpha >= 0:
            raise ConfigError(f"nci: alpha must be >= 0, got {self.alpha}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"nci: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        weight, bias = linear_head(self.model_, "nci")
        features = train.features.detach()
        if features.ndim != 2 or len(features) == 0 or features.shape[1] != weight.shape[1]:
            raise ConfigError(f"nci: train features must be non-empty (N, {weight.shape[1]}) to match the head, "
                             f"got {tuple(features.shape)}")
        self.train_mean_ = column_mean(features, self.chunk_rows)
        self.weight_ = weight.to(features.device)
        self.bias_ = bias.to(features.device)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.weight_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"nci: features must have shape (N, {dim}), got {tuple(features.shape)}")
        device = features.device
        weight, bias, mean = self.weight_.to(device), self.bias_.to(device), self.train_mean_.to(device)
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            predicted = (chunk @ weight.T + bias).argmax(dim=1)
            centred = chunk - mean
            proximity = (weight[predicted] * centred).sum(dim=1) / centred.norm(dim=1)
            parts.append(proximity + self.alpha * chunk.abs().sum(dim=1))
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()
