"""Mahalanobis detector (Lee et al. 2018): class means and one shared covariance of the features."""

from __future__ import annotations

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs


@DETECTORS.register("mahalanobis")
class Mahalanobis(Detector):
    """Negative SQUARED Mahalanobis distance to the nearest class mean, with one tied covariance.

    Score = -min_c (h - mu_c)^T S^+ (h - mu_c). ``S`` is the covariance of the class-centred
    training features (divided by N) plus ``ridge * I``; ``S^+`` is its pseudo-inverse, which drops
    directions whose variance is at most ``rtol`` times the largest (default: D * float64 eps, as
    ``torch.linalg.pinv``). The fit runs in float64; the training outputs must carry labels.
    """

    needs_fit = True

    def __init__(self, ridge: float = 0.0, rtol: float | None = None) -> None:
        self.ridge = ridge
        self.rtol = rtol

    def _fit(self, train: ModelOutputs) -> None:
        if train.labels is None:
            raise ValueError("mahalanobis needs labelled training outputs (train.labels is None)")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        features = train.features.detach().double()
        labels = train.labels.detach().to(features.device)
        if features.ndim != 2 or labels.shape != (len(features),):
            raise ValueError(
                f"train features must be (N, D) with labels (N,), got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.classes_, inverse = torch.unique(labels, return_inverse=True)
        counts = torch.bincount(inverse, minlength=len(self.classes_)).unsqueeze(1)
        means = features.new_zeros(len(self.classes_), features.shape[1]).index_add_(0, inverse, features)
        means /= counts
        centred = features - means[inverse]
        covariance = centred.T @ centred / len(features)
        covariance += self.ridge * torch.eye(len(covariance), dtype=torch.float64, device=features.device)
        self.whitening_ = pinv_sqrt(covariance, self.rtol)
        self.whitened_means_ = means @ self.whitening_

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.whitening_.shape[0]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ValueError(f"features must have shape (N, {dim}), got {tuple(features.shape)}")
        whitened = features.to(self.whitening_.device, torch.float64) @ self.whitening_
        squared = _squared_distances(whitened, self.whitened_means_)
        return -squared.min(dim=1).values.float().to(features.device)


def pinv_sqrt(covariance: Tensor, rtol: float | None = None) -> Tensor:
    """A (D, r) matrix W with W W^T = pinv(covariance), for a symmetric PSD ``covariance``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    if rtol is None:
        rtol = len(covariance) * torch.finfo(covariance.dtype).eps
    keep = eigenvalues > rtol * eigenvalues.max().clamp(min=0)
    return eigenvectors[:, keep] / eigenvalues[keep].sqrt()


def _squared_distances(points: Tensor, centres: Tensor, chunk: int = 8192) -> Tensor:
    """Squared Euclidean distances (N, C), computed exactly (no ||a||^2 - 2ab + ||b||^2 shortcut)."""
    parts = [
        (block.unsqueeze(1) - centres.unsqueeze(0)).square().sum(dim=2)
        for block in points.split(max(1, chunk // max(1, len(centres))))
    ]
    return torch.cat(parts) if parts else points.new_zeros(0, len(centres))
