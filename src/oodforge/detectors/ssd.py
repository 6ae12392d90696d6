"""SSD (Sehwag et al., ICLR 2021), post-hoc form: Mahalanobis distance to the nearest k-means cluster of the
normalized training features."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.mahalanobis import pinv_sqrt
from oodforge.util.errors import ConfigError

EPS = 1e-10  # added to norms and standard deviations, as in the official code


@DETECTORS.register("ssd")
class SSD(Detector):
    """Score = -min_m (z - mu_m)^T S_m^+ (z - mu_m), the squared Mahalanobis distance to the nearest cluster.

    z is the feature h scaled to unit length (h / (||h|| + 1e-10)) and then standardized per dimension with
    the mean and standard deviation (+ 1e-10) of the scaled training features. The training features so
    transformed are split into ``k`` clusters by k-means (scikit-learn ``KMeans``, ``n_init=10``,
    ``random_state=seed``; ``k = 1`` is a single Gaussian); mu_m and S_m are the mean and covariance (divided
    by the cluster size) of cluster m, S_m^+ its pseudo-inverse (eigen-directions below D * float64 eps
    times the largest eigenvalue dropped). Source: Sehwag et al., "SSD: A Unified Framework for
    Self-Supervised Outlier Detection" (ICLR 2021, arXiv:2103.12051) and the official code
    github.com/inspire-group/SSD (``eval_ssd.py``: normalization, standardization, per-cluster ``np.cov(bias=
    True)`` and ``np.linalg.pinv``, minimum over clusters). There, the clusters come from faiss k-means
    (and, for a cross-entropy model, from the class labels); here from scikit-learn's seeded k-means, and
    labels are not needed. The default ``k``, when larger than the number of training features, is clamped
    to it (``base.size_within``); a cluster with fewer than two members is refused. The fit runs in float64.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train")
    search_space: ClassVar[dict[str, list]] = {"k": [1, 2, 5, 10]}

    def __init__(self, k: int = 1, seed: int = 0, chunk_rows: int = 16384) -> None:
        self.k = k
        self.seed = seed
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"ssd: k must be an integer >= 1, got {self.k!r}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"ssd: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        features = train.features.detach()
        if features.ndim != 2 or len(features) < 2:
            raise ConfigError(f"ssd: train features must be (N, D) with N >= 2, got {tuple(features.shape)}")
        unit = _unit_rows(features.to(torch.float64))
        self.mean_ = unit.mean(dim=0)
        self.scale_ = unit.std(dim=0, correction=0) + EPS
        points = (unit - self.mean_) / self.scale_
        k = size_within(self, "k", len(points), "training features")
        assignment = _kmeans(points, k, self.seed)
        dim = points.shape[1]
        centres, whitenings = [], []
        for cluster in range(k):
            members = points[assignment == cluster]
            if len(members) < 2:
                raise ConfigError(f"ssd: a k-means cluster holds {len(members)} training feature(s); lower k "
                                  f"(k={k})")
            centre = members.mean(dim=0)
            centred = members - centre
            root = pinv_sqrt(centred.T @ centred / len(members))
            whitenings.append(torch.cat([root, root.new_zeros(dim, dim - root.shape[1])], dim=1))
            centres.append(centre)
        self.centres_ = torch.stack(centres)
        self.whitenings_ = torch.stack(whitenings)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.mean_.shape[0]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"ssd: features must have shape (N, {dim}), got {tuple(features.shape)}")
        device = features.device
        mean, scale = self.mean_.to(device), self.scale_.to(device)
        centres, whitenings = self.centres_.to(device), self.whitenings_.to(device)
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            points = (_unit_rows(features[rows].to(torch.float64)) - mean) / scale
            per_cluster = [((points - centre) @ whitening).square().sum(dim=1)
                           for centre, whitening in zip(centres, whitenings, strict=True)]
            parts.append(torch.stack(per_cluster, dim=1).min(dim=1).values)
        distances = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return (-distances).float()


def _unit_rows(features: Tensor) -> Tensor:
    """Rows divided by their L2 norm plus 1e-10."""
    return features / (features.norm(dim=1, keepdim=True) + EPS)


def _kmeans(points: Tensor, k: int, seed: int) -> Tensor:
    """Cluster index (0..k-1) of every row: seeded scikit-learn k-means, or all zeros for k = 1."""
    if k == 1:
        return torch.zeros(len(points), dtype=torch.long, device=points.device)
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points.cpu().numpy())
    return torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(points.device)
