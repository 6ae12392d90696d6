"""Score math shared by losses and detectors: energy, cosine to class centres, normalized class means.

Imports only torch, so ``losses/`` and ``detectors/`` can both use it without depending on each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy, T * logsumexp(f / T): higher = more in-distribution."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


def cosine_to_centres(features: Tensor, centres: Tensor) -> Tensor:
    """Cosine similarity of every feature row to every centre, shape (N, C)."""
    if features.ndim != 2 or centres.ndim != 2:
        raise ValueError(
            f"features and centres must be 2-D, got shapes {tuple(features.shape)} and {tuple(centres.shape)}"
        )
    if features.shape[1] != centres.shape[1]:
        raise ValueError(f"features have dimension {features.shape[1]} but centres have {centres.shape[1]}")
    return F.normalize(features, dim=1) @ F.normalize(centres, dim=1).T


def representation_score(features: Tensor, centres: Tensor) -> Tensor:
    """R(x) = max_c cos(h(x), mu_c), shape (N,)."""
    return cosine_to_centres(features, centres).max(dim=1).values


def normalized_class_means(features: Tensor, labels: Tensor) -> Tensor:
    """Means of the L2-normalized features of each class present in ``labels``, shape (K, D)."""
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {features.shape[0]} feature rows")
    normalized = F.normalize(features.float(), dim=1)
    classes, inverse = torch.unique(labels, return_inverse=True)
    sums = normalized.new_zeros(len(classes), normalized.shape[1]).index_add_(0, inverse, normalized)
    counts = torch.bincount(inverse, minlength=len(classes)).to(sums.dtype)
    return sums / counts[:, None]
