"""WeiPer+KLD (Granz et al., NeurIPS 2024): perturbed class projections and the KL divergence of per-sample
activation histograms to the training mean."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import check_chunk_rows, row_slices
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError

EPSILON, EPSILON_PERTURBED = 0.01, 0.025  # added to the densities before the KL divergence (official defaults)
EDGE = 1e-8  # the last bin edge is the training maximum plus this, so that the maximum falls inside


@DETECTORS.register("weiper")
class WeiPer(Detector):
    """Score = -(KL(h) + lambda_1 KL(W~ h + b~) - lambda_2 MSP~): WeiPer+KLD.

    WeiPer: each class weight vector w_c of the linear head is perturbed ``repeats`` times, w_c + delta *
    ||w_c|| * n / ||n|| with n ~ N(0, I) (seeded), giving r * C perturbed class projections W~ (bias b
    repeated). For one sample, its D feature values and its r * C perturbed logits are each binned into a
    histogram of ``bins`` equal bins between the minimum and maximum over all training values (values
    outside are dropped; each histogram holds the fraction of the sample's values per bin). KL is the
    symmetric divergence KL(p || q) + KL(q || p) between the mean training histogram p and the sample's
    histogram q smoothed by a moving average over ``smoothing`` bins (``smoothing_perturbed`` for the
    perturbed logits; edges replicated), after adding 0.01 (0.025) to every bin and normalizing both.
    MSP~ is the maximum softmax probability averaged over the r perturbed heads. Source: Granz et al.,
    "WeiPer: OOD Detection using Weight Perturbations of Class Projections" (NeurIPS 2024,
    arXiv:2405.17164) and the authors' OpenOOD integration (github.com/mgranz/weiper_icml,
    ``weiper_kldiv_postprocessor.py`` and ``weiper_kldiv/utils.py``: ``calculate_weiper_space``,
    ``batch_histogram``, ``kldiv``, ``UniformKernel``; the defaults here are that code's defaults, with the
    exact training minima and maxima). The perturbations are drawn once at ``fit`` (that code's postprocessor
    can draw fresh ones for each test batch) and regenerated from ``seed`` when a saved detector is loaded. Needs
    ``fit(train, model)`` with a linear head; runs in float64, ``chunk_rows`` rows at a time (default:
    256 MiB of float64 perturbed logits per chunk).
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"delta": [1.5, 2.1, 2.5], "lambda_1": [0.1, 1.0, 2.5],
                                               "lambda_2": [0.1, 1.0, 5.0], "smoothing": [5, 20, 40],
                                               "smoothing_perturbed": [5, 20, 40]}

    def __init__(self, delta: float = 2.1, repeats: int = 100, bins: int = 100, smoothing: int = 20,
                 smoothing_perturbed: int = 20, lambda_1: float = 1.0, lambda_2: float = 1.0, seed: int = 0,
                 chunk_rows: int | None = None) -> None:
        self.delta = delta
        self.repeats = repeats
        self.bins = bins
        self.smoothing = smoothing
        self.smoothing_perturbed = smoothing_perturbed
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.seed = seed
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not self.delta >= 0:
            raise ConfigError(f"weiper: delta must be >= 0, got {self.delta}")
        for name in ("repeats", "bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"weiper: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("smoothing", "smoothing_perturbed"):
            if not 1 <= getattr(self, name) <= self.bins:
                raise ConfigError(f"weiper: {name} must be in [1, bins={self.bins}], got {getattr(self, name)}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        weight, bias = linear_head(self.model_, "weiper")
        features = train.features.detach()
        if features.ndim != 2 or len(features) == 0 or features.shape[1] != weight.shape[1]:
            raise ConfigError(f"weiper: train features must be non-empty (N, {weight.shape[1]}) to match the head, "
                              f"got {tuple(features.shape)}")
        self.weight_, self.bias_ = weight.to(features.device), bias.to(features.device)
        self._perturbed = None
        low = torch.full((2,), torch.inf, dtype=torch.float64, device=features.device)
        high = -low
        for chunk, perturbed in self._spaces(features):
            for k, values in enumerate((chunk, perturbed)):
                low[k], high[k] = torch.minimum(low[k], values.min()), torch.maximum(high[k], values.max())
        self.low_, self.high_ = low, high
        sums = [torch.zeros(self.bins, dtype=torch.float64, device=features.device) for _ in range(2)]
        for chunk, perturbed in self._spaces(features):
            for k, values in enumerate((chunk, perturbed)):
                sums[k] += self._histograms(values, k).sum(dim=0)
        self.train_density_ = sums[0] / len(features)
        self.train_density_perturbed_ = sums[1] / len(features)

    def perturbed_head(self) -> tuple[Tensor, Tensor]:
        """The r * C perturbed class projections W~ (r * C, D) and their biases (r * C,): row i * C + c is
        w_c + delta ||w_c|| n_ic / ||n_ic||, drawn from ``seed`` (float64)."""
        if getattr(self, "_perturbed", None) is None:
            classes, dim = self.weight_.shape
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(self.repeats, classes, dim, generator=generator, dtype=torch.float64)
            weight = self.weight_.cpu()
            noise = F.normalize(noise, dim=2) * (self.delta * weight.norm(dim=1))[None, :, None]
            perturbed = (weight[None] + noise).reshape(self.repeats * classes, dim)
            self._perturbed = (perturbed.to(self.weight_.device), self.bias_.repeat(self.repeats))
        return self._perturbed

    def _spaces(self, features: Tensor):
        """(features, perturbed logits) of consecutive row chunks, float64."""
        weight, bias = (t.to(features.device) for t in self.perturbed_head())
        for rows in row_slices(features.shape[0], max(features.shape[1], weight.shape[0]), self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            yield chunk, chunk @ weight.T + bias

    def _histograms(self, values: Tensor, space: int) -> Tensor:
        """Per row, the fraction of its values in each of ``bins`` bins over the training range of ``space``
        (0: features, 1: perturbed logits), shape (rows, bins)."""
        low, high = self.low_[space].to(values.device), self.high_[space].to(values.device)
        edges = torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64, device=values.device)
        edges = low + edges * (high + EDGE - low)
        index = torch.bucketize(values, edges, right=True)  # 0: below, bins + 1: above the range
        counts = values.new_zeros(values.shape[0], self.bins + 2).scatter_add_(1, index, torch.ones_like(values))
        return counts[:, 1:-1] / values.shape[1]

    def _divergence(self, density: Tensor, train_density: Tensor, smoothing: int, epsilon: float) -> Tensor:
        """Symmetric KL divergence between the training mean and each row's smoothed density, shape (rows,)."""
        left = (smoothing - 1) // 2
        padded = F.pad(density[:, None, :], (left, smoothing - 1 - left), mode="replicate")
        q = F.avg_pool1d(padded, smoothing, stride=1)[:, 0] + epsilon
        p = (train_density.to(density.device) + epsilon)[None]
        p, q = p / p.sum(dim=1, keepdim=True), q / q.sum(dim=1, keepdim=True)
        return ((p - q) * (p.log() - q.log())).sum(dim=1)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        classes, dim = self.weight_.shape
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"weiper: features must have shape (N, {dim}), got {tuple(features.shape)}")
        parts = []
        for chunk, perturbed in self._spaces(features):
            divergence = self._divergence(self._histograms(chunk, 0), self.train_density_, self.smoothing, EPSILON)
            divergence_perturbed = self._divergence(self._histograms(perturbed, 1), self.train_density_perturbed_,
                                                    self.smoothing_perturbed, EPSILON_PERTURBED)
            msp = torch.softmax(perturbed.reshape(len(chunk), self.repeats, classes), dim=2).amax(dim=2).mean(dim=1)
            parts.append(-(divergence + self.lambda_1 * divergence_perturbed - self.lambda_2 * msp))
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()
