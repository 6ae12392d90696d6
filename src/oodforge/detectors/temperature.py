"""Temperature scaling (Guo et al. 2017): MSP of logits / T, with T fitted by minimizing the ID NLL."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import CHUNK_ROWS, row_slices
from oodforge.util.errors import ConfigError

T_MIN, T_MAX = 1e-2, 1e2  # the fitted temperature is searched in [T_MIN, T_MAX]


@DETECTORS.register("temperature")
class TemperatureScaling(Detector):
    """Score = max_c softmax(f(x) / T)_c, T = argmin_T mean NLL(softmax(f / T), y) over the fitting outputs.

    ``fit`` needs labelled outputs: pass held-out ID validation outputs when you have them (the usual
    recipe, as OpenOOD's ``temp_scaling`` postprocessor does with its ``val`` split); training outputs
    of an overfitted network give a T that is too small. The NLL is convex in beta = 1 / T, so T is
    found by a safeguarded Newton search on beta (exact first and second derivatives, bisection when a
    step leaves the bracket), in float64, reading the logits ``CHUNK_ROWS`` rows at a time; T is
    clipped to [0.01, 100]. OpenOOD runs 50 LBFGS steps on T from 1.5 instead, aiming at the same optimum.
    ``temperature`` fixes T instead of fitting it (labels then are not needed, but ``fit`` still runs).
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "train")
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, temperature: float | None = None) -> None:
        self.temperature = temperature

    def _check(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"temperature: temperature must be > 0 or None (fit it), got {self.temperature}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        if self.temperature is not None:
            self.temperature_ = float(self.temperature)
            return
        logits, labels = train.logits.detach(), train.labels
        if labels is None:
            raise ConfigError("temperature: fitting T needs labelled outputs (ID validation or training data)")
        if logits.ndim != 2 or len(logits) == 0 or labels.shape != (len(logits),):
            raise ConfigError(f"temperature: need non-empty (N, C) logits and (N,) labels, got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        if bool((labels < 0).any()) or bool((labels >= logits.shape[1]).any()):
            raise ConfigError(f"temperature: labels must be class indices in [0, {logits.shape[1] - 1}]")
        self.temperature_ = fit_temperature(logits, labels)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        logits = outputs.logits.detach()
        parts = [torch.softmax(logits[rows].double() / self.temperature_, dim=1).max(dim=1).values
                 for rows in row_slices(logits.shape[0], logits.shape[1], CHUNK_ROWS)]
        return torch.cat(parts).float() if parts else logits.new_zeros(0, dtype=torch.float32)


def fit_temperature(logits: Tensor, labels: Tensor, tol: float = 1e-12, max_iter: int = 100) -> float:
    """The T in [T_MIN, T_MAX] that minimizes the mean NLL of softmax(logits / T) at ``labels``."""
    low, high = 1.0 / T_MAX, 1.0 / T_MIN  # bracket on beta = 1 / T; dNLL/dbeta is increasing
    if nll_derivatives(logits, labels, low)[0] >= 0:
        return T_MAX
    if nll_derivatives(logits, labels, high)[0] <= 0:
        return T_MIN
    beta = 1.0
    for _ in range(max_iter):
        slope, curvature = nll_derivatives(logits, labels, beta)
        if slope == 0:
            break
        low, high = (low, beta) if slope > 0 else (beta, high)
        step = beta - slope / curvature if curvature > 0 else math.nan
        candidate = step if low < step < high else math.sqrt(low * high)
        converged = abs(candidate - beta) <= tol * beta
        beta = candidate
        if converged:
            break
    return 1.0 / beta


def nll_derivatives(logits: Tensor, labels: Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative in beta of mean_i [logsumexp(beta z_i) - beta z_i,y_i]."""
    slope = curvature = 0.0
    for start in range(0, len(logits), CHUNK_ROWS):
        z = logits[start:start + CHUNK_ROWS].double()
        y = labels[start:start + CHUNK_ROWS].to(z.device, torch.long)
        probs = torch.softmax(beta * z, dim=1)
        mean = (probs * z).sum(dim=1)
        slope += (mean - z.gather(1, y[:, None]).squeeze(1)).sum().item()
        curvature += (probs * (z - mean[:, None]).square()).sum().item()
    return slope / len(logits), curvature / len(logits)
