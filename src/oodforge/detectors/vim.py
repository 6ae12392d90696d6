"""Virtual-logit matching, ViM (Wang et al. 2022): energy minus a scaled residual-norm "virtual logit"."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import check_chunk_rows, row_slices
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("vim")
class ViM(Detector):
    """Score = logsumexp(f(x)) - alpha * ||P_res (h - u)||: energy minus the virtual logit.

    u = -pinv(W) b is the origin at which a linear head W h + b gives zero logits (u = 0 for a head
    without bias). The principal subspace is spanned by the top ``dim`` eigenvectors of the
    second-moment matrix of (h - u) over the training features, i.e. the features are centred at u,
    as in the paper; P_res projects onto its orthogonal complement. ``dim`` defaults to
    min(D // 2, 512) and must satisfy 1 <= dim < D. alpha = mean train max-logit / mean train
    residual norm. The fit runs in float64 and needs ``fit(train, model)`` with a head that has
    ``.weight`` (C, D). Features and logits are read ``chunk_rows`` rows at a time (default: 256 MiB
    of float64 per chunk), so the training matrices (memory-mapped, say) are never copied whole.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"dim": [8, 16, 32, 64, 128, 256, 512, 1000]}  # dim < D are tried

    def __init__(self, dim: int | None = None, chunk_rows: int | None = None) -> None:
        self.dim = dim
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"vim: dim must be None or >= 1, got {self.dim}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        weight, bias = _head_parameters(self.model_)
        check_chunk_rows(self.chunk_rows)
        features, logits = train.features.detach(), train.logits.detach()
        width = weight.shape[1]
        if features.ndim != 2 or features.shape[1] != width or len(features) == 0:
            raise ConfigError(
                f"train features must be non-empty (N, {width}) to match the head, got {tuple(features.shape)}"
            )
        if logits.ndim != 2 or len(logits) != len(features):
            raise ConfigError(f"train logits must be ({len(features)}, C), got {tuple(logits.shape)}")
        dim = min(width // 2, 512) if self.dim is None else self.dim
        if not 1 <= dim < width:
            raise ConfigError(f"dim must be in [1, {width - 1}] for D={width}, got {dim}")
        weight, bias = weight.to(features.device, torch.float64), bias.to(features.device, torch.float64)
        self.origin_ = -(torch.linalg.pinv(weight) @ bias)
        moment = weight.new_zeros(width, width)
        for rows in row_slices(len(features), width, self.chunk_rows):
            centred = features[rows].to(torch.float64, copy=True).sub_(self.origin_)
            moment.addmm_(centred.T, centred)
        _, eigenvectors = torch.linalg.eigh(moment / len(features))  # ascending eigenvalues
        self.residual_basis_ = eigenvectors[:, : width - dim]
        residual_mean = self._residual_norm(features).mean()
        if residual_mean <= 0:
            raise ConfigError(f"training features have no residual outside a {dim}-d subspace; lower dim")
        max_logit_sum = sum(
            logits[rows].max(dim=1).values.double().sum()
            for rows in row_slices(len(logits), logits.shape[1], self.chunk_rows)
        )
        self.alpha_ = (max_logit_sum / len(logits) / residual_mean).item()

    def _residual_norm(self, features: Tensor) -> Tensor:
        """Norm of (h - u) outside the principal subspace, float64, shape (N,), chunk by chunk."""
        parts = []
        for rows in row_slices(features.shape[0], features.shape[1], self.chunk_rows):
            centred = features[rows].to(self.origin_.device, torch.float64, copy=True).sub_(self.origin_)
            parts.append((centred @ self.residual_basis_).norm(dim=1))
        return torch.cat(parts) if parts else self.origin_.new_zeros(0)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        dim = self.origin_.shape[0]
        if outputs.features.ndim != 2 or outputs.features.shape[1] != dim:
            raise ConfigError(f"features must have shape (N, {dim}), got {tuple(outputs.features.shape)}")
        virtual_logit = self.alpha_ * self._residual_norm(outputs.features.detach())
        logits = outputs.logits.detach()
        parts = [
            energy_score(logits[rows].to(virtual_logit.device, torch.float64))
            for rows in row_slices(logits.shape[0], logits.shape[1], self.chunk_rows)
        ]
        energy = torch.cat(parts) if parts else virtual_logit.new_zeros(0)
        return (energy - virtual_logit).float().to(outputs.features.device)


def _head_parameters(model: nn.Module | None) -> tuple[Tensor, Tensor]:
    """The head's weight (C, D) and bias (C,), zeros when it has none; a ValueError otherwise."""
    head = getattr(model, "head", None)
    if head is None:
        raise ConfigError("vim needs the classifier: call fit(train, model) with a model that has .head")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ConfigError(f"vim needs a linear head with .weight (C, D); {type(head).__name__} has none")
    bias = getattr(head, "bias", None)
    if not isinstance(bias, Tensor):
        bias = weight.new_zeros(weight.shape[0])
    return weight.detach(), bias.detach()
