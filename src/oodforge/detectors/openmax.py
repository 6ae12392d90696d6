"""OpenMax (Bendale & Boult 2016): Weibull models of the distances to each class's mean logit vector."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.mahalanobis import squared_distances
from oodforge.util.errors import ConfigError

TRANSLATION = 10000.0  # libMR's FitHigh shifts the tail to start at this value before fitting


@DETECTORS.register("openmax")
class OpenMax(Detector):
    """Score = log(P(known) / P(unknown)) = logsumexp(v) - v_0 of the OpenMax-recalibrated activations.

    Fit: for each class c, its mean activation vector mu_c (MAV) is the mean logit vector of the training
    rows of class c that the model classifies correctly; a Weibull distribution (location 0) is fitted by
    maximum likelihood to the ``tailsize`` largest Euclidean distances ||f - mu_c|| of those rows, each
    shifted by 10000 - (smallest of them), as libMR's ``FitHigh`` does. Score: with rank r_c of class c in
    the logits (0 = largest), omega_c = max(0, (alpha - r_c) / alpha) and w_c = WeibullCDF_c(||f - mu_c||),
    the recalibrated activations are v_c = f_c (1 - omega_c w_c) and v_0 = sum_c f_c omega_c w_c (the
    unknown class); P = softmax(v_0, v_1..v_C). The score is a monotone function of -P(unknown), the
    score of OpenOOD and pytorch-ood (whose ``OpenMax`` returns P(unknown) as outlier score), so it ranks
    the same but does not saturate in float32 when P(unknown) is near 0 or 1.
    ``alpha`` (paper: 10) is clamped to the number of classes. Departures: pytorch-ood fits the MAVs and
    Weibulls on all training rows of each class; the paper and OpenOOD (followed here) only on the correctly
    classified ones; a class with no correctly classified row falls back to all its rows (with a warning);
    a class absent from the training labels gets w_c = 1. Distances are Euclidean (OpenOOD, pytorch-ood),
    not the paper code's ``eucos``. Source: Bendale & Boult, "Towards Open Set Deep Networks" (CVPR 2016,
    arXiv:1511.06233, Alg. 1-2; code github.com/abhijitbendale/OSDN).
    """

    needs_fit = True
    needs_labels = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "train")
    search_space: ClassVar[dict[str, list]] = {"tailsize": [10, 20, 50, 100], "alpha": [1, 2, 3, 5, 10]}

    def __init__(self, tailsize: int = 20, alpha: int = 10) -> None:
        self.tailsize = tailsize
        self.alpha = alpha

    def _check(self) -> None:
        if self.tailsize < 1:
            raise ConfigError(f"openmax: tailsize must be >= 1, got {self.tailsize}")
        if self.alpha < 1:
            raise ConfigError(f"openmax: alpha must be >= 1, got {self.alpha}")

    def _fit(self, train: ModelOutputs) -> None:
        logits = train.logits.detach().to("cpu", torch.float64)
        labels = train.labels.detach().cpu()
        if logits.ndim != 2 or len(logits) == 0 or labels.shape != (len(logits),):
            raise ConfigError(f"openmax: train logits must be non-empty (N, C) with labels (N,), got "
                              f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        classes = logits.shape[1]
        self.alpha_ = size_within(self, "alpha", classes, "classes", warn=False)
        correct = logits.argmax(dim=1) == labels
        self.means_ = torch.zeros(classes, classes, dtype=torch.float64)
        weibull = np.zeros((3, classes))  # rows: shape, scale, shift; a class without rows keeps shape 0 (w = 1)
        for c in range(classes):
            rows = labels == c
            if not rows.any():
                continue
            if not (rows & correct).any():
                warnings.warn(f"openmax: no training row of class {c} is classified correctly; its mean and "
                              "Weibull model use all its rows", stacklevel=3)
            else:
                rows &= correct
            self.means_[c] = logits[rows].mean(dim=0)
            distances = (logits[rows] - self.means_[c]).norm(dim=1).numpy()
            tail = np.sort(distances)[-self.tailsize :]
            shift = TRANSLATION - tail[0]
            weibull[:, c] = (*fit_weibull(tail + shift), shift)
        self.shape_, self.scale_, self.shift_ = torch.from_numpy(weibull)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        logits = outputs.logits.detach()
        classes = self.means_.shape[0]
        if logits.ndim != 2 or logits.shape[1] != classes:
            raise ConfigError(f"openmax: logits must have shape (N, {classes}), got {tuple(logits.shape)}")
        f = logits.to(self.means_.device, torch.float64)
        distances = squared_distances(f, self.means_).sqrt()
        probability = weibull_cdf(distances + self.shift_, self.shape_, self.scale_)
        probability = torch.where(self.shape_ > 0, probability, torch.ones_like(probability))
        ranks = f.argsort(dim=1, descending=True).argsort(dim=1)
        omega = ((self.alpha_ - ranks) / self.alpha_).clamp(min=0.0)
        revised = f * (1.0 - omega * probability)
        unknown = (f - revised).sum(dim=1)
        return (torch.logsumexp(revised, dim=1) - unknown).float().to(logits.device)


def weibull_cdf(x: Tensor, shape: Tensor, scale: Tensor) -> Tensor:
    """1 - exp(-(x / scale)^shape) for x >= 0 (0 below), elementwise with broadcasting."""
    return -torch.expm1(-(x.clamp(min=0.0) / scale).pow(shape))


def fit_weibull(sample: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood (shape, scale) of a two-parameter Weibull (location 0) for positive ``sample``.

    Solves the profile equation 1/k + mean(log x) - sum(x^k log x) / sum(x^k) = 0 for the shape k (on x /
    max x, so that x^k cannot overflow), then scale = (mean x^k)^(1/k). A sample with no spread has no finite
    maximum: its shape is infinite (a step at the common value).
    """
    x = np.asarray(sample, dtype=np.float64)
    top = x.max()
    logs = np.log(x / top)
    if not logs.min() < 0:
        return math.inf, float(top)

    def profile(k: float) -> float:
        powers = np.exp(k * logs)
        return 1.0 / k + logs.mean() - (powers * logs).sum() / powers.sum()

    high = 1.0
    while profile(high) > 0:
        high *= 2.0
    shape = brentq(profile, high / 2.0 if high > 1.0 else 1e-9, high, xtol=1e-12 * high, rtol=1e-14, maxiter=500)
    return shape, float(top * np.mean(np.exp(shape * logs)) ** (1.0 / shape))
