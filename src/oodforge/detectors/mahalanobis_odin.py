"""Mahalanobis with input preprocessing (Lee et al. 2018): a small input step towards the nearest class mean."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, features_and_logits, require_interface
from oodforge.detectors.chunks import check_chunk_rows
from oodforge.detectors.mahalanobis import Mahalanobis, squared_distances
from oodforge.util.errors import ConfigError


@DETECTORS.register("mahalanobis_odin")
class MahalanobisODIN(Mahalanobis):
    """Score = -min_c M_c(x'), with x' = x - epsilon * sign(grad_x min_c M_c(x)) and
    M_c(x) = (h(x) - mu_c)^T S^+ (h(x) - mu_c) on the penultimate features h.

    Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial
    Attacks" (NeurIPS 2018), Eq. 4 with one feature layer (the penultimate one; no feature ensemble, no
    logistic regression over layers). Class means and the tied covariance are fitted exactly as by the
    ``mahalanobis`` detector (covariance divided by N, as in the paper; pseudo-inverse), whose score this is
    on the preprocessed input: at ``epsilon = 0`` both agree. The step moves x towards its nearest class mean
    (the gradient of that class's distance), ``sign(0) = 0`` as in pytorch-ood (the official code steps
    +epsilon there). ``epsilon`` is in the [0, 1] pixel scale of the inputs: the gradient flows through the
    model's own normalization, which is what the official code's division by the per-channel std gives.
    Default 0.0014 (OpenOOD's ``mds_ensemble``); the grid is taken from the paper's list.
    pytorch-ood's ``MahalanobisODIN`` divides its covariance sum by 1 instead of N (plus 1e-6 I), so its
    scores are half these divided by N (same ranking, same perturbation).
    """

    needs_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train", "gradients")
    search_space: ClassVar[dict[str, list]] = {"epsilon": [0.0, 0.0005, 0.0014, 0.002, 0.005]}

    def __init__(self, epsilon: float = 0.0014, ridge: float = 0.0, rtol: float | None = None,
                 chunk_rows: int | None = None) -> None:
        self.epsilon = epsilon
        self.ridge = ridge
        self.rtol = rtol
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.epsilon < 0:
            raise ConfigError(f"mahalanobis_odin: epsilon must be >= 0, got {self.epsilon}")
        if self.ridge < 0:
            raise ConfigError(f"mahalanobis_odin: ridge must be >= 0, got {self.ridge}")
        check_chunk_rows(self.chunk_rows)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        self.check_fitted()
        model = require_interface(model)
        if self.epsilon > 0:
            x = x.detach() - self.epsilon * self.distance_gradient(model, x).sign()
        return Detector.score(self, model, x)

    def distance_gradient(self, model: nn.Module, x: Tensor) -> Tensor:
        """d/dx of the squared Mahalanobis distance of h(x) to its nearest class mean, summed over the batch."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            features, _ = features_and_logits(model, x)
            whitened = features.flatten(1).to(self.whitening_.device, torch.float64) @ self.whitening_
            nearest = squared_distances(whitened.detach(), self.whitened_means_).argmin(dim=1)
            distance = (whitened - self.whitened_means_[nearest]).square().sum()
            (gradient,) = torch.autograd.grad(distance, x)
        return gradient
