"""Mahalanobis detector (Lee et al. 2018): class means and one shared covariance of the features."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import check_chunk_rows, exporting, row_slices
from oodforge.util.errors import ConfigError


@DETECTORS.register("mahalanobis")
class Mahalanobis(Detector):
    """Negative SQUARED Mahalanobis distance to the nearest class mean, with one tied covariance.

    Score = -min_c (h - mu_c)^T S^+ (h - mu_c). ``S`` is the covariance of the class-centred
    training features (divided by N) plus ``ridge * I``; ``S^+`` is its pseudo-inverse, which drops
    directions whose variance is at most ``rtol`` times the largest (default: D * float64 eps, as
    ``torch.linalg.pinv``). The fit runs in float64; the training outputs must carry labels.
    Features are read ``chunk_rows`` rows at a time (default: 256 MiB of float64 per chunk), so
    the training matrix (memory-mapped, say) is never copied whole.
    """

    needs_fit = True
    needs_labels = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train")

    def __init__(self, ridge: float = 0.0, rtol: float | None = None, chunk_rows: int | None = None) -> None:
        self.ridge = ridge
        self.rtol = rtol
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.ridge < 0:
            raise ConfigError(f"mahalanobis: ridge must be >= 0, got {self.ridge}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        if self.ridge < 0:
            raise ConfigError(f"ridge must be >= 0, got {self.ridge}")
        check_chunk_rows(self.chunk_rows)
        features = train.features.detach()
        labels = train.labels.detach().to(features.device)
        if features.ndim != 2 or len(features) == 0 or labels.shape != (len(features),):
            raise ConfigError(
                f"train features must be non-empty (N, D) with labels (N,), got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.classes_, inverse = torch.unique(labels, return_inverse=True)
        means, covariance = _class_means_and_covariance(features, inverse, len(self.classes_), self.chunk_rows)
        covariance += self.ridge * torch.eye(len(covariance), dtype=torch.float64, device=features.device)
        self.whitening_ = pinv_sqrt(covariance, self.rtol)
        self.whitened_means_ = means @ self.whitening_

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.whitening_.shape[0]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"features must have shape (N, {dim}), got {tuple(features.shape)}")
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            whitened = features[rows].to(self.whitening_.device, torch.float64) @ self.whitening_
            parts.append(squared_distances(whitened, self.whitened_means_).min(dim=1).values)
        squared = torch.cat(parts) if parts else self.whitening_.new_zeros(0)
        return -squared.float().to(features.device)


def _class_means_and_covariance(
    features: Tensor, inverse: Tensor, classes: int, chunk_rows: int | None
) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and the covariance (D, D) of class-centred features, float64, in two chunked passes."""
    chunks = row_slices(len(features), features.shape[1], chunk_rows)
    counts = torch.bincount(inverse, minlength=classes).unsqueeze(1)
    means = torch.zeros(classes, features.shape[1], dtype=torch.float64, device=features.device)
    for rows in chunks:
        means.index_add_(0, inverse[rows], features[rows].double())
    means /= counts
    covariance = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
    for rows in chunks:
        centred = features[rows].to(torch.float64, copy=True).sub_(means[inverse[rows]])
        covariance.addmm_(centred.T, centred)
    return means, covariance / len(features)


def pinv_sqrt(covariance: Tensor, rtol: float | None = None) -> Tensor:
    """A (D, r) matrix W with W W^T = pinv(covariance), for a symmetric PSD ``covariance``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    if rtol is None:
        rtol = len(covariance) * torch.finfo(covariance.dtype).eps
    keep = eigenvalues > rtol * eigenvalues.max().clamp(min=0)
    return eigenvectors[:, keep] / eigenvalues[keep].sqrt()


def squared_distances(points: Tensor, centres: Tensor, elements: int = 1 << 21) -> Tensor:
    """Squared Euclidean distances (N, C), computed exactly (no ||a||^2 - 2ab + ||b||^2 shortcut).

    Blocks of rows whose (rows, C, D) differences hold at most ``elements`` numbers go through one
    preallocated buffer, so the loop allocates nothing (fresh big blocks each step either fault in
    new pages or, interleaved with small allocations, fragment the heap). While a graph is exported, all rows go
    at once, so that it takes any batch size.
    """
    if exporting():
        return torch.sub(points.unsqueeze(1), centres.unsqueeze(0)).square_().sum(dim=2)
    rows = max(1, elements // max(1, centres.numel()))
    squared = points.new_empty(len(points), len(centres))
    buffer = points.new_empty(min(rows, len(points)), len(centres), points.shape[1])
    for start in range(0, len(points), rows):
        block = points[start : start + rows]
        differences = torch.sub(block.unsqueeze(1), centres.unsqueeze(0), out=buffer[: len(block)])
        torch.sum(differences.square_(), dim=2, out=squared[start : start + len(block)])
    return squared
