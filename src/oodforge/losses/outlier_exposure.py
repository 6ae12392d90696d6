"""Outlier exposure (Hendrycks et al. 2019): push outliers' softmax towards uniform."""

from __future__ import annotations

import torch
from torch import Tensor


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Mean over samples of CE(uniform, softmax(logits)) = -mean_j log p_j (KL to uniform + log C)."""
    return -torch.log_softmax(logits, dim=1).mean(dim=1).mean()
