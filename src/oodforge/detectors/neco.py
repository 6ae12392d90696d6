"""NECO (Ben Ammar et al., ICLR 2024): share of a standardized feature's norm in the top principal subspace."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import check_chunk_rows, column_mean, row_slices
from oodforge.util.errors import ConfigError


@DETECTORS.register("neco")
class NECO(Detector):
    """Score = ||P_d z|| / ||z|| * max_c f_c(x), z = (h - m) / s, with ``maxlogit=True``; the ratio alone otherwise.

    m and s are the mean and standard deviation (divided by N) of each feature over the training set, as
    scikit-learn's StandardScaler (a constant feature keeps s = 1); P_d projects onto the top ``dim``
    principal components of the standardized training features (the eigenvectors of their covariance with
    the largest eigenvalues, i.e. scikit-learn's PCA). ``dim`` defaults to min(100, D // 2) (100 is the
    official code's value) and must satisfy 1 <= dim < D. The official code multiplies by the max logit for
    convolutional networks (ResNet, DenseNet) and not for vision transformers: ``maxlogit=False`` gives
    that variant. Source: Ben Ammar et al., "NECO: NEural Collapse Based
    Out-of-distribution detection" (ICLR 2024, arXiv:2310.06823, eq. 6). The fit runs in float64 and
    reads the training features ``chunk_rows`` rows at a time.
    """

    paper: ClassVar[str] = 'Ben Ammar et al., "NECO: NEural Collapse Based Out-of-distribution detection" (ICLR 2024)'
    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {"dim": [10, 25, 50, 100, 200]}  # dim < D are tried

    def __init__(self, dim: int | None = None, maxlogit: bool = True, chunk_rows: int | None = None) -> None:
        self.dim = dim
        self.maxlogit = maxlogit
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"neco: dim must be None or >= 1, got {self.dim}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        features = train.features.detach()
        if features.ndim != 2 or len(features) < 2:
            raise ConfigError(f"neco: train features must be (N, D) with N >= 2, got {tuple(features.shape)}")
        width = features.shape[1]
        dim = min(100, width // 2) if self.dim is None else self.dim
        if not 1 <= dim < width:
            raise ConfigError(f"neco: dim must be in [1, {width - 1}] for D={width}, got {dim}")
        mean = column_mean(features, self.chunk_rows)
        moment = torch.zeros(width, width, dtype=torch.float64, device=features.device)
        for rows in row_slices(len(features), width, self.chunk_rows):
            centred = features[rows].to(torch.float64, copy=True).sub_(mean)
            moment.addmm_(centred.T, centred)
        covariance = moment / len(features)
        std = covariance.diagonal().sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        _, eigenvectors = torch.linalg.eigh(covariance / std[:, None] / std[None, :])  # ascending eigenvalues
        self.mean_, self.std_ = mean, std
        self.basis_ = eigenvectors[:, width - dim :]

    def _score(self, outputs: ModelOutputs) -> Tensor:
        width = self.mean_.shape[0]
        features = outputs.features.detach()
        if features.ndim != 2 or features.shape[1] != width:
            raise ConfigError(f"neco: features must have shape (N, {width}), got {tuple(features.shape)}")
        standardized = (features.to(self.mean_.device, torch.float64) - self.mean_) / self.std_
        ratio = (standardized @ self.basis_).norm(dim=1) / standardized.norm(dim=1).clamp(min=1e-12)
        if self.maxlogit:
            ratio = ratio * outputs.logits.detach().to(ratio.device, torch.float64).max(dim=1).values
        return ratio.float().to(features.device)
