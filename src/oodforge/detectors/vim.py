"""Virtual-logit matching, ViM (Wang et al. 2022): energy minus a scaled residual-norm "virtual logit"."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.scores import energy_score


@DETECTORS.register("vim")
class ViM(Detector):
    """Score = logsumexp(f(x)) - alpha * ||P_res (h - u)||: energy minus the virtual logit.

    u = -pinv(W) b is the origin at which a linear head W h + b gives zero logits (u = 0 for a head
    without bias). The principal subspace is spanned by the top ``dim`` eigenvectors of the
    second-moment matrix of (h - u) over the training features, i.e. the features are centred at u,
    as in the paper; P_res projects onto its orthogonal complement. ``dim`` defaults to
    min(D // 2, 512) and must satisfy 1 <= dim < D. alpha = mean train max-logit / mean train
    residual norm. The fit runs in float64 and needs ``fit(train, model)`` with a head that has
    ``.weight`` (C, D).
    """

    needs_fit = True

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim

    def _fit(self, train: ModelOutputs) -> None:
        weight, bias = _head_parameters(self.model_)
        features = train.features.detach().double()
        width = weight.shape[1]
        if features.ndim != 2 or features.shape[1] != width:
            raise ValueError(f"train features must be (N, {width}) to match the head, got {features.shape}")
        dim = min(width // 2, 512) if self.dim is None else self.dim
        if not 1 <= dim < width:
            raise ValueError(f"dim must be in [1, {width - 1}] for D={width}, got {dim}")
        weight, bias = weight.to(features), bias.to(features)
        self.origin_ = -(torch.linalg.pinv(weight) @ bias)
        centred = features - self.origin_
        _, eigenvectors = torch.linalg.eigh(centred.T @ centred / len(centred))  # ascending eigenvalues
        self.residual_basis_ = eigenvectors[:, : width - dim]
        residual_mean = self._residual_norm(features).mean()
        if residual_mean <= 0:
            raise ValueError(f"training features have no residual outside a {dim}-d subspace; lower dim")
        max_logit_mean = train.logits.detach().double().max(dim=1).values.mean()
        self.alpha_ = (max_logit_mean / residual_mean).item()

    def _residual_norm(self, features: Tensor) -> Tensor:
        """Norm of (h - u) outside the principal subspace, float64, shape (N,)."""
        centred = features.to(self.origin_.device, torch.float64) - self.origin_
        return (centred @ self.residual_basis_).norm(dim=1)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        dim = self.origin_.shape[0]
        if outputs.features.ndim != 2 or outputs.features.shape[1] != dim:
            raise ValueError(f"features must have shape (N, {dim}), got {tuple(outputs.features.shape)}")
        virtual_logit = self.alpha_ * self._residual_norm(outputs.features.detach())
        energy = energy_score(outputs.logits.detach().double().to(virtual_logit.device))
        return (energy - virtual_logit).float().to(outputs.features.device)


def _head_parameters(model: nn.Module | None) -> tuple[Tensor, Tensor]:
    """The head's weight (C, D) and bias (C,), zeros when it has none; a ValueError otherwise."""
    head = getattr(model, "head", None)
    if head is None:
        raise ValueError("vim needs the classifier: call fit(train, model) with a model that has .head")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise ValueError(f"vim needs a linear head with .weight (C, D); {type(head).__name__} has none")
    bias = getattr(head, "bias", None)
    if not isinstance(bias, Tensor):
        bias = weight.new_zeros(weight.shape[0])
    return weight.detach(), bias.detach()
