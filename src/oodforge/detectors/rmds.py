"""Relative Mahalanobis distance, RMDS (Ren et al. 2021): class Mahalanobis minus a background Gaussian's."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.mahalanobis import squared_distances
from oodforge.util.errors import ConfigError


@DETECTORS.register("rmds")
class RMDS(Detector):
    """Relative Mahalanobis score: max_c -(MD_c(h) - MD_0(h)) = MD_0(h) - min_c MD_c(h).

    MD_c(h) = (h - mu_c)^T S^+ (h - mu_c) is the squared distance to class mean mu_c under the tied
    covariance S of the class-centred training features; MD_0(h) = (h - mu_0)^T S_0^+ (h - mu_0) is the
    squared distance to the mean mu_0 of all training features under their covariance S_0 (the
    "background" Gaussian). Both covariances are divided by N (sklearn's EmpiricalCovariance); the
    pseudo-inverses drop eigen-directions below D * float64 eps times the largest eigenvalue.
    Sources: Ren et al., "A Simple Fix to Mahalanobis Distance for Improving Near-OOD Detection"
    (arXiv:2106.09022, RMD_k = MD_k - MD_0, confidence -min_k RMD_k) and OpenOOD v1.5's
    openood/postprocessors/rmds_postprocessor.py (github.com/Jingkang50/OpenOOD; no hyperparameters).
    The fit needs labelled training outputs, runs in float64 and reads the features ``chunk_rows``
    rows at a time (two passes), so a memory-mapped training matrix is never copied whole.
    """

    requires: ClassVar[tuple[str, ...]] = ("features", "train")
    search_space: ClassVar[dict[str, list]] = {}
    needs_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True

    def __init__(self, chunk_rows: int = 16384) -> None:
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not self.chunk_rows >= 1:
            raise ConfigError(f"rmds: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        features = train.features.detach()
        labels = train.labels.detach().to(features.device)
        if features.ndim != 2 or len(features) == 0 or labels.shape != (len(features),):
            raise ConfigError(f"rmds: train features must be non-empty (N, D) with labels (N,), got "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        self.classes_, inverse = torch.unique(labels, return_inverse=True)
        means, background_mean = self._means(features, inverse, len(self.classes_))
        within, total = self._covariances(features, inverse, means, background_mean)
        self.whitening_ = _pinv_sqrt(within)
        self.whitened_means_ = means @ self.whitening_
        self.background_whitening_ = _pinv_sqrt(total)
        self.background_mean_ = background_mean

    def _means(self, features: Tensor, inverse: Tensor, classes: int) -> tuple[Tensor, Tensor]:
        """Class means (K, D) and the mean of all rows (D,), float64, in one chunked pass."""
        sums = torch.zeros(classes, features.shape[1], dtype=torch.float64, device=features.device)
        for start in range(0, len(features), self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            sums.index_add_(0, inverse[rows], features[rows].to(torch.float64))
        counts = torch.bincount(inverse, minlength=classes).to(sums.dtype)
        return sums / counts[:, None], sums.sum(dim=0) / len(features)

    def _covariances(self, features: Tensor, inverse: Tensor, means: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """Covariance of the class-centred rows and of all rows (both (D, D), divided by N), one chunked pass."""
        dim = features.shape[1]
        within = torch.zeros(dim, dim, dtype=torch.float64, device=features.device)
        total = torch.zeros_like(within)
        for start in range(0, len(features), self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            chunk = features[rows].to(torch.float64)
            centred = chunk - means[inverse[rows]]
            within.addmm_(centred.T, centred)
            centred = chunk - mean
            total.addmm_(centred.T, centred)
        return within / len(features), total / len(features)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.whitening_.shape[0]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"rmds: features must have shape (N, {dim}), got {tuple(features.shape)}")
        device = features.device
        whitening, means = self.whitening_.to(device), self.whitened_means_.to(device)
        background_whitening, background_mean = self.background_whitening_.to(device), self.background_mean_.to(device)
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            class_distances = squared_distances(chunk @ whitening, means)  # exact; converts to ONNX, unlike cdist
            background = ((chunk - background_mean) @ background_whitening).square().sum(dim=1)
            parts.append(background - class_distances.min(dim=1).values)
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()


def _pinv_sqrt(covariance: Tensor) -> Tensor:
    """A (D, r) matrix W with W W^T = pinv(covariance) for a symmetric PSD ``covariance`` (eigen-decomposition)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    cutoff = len(covariance) * torch.finfo(covariance.dtype).eps * eigenvalues.max().clamp(min=0)
    keep = eigenvalues > cutoff
    return eigenvectors[:, keep] / eigenvalues[keep].sqrt()
