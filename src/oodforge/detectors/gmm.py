"""Class-conditional Gaussian mixture on the penultimate features: the log-likelihood of the whole mixture."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.chunks import check_chunk_rows, row_slices
from oodforge.util.errors import ConfigError


@DETECTORS.register("gmm")
class GMM(Detector):
    """Score = log sum_c pi_c sum_j w_cj N(h | mu_cj, Sigma_cj), the log-likelihood of h under the mixture.

    Each class c gets a Gaussian mixture of ``n_components`` components with full covariances (scikit-learn's
    GaussianMixture, EM from k-means, ``reg`` added to every covariance's diagonal, ``random_state=seed``)
    fitted on its training features; pi_c is the share of training rows in class c. With one component per
    class the fit is closed-form: the class mean and the class covariance (divided by N_c) plus ``reg * I``,
    exactly pytorch-ood's ``GMM`` (its outlier score is the negative of this). ``n_components`` must not
    exceed the rows of the smallest class. Scoring is float64 over blocks of ``chunk_rows`` rows (default:
    256 MiB of whitened features per block). No paper introduced the method: it is the class-conditional
    Gaussian baseline with per-class covariances and the full mixture likelihood (pytorch-ood
    ``detector/gmm.py``); OpenOOD's ``gmm`` fits one tied-covariance mixture to all features instead.
    """

    paper: ClassVar[str] = "no single paper: the class-conditional Gaussian baseline, as pytorch-ood's GMM"
    needs_fit = True
    needs_labels = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train")
    search_space: ClassVar[dict[str, list]] = {"n_components": [1, 2, 3, 5], "reg": [1e-6, 1e-4, 1e-2]}

    def __init__(self, n_components: int = 1, reg: float = 1e-6, seed: int = 0,
                 chunk_rows: int | None = None) -> None:
        self.n_components = n_components
        self.reg = reg
        self.seed = seed
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.n_components < 1:
            raise ConfigError(f"gmm: n_components must be >= 1, got {self.n_components}")
        if not self.reg >= 0:
            raise ConfigError(f"gmm: reg must be >= 0, got {self.reg}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        features = train.features.detach().to("cpu", torch.float64)
        labels = train.labels.detach().cpu()
        if features.ndim != 2 or len(features) == 0 or labels.shape != (len(features),):
            raise ConfigError(f"gmm: train features must be non-empty (N, D) with labels (N,), got "
                              f"{tuple(features.shape)} and {tuple(labels.shape)}")
        classes, counts = torch.unique(labels, return_counts=True)
        components = size_within(self, "n_components", int(counts.min()), "rows of the smallest class")
        means, whitenings, log_weights = [], [], []
        for c, count in zip(classes.tolist(), counts.tolist(), strict=True):
            mixture = self._class_mixture(features[labels == c], components)
            means.append(mixture[0])
            whitenings.append(mixture[1])
            log_weights.append(mixture[2] + math.log(count / len(features)))
        self.means_ = torch.cat(means)  # (K, D), K = classes * components
        self.whitenings_ = torch.cat(whitenings)  # (K, D, D): W_k W_k^T = Sigma_k^-1
        log_det = torch.linalg.diagonal(self.whitenings_).log().sum(dim=1)  # log |W_k| = -1/2 log |Sigma_k|
        self.log_norms_ = torch.cat(log_weights) + log_det - 0.5 * features.shape[1] * math.log(2 * math.pi)

    def _class_mixture(self, features: Tensor, components: int) -> tuple[Tensor, Tensor, Tensor]:
        """Means (J, D), precision Cholesky factors (J, D, D) and log weights (J,) of one class's mixture."""
        dim = features.shape[1]
        if components == 1:
            mean = features.mean(dim=0)
            centred = features - mean
            covariance = centred.T @ centred / len(features) + self.reg * torch.eye(dim, dtype=torch.float64)
            return mean[None], _precision_cholesky(covariance)[None], torch.zeros(1, dtype=torch.float64)
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        mixture = GaussianMixture(n_components=components, covariance_type="full", reg_covar=self.reg,
                                  random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mixture.fit(features.numpy())
        return (torch.from_numpy(mixture.means_), torch.from_numpy(np.ascontiguousarray(mixture.precisions_cholesky_)),
                torch.from_numpy(np.log(mixture.weights_)))

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.means_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"gmm: features must have shape (N, {dim}), got {tuple(features.shape)}")
        shifts = torch.einsum("kd,kde->ke", self.means_, self.whitenings_)  # mu_k W_k
        parts = []
        for rows in row_slices(features.shape[0], self.means_.numel(), self.chunk_rows):
            x = features[rows].to(self.means_.device, torch.float64)
            whitened = torch.einsum("nd,kde->nke", x, self.whitenings_) - shifts  # (n, K, D)
            parts.append(torch.logsumexp(self.log_norms_ - 0.5 * whitened.square().sum(dim=2), dim=1))
        scores = torch.cat(parts) if parts else self.means_.new_zeros(0)
        return scores.float().to(features.device)


def _precision_cholesky(covariance: Tensor) -> Tensor:
    """An upper-triangular W with W W^T = covariance^-1 (scikit-learn's ``precisions_cholesky_``), float64."""
    lower, info = torch.linalg.cholesky_ex(covariance)
    if info != 0:
        raise ConfigError("gmm: a class covariance is not positive definite; raise reg (e.g. reg=1e-4)")
    identity = torch.eye(len(covariance), dtype=covariance.dtype)
    return torch.linalg.solve_triangular(lower, identity, upper=False).T
