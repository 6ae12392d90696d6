"""Weighted energy (VOS, Du et al. 2022): class weights on the energy, fitted on virtual outliers post hoc."""

from __future__ import annotations

from typing import ClassVar

import torch
from scipy.stats import chi2
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError

COVARIANCE_RIDGE = 1e-4  # VOS adds 0.0001 * I to the class-conditional covariance
MAX_ID_ROWS = 100_000  # training rows used for the weight fit (a seeded random subset of larger sets)


@DETECTORS.register("weighted_ebo")
class WeightedEBO(Detector):
    """Score = log sum_c w_c exp(f_c(x)), the negative weighted energy, with w_c = relu(v_c) >= 0 fitted post hoc.

    VOS learns the class weights v during training, together with a logistic regression that tells the
    weighted energy of ID features from that of virtual outliers. Here the network stays frozen and the same
    objective is fitted after training: class-conditional Gaussians N(mu_c, S) with the tied covariance S of
    the class-centred training features (divided by N) plus 1e-4 I, as in VOS; each virtual outlier of class
    c is the least likely of ``samples`` draws from its Gaussian (VOS: ``sample_from`` = 10000, ``select`` =
    1), drawn exactly: a uniform direction at Mahalanobis radius sqrt(F^-1(U^(1/samples))), F the chi-square
    CDF with D degrees of freedom (the largest radius of ``samples`` draws), ``outliers`` per class; their
    logits come from the linear head. v (initialized to 1, i.e. plain energy) and a logistic regression
    sigma(a s + b) on the score s are then fitted by L-BFGS (``steps`` iterations, float64) to the
    class-balanced binary cross-entropy of up to 100000 training rows (ID) against the virtual outliers.
    The slope a is kept positive (a = exp(alpha); VOS leaves it free, its trained network giving outliers
    lower energy): on a frozen network whose virtual outliers have the higher energy, the fit then stays
    near plain energy rather than turning the score's direction around.
    pytorch-ood's ``WeightedEBO`` scores with given weights (its outlier score is the negative of this);
    with the fitted weights the scores are equal. Source: Du et al., "VOS: Learning What You Don't
    Know by Virtual Outlier Synthesis" (ICLR 2022, arXiv:2202.01197, eq. 5-7; code
    github.com/deeplearning-wisc/vos). Needs labelled training outputs and ``fit(train, model)`` with a
    linear head.
    """

    needs_fit = True
    needs_labels = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"samples": [100, 1000, 10000, 100000]}

    def __init__(self, samples: int = 10000, outliers: int = 200, steps: int = 100, seed: int = 0) -> None:
        self.samples = samples
        self.outliers = outliers
        self.steps = steps
        self.seed = seed

    def _check(self) -> None:
        for name in ("samples", "outliers", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"weighted_ebo: {name} must be >= 1, got {getattr(self, name)}")

    def _fit(self, train: ModelOutputs) -> None:
        weight, bias = linear_head(self.model_, "weighted_ebo")
        features = train.features.detach().to("cpu", torch.float64)
        labels = train.labels.detach().cpu()
        if features.ndim != 2 or features.shape[1] != weight.shape[1] or labels.shape != (len(features),):
            raise ConfigError(f"weighted_ebo: train features must be (N, {weight.shape[1]}) with labels (N,), got "
                              f"{tuple(features.shape)} and {tuple(labels.shape)}")
        generator = torch.Generator().manual_seed(self.seed)
        outliers = virtual_outliers(features, labels, self.outliers, self.samples, generator)
        id_logits = train.logits.detach().to("cpu", torch.float64)
        if len(id_logits) > MAX_ID_ROWS:
            id_logits = id_logits[torch.randperm(len(id_logits), generator=generator)[:MAX_ID_ROWS]]
        self.weights_ = fit_energy_weights(id_logits, outliers @ weight.T + bias, self.steps)
        if not (self.weights_ > 0).any():
            raise ConfigError("weighted_ebo: every fitted class weight is 0; try more steps or another seed")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        logits = outputs.logits.detach()
        classes = self.weights_.shape[0]
        if logits.ndim != 2 or logits.shape[1] != classes:
            raise ConfigError(f"weighted_ebo: logits must have shape (N, {classes}), got {tuple(logits.shape)}")
        weighted = logits.to(self.weights_.device, torch.float64) + self.weights_.log()
        return torch.logsumexp(weighted, dim=1).float().to(logits.device)


def virtual_outliers(features: Tensor, labels: Tensor, per_class: int, samples: int,
                     generator: torch.Generator) -> Tensor:
    """``per_class`` virtual outliers per class: each the least likely of ``samples`` Gaussian draws, (K * n, D)."""
    classes, inverse = torch.unique(labels, return_inverse=True)
    dim = features.shape[1]
    means = torch.zeros(len(classes), dim, dtype=torch.float64).index_add_(0, inverse, features)
    means /= torch.bincount(inverse, minlength=len(classes)).unsqueeze(1)
    centred = features - means[inverse]
    covariance = centred.T @ centred / len(features) + COVARIANCE_RIDGE * torch.eye(dim, dtype=torch.float64)
    lower = torch.linalg.cholesky(covariance)
    count = len(classes) * per_class
    directions = torch.nn.functional.normalize(torch.randn(count, dim, generator=generator, dtype=torch.float64),
                                               dim=1)
    uniform = torch.rand(count, generator=generator, dtype=torch.float64).clamp(min=1e-300)
    # the largest of `samples` chi-square draws has CDF F^samples: its quantile at U is F^-1(U^(1/samples))
    radii = torch.from_numpy(chi2.isf(-torch.expm1(uniform.log() / samples).numpy(), dim)).sqrt()
    return means.repeat_interleave(per_class, dim=0) + (radii[:, None] * directions) @ lower.T


def fit_energy_weights(id_logits: Tensor, outlier_logits: Tensor, steps: int) -> Tensor:
    """Class weights relu(v) (C,) minimizing the balanced logistic loss of a s + b, s = log sum_c relu(v_c) e^f_c."""
    v = torch.ones(id_logits.shape[1], dtype=torch.float64, requires_grad=True)
    line = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)  # slope exp(line[0]) > 0, intercept
    optimizer = torch.optim.LBFGS([v, line], max_iter=steps, line_search_fn="strong_wolfe")

    def weighted_score(logits: Tensor) -> Tensor:
        top = logits.max(dim=1, keepdim=True).values
        return top.squeeze(1) + ((logits - top).exp() * v.relu()).sum(dim=1).log()

    def loss() -> Tensor:
        optimizer.zero_grad()
        id_part = torch.nn.functional.softplus(-(line[0].exp() * weighted_score(id_logits) + line[1])).mean()
        outlier_part = torch.nn.functional.softplus(line[0].exp() * weighted_score(outlier_logits) + line[1]).mean()
        value = id_part + outlier_part
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return v.detach().relu()
