"""Conformal p-values and decisions from calibration scores (higher score = more in-distribution).

For an input with score ``s`` and ``n`` calibration scores, ``p = (1 + #{calibration scores <= s}) / (n + 1)``.
When the calibration images and the deployed ID images are exchangeable, ``P(p <= alpha) <= alpha``: flagging
``p <= alpha`` as OOD bounds the false-alarm rate on ID data by ``alpha`` (ties count against the input, which
only makes the bound safer).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from oodforge.util.errors import ConfigError


def check_alpha(alpha: float, what: str = "alpha") -> float:
    """``alpha`` as a float when it lies in (0, 1), else one ``ConfigError`` naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"{what} must lie in (0, 1), got {alpha!r}")
    return float(alpha)


def p_values(calibration: Tensor, scores: Tensor) -> Tensor:
    """Conformal p-values of ``scores`` (N,) against sorted ``calibration`` scores (n,), float64 (N,)."""
    calibration = calibration.to(torch.float64)
    counts = torch.searchsorted(calibration, scores.to(torch.float64).contiguous(), right=True)
    return (1.0 + counts.to(torch.float64)) / (len(calibration) + 1.0)


def threshold(calibration: Tensor, alpha: float) -> float:
    """The score below which an input is flagged at level ``alpha`` (``p <= alpha`` exactly when ``s < t``);
    ``-inf`` when ``alpha`` is too small for the calibration size (nothing can be flagged)."""
    rank = math.floor(alpha * (len(calibration) + 1) + 1e-9) - 1
    return float(calibration[rank]) if rank >= 0 else float("-inf")


def minimum_calibration(alpha: float) -> int:
    """The fewest calibration scores with which level ``alpha`` can flag anything: ``ceil(1 / alpha) - 1``."""
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def benjamini_hochberg(p: Tensor, alpha: float) -> Tensor:
    """Which p-values Benjamini-Hochberg rejects at false-discovery rate ``alpha``: bool (N,)."""
    count = len(p)
    if count == 0:
        return torch.zeros(0, dtype=torch.bool)
    order = torch.argsort(p)
    passed = p[order] <= alpha * torch.arange(1, count + 1, dtype=torch.float64) / count
    rejected = torch.zeros(count, dtype=torch.bool)
    if passed.any():
        last = int(torch.nonzero(passed).max())
        rejected[order[: last + 1]] = True
    return rejected


def clopper_pearson(failures: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided binomial interval of a rate ``failures / trials``."""
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2.0
    low = 0.0 if failures == 0 else float(beta.ppf(tail, failures, trials - failures + 1))
    high = 1.0 if failures == trials else float(beta.ppf(1.0 - tail, failures + 1, trials - failures))
    return low, high


def sorted_scores(scores: Tensor | np.ndarray) -> Tensor:
    """Calibration scores as a sorted float64 tensor; non-finite scores are refused."""
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64)).reshape(-1)
    if len(scores) == 0:
        raise ConfigError("the calibration set is empty")
    if not torch.isfinite(scores).all():
        raise ConfigError(f"{int((~torch.isfinite(scores)).sum())} calibration scores are NaN or infinite")
    return torch.sort(scores).values
