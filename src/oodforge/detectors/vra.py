"""VRA (Xu et al., NeurIPS 2023): rectify penultimate activations piecewise (zero low, clip high), then energy."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import CHUNK_BYTES, row_slices
from oodforge.detectors.head import linear_head
from oodforge.detectors.react import percentile
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("vra")
class VRA(Detector):
    """Score = logsumexp(W g(h) + b) with the piecewise rectification (VRA-P)

        g(z) = 0 if z < a,   z if a <= z <= b,   b if z > b,

    applied to every penultimate activation z; a and b are the ``alpha``-th and ``beta``-th percentiles of
    the ID training activations (linear interpolation, as ``numpy.percentile``), W and b the linear head.
    With ``per_dimension=True`` (default) every feature dimension gets its own a and b, from its own column
    of training features, as in the authors' code for CIFAR (``torch.quantile(feat, q, dim=0)``, q1 = 0.6,
    q2 = 0.9 for CIFAR-10: the defaults here); ``per_dimension=False`` takes one a and one b over all training
    activations, as OpenOOD v1.5 (``vra_postprocessor.py``) and ReAct do. Source: Xu et al.,
    "VRA: Variational Rectified Activation for Out-of-distribution Detection" (NeurIPS 2023,
    arXiv:2302.11716) and the official code github.com/zeroQiaoba/VRA (``quick_ood.py``: activations below a
    set to 0, above b set to b). OpenOOD v1.5 and pytorch-ood (``pytorch_ood.detector.VRA``) instead clamp
    the low activations up to a (``clip(min=a, max=b)``); this detector follows the paper and sets them to 0.
    The VRA+ shift gamma of the paper is not included. Needs ``fit(train, model)`` with a linear head; the
    logits are recomputed in float64.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"alpha": [10.0, 40.0, 50.0, 60.0, 70.0],
                                               "beta": [85.0, 90.0, 95.0, 99.0]}

    def __init__(self, alpha: float = 60.0, beta: float = 90.0, per_dimension: bool = True,
                 chunk_rows: int = 16384) -> None:
        self.alpha = alpha
        self.beta = beta
        self.per_dimension = per_dimension
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not 0.0 <= self.alpha <= 100.0:
            raise ConfigError(f"vra: alpha must be in [0, 100], got {self.alpha}")
        if not 0.0 <= self.beta <= 100.0:
            raise ConfigError(f"vra: beta must be in [0, 100], got {self.beta}")
        if self.alpha > self.beta:
            raise ConfigError(f"vra: alpha must not exceed beta, got alpha={self.alpha} and beta={self.beta}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"vra: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        weight, bias = linear_head(self.model_, "vra")
        features = train.features.detach()
        if features.ndim != 2 or len(features) == 0 or features.shape[1] != weight.shape[1]:
            raise ConfigError(f"vra: train features must be non-empty (N, {weight.shape[1]}) to match the head, "
                              f"got {tuple(features.shape)}")
        if self.per_dimension:
            low, high = column_percentiles(features, (self.alpha, self.beta))
        else:
            dim = features.shape[1]
            low = torch.full((dim,), percentile(features, self.alpha), dtype=torch.float64)
            high = torch.full((dim,), percentile(features, self.beta), dtype=torch.float64)
        self.low_, self.high_ = low.to(features.device), high.to(features.device)
        self.weight_, self.bias_ = weight.to(features.device), bias.to(features.device)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.weight_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"vra: features must have shape (N, {dim}), got {tuple(features.shape)}")
        device = features.device
        weight, bias = self.weight_.to(device), self.bias_.to(device)
        low, high = self.low_.to(device), self.high_.to(device)
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            rectified = torch.where(chunk < low, torch.zeros_like(chunk), torch.minimum(chunk, high))
            parts.append(energy_score(rectified @ weight.T + bias))
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()


def column_percentiles(features: Tensor, qs: tuple[float, ...]) -> list[Tensor]:
    """The ``q``-th percentile (0..100) of every column of ``features`` (N, D) for each q in ``qs``, float64 (D,),
    linearly interpolated like ``numpy.percentile(..., axis=0)``; columns are sorted a block at a time."""
    rows, dim = features.shape
    block = max(1, CHUNK_BYTES // (8 * max(1, rows)))
    results = [torch.empty(dim, dtype=torch.float64, device=features.device) for _ in qs]
    for start in range(0, dim, block):
        columns = slice(start, min(start + block, dim))
        ordered = features[:, columns].to(torch.float64).sort(dim=0).values
        for result, q in zip(results, qs, strict=True):
            position = q / 100.0 * (rows - 1)
            lower = int(position)
            upper = min(lower + 1, rows - 1)
            result[columns] = ordered[lower] + (position - lower) * (ordered[upper] - ordered[lower])
    return results
