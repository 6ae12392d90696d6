"""Residual score (Wang et al. 2022, the ViM paper): minus the feature's norm outside the principal subspace."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError


@DETECTORS.register("residual")
class Residual(Detector):
    """Score = -||P_res (h - u)||, u = -pinv(W) b, P_res = projection off the principal subspace.

    u is the point where the linear head W h + b gives zero logits (u = 0 for a head without bias).
    The principal subspace is spanned by the top ``dim`` eigenvectors of the second-moment matrix of
    (h - u) over the training features (accumulated in float64, ``chunk_rows`` rows at a time);
    ``dim`` defaults to min(D // 2, 512), as this package's ViM, and must satisfy 1 <= dim < D.
    Sources: Wang et al., "ViM: Out-Of-Distribution with Virtual-logit Matching" (CVPR 2022,
    arXiv:2203.10807; the "Residual" method of github.com/haoqiwang/vim benchmark.py, which uses
    dim = 1000 for D >= 2048 and 512 otherwise) and OpenOOD v1.5's
    openood/postprocessors/residual_postprocessor.py (same u and subspace; configs/postprocessors/
    residual.yml: dim = 512, which leaves no residual for D = 512 features).
    """

    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {}
    needs_fit: ClassVar[bool] = True

    def __init__(self, dim: int | None = None, chunk_rows: int = 16384) -> None:
        self.dim = dim
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.dim is not None and not self.dim >= 1:
            raise ConfigError(f"residual: dim must be None or >= 1, got {self.dim}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"residual: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        weight, bias = linear_head(self.model_, "residual")
        features = train.features.detach()
        width = weight.shape[1]
        if features.ndim != 2 or len(features) == 0 or features.shape[1] != width:
            raise ConfigError(f"residual: train features must be non-empty (N, {width}) to match the head, "
                             f"got {tuple(features.shape)}")
        dim = min(width // 2, 512) if self.dim is None else self.dim
        if not 1 <= dim < width:
            raise ConfigError(f"residual: dim must be in [1, {width - 1}] for D={width}, got {dim}")
        weight, bias = weight.to(features.device), bias.to(features.device)
        self.origin_ = -(torch.linalg.pinv(weight) @ bias)
        moment = torch.zeros(width, width, dtype=torch.float64, device=features.device)
        for start in range(0, len(features), self.chunk_rows):
            centred = features[start:start + self.chunk_rows].to(torch.float64) - self.origin_
            moment.addmm_(centred.T, centred)
        _, eigenvectors = torch.linalg.eigh(moment / len(features))  # ascending eigenvalues
        self.residual_basis_ = eigenvectors[:, : width - dim]

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        width = self.origin_.shape[0]
        if features.ndim != 2 or features.shape[1] != width:
            raise ConfigError(f"residual: features must have shape (N, {width}), got {tuple(features.shape)}")
        origin, basis = self.origin_.to(features.device), self.residual_basis_.to(features.device)
        parts = [
            -((features[rows].to(torch.float64) - origin) @ basis).norm(dim=1)
            for rows in row_slices(features.shape[0], width, self.chunk_rows)
        ]
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()
