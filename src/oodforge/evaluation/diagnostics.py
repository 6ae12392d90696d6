"""Feature-space diagnostics: uniformity and tolerance of L2-normalized features (Wang & Liu 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from oodforge.util.errors import ConfigError


def uniformity(
    features: Tensor, t: float = 2.0, max_samples: int | None = 4096, seed: int = 0, chunk: int = 1024
) -> float:
    """log of the mean over pairs i != j of exp(-t ||z_i - z_j||^2), z = h / ||h||; lower = more uniform.

    The mean runs over ordered pairs i != j, which equals the mean over unordered pairs i < j.
    With more than ``max_samples`` rows, a random subset of ``max_samples`` rows is used, drawn
    without replacement by a ``torch.Generator`` seeded with ``seed`` (so the value is
    reproducible); ``max_samples=None`` uses every row. Computed in float64, ``chunk`` rows at a time.
    """
    z = _normalized(features, "features")
    if max_samples is not None:
        if max_samples < 2:
            raise ConfigError(f"max_samples must be >= 2 or None, got {max_samples}")
        if len(z) > max_samples:
            generator = torch.Generator().manual_seed(seed)
            z = z[torch.randperm(len(z), generator=generator)[:max_samples]]
    n = len(z)
    if n < 2:
        raise ConfigError(f"uniformity needs at least 2 feature vectors, got {n}")
    squared_norms = z.square().sum(dim=1)
    row_sums = []
    for start in range(0, n, chunk):
        block = z[start : start + chunk]
        squared = squared_norms[start : start + chunk, None] + squared_norms[None, :] - 2 * block @ z.T
        exponent = -t * squared.clamp(min=0)
        rows = torch.arange(len(block))
        exponent[rows, rows + start] = -math.inf  # drop the i == j terms
        row_sums.append(torch.logsumexp(exponent, dim=1))
    return (torch.logsumexp(torch.cat(row_sums), dim=0) - math.log(n * (n - 1))).item()


def tolerance(features: Tensor, labels: Tensor) -> float:
    """Mean over classes of the mean within-class pairwise cosine similarity (pairs i != j).

    Averaging: for each class c with n_c >= 2 samples, T_c = mean over the n_c (n_c - 1) ordered
    pairs i != j of z_i . z_j (z = h / ||h||); the result is the unweighted mean of T_c over those
    classes (every class counts once, whatever its size). Classes with a single sample have no pair
    and are left out. Exact, in float64, via sum_{i != j} z_i . z_j = ||sum_i z_i||^2 - sum_i ||z_i||^2.
    """
    z = _normalized(features, "features")
    labels = torch.as_tensor(labels).to(z.device)
    if labels.shape != (len(z),):
        raise ConfigError(f"labels must have shape ({len(z)},), got {tuple(labels.shape)}")
    per_class = []
    for label in torch.unique(labels):
        members = z[labels == label]
        n = len(members)
        if n >= 2:
            pair_sum = members.sum(dim=0).square().sum() - members.square().sum()
            per_class.append(pair_sum / (n * (n - 1)))
    if not per_class:
        raise ConfigError("tolerance needs at least one class with 2 or more samples")
    return torch.stack(per_class).mean().item()


def _normalized(features: Tensor, name: str) -> Tensor:
    """``features`` as float64 (N, D) rows scaled to unit L2 norm (zero rows stay zero)."""
    features = torch.as_tensor(features).detach()
    if features.ndim != 2:
        raise ConfigError(f"{name} must have shape (N, D), got {tuple(features.shape)}")
    return torch.nn.functional.normalize(features.double(), dim=1)
