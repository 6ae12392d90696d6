"""NNGuide (Park et al., ICCV 2023): energy guided by the similarity to confidence-scaled training features."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.chunks import row_slices
from oodforge.util.errors import ConfigError

SIMILARITY_ELEMENTS = 1 << 24  # at most this many query-bank similarities per block (128 MiB of float64)


@DETECTORS.register("nnguide")
class NNGuide(Detector):
    """Score = energy(x) * mean of the ``k`` largest inner products of h/||h|| with the guidance bank.

    The bank holds the L2-normalized training features of a seeded random subset of the training set
    (``bank_fraction`` of its rows, at least one), each scaled by its own energy logsumexp(f); energy is
    logsumexp of the logits. ``k`` must not exceed the bank size; the default ``k``, when it does, is clamped
    to it with a warning (``base.size_within``). Sources: Park et al., "Nearest Neighbor
    Guidance for Out-of-Distribution Detection" (ICCV 2023, arXiv:2309.14888) and the official code
    github.com/roomo7time/nnguide (ood_detectors/nnguide.py; configs/detector/nnguide.yaml: knn_k = 10;
    dataloaders/datasets_large.py: a shuffled 1% of the training set as the bank). OpenOOD v1.5
    (openood/postprocessors/nnguide_postprocessor.py, configs/postprocessors/nnguide.yml) uses the same
    score with K = 100 and a 1% bank. The bank is gathered ``chunk_rows`` rows at a time and kept in
    float64; its row indices are kept as ``bank_indices_``.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {"k": [10, 100]}
    needs_fit: ClassVar[bool] = True

    def __init__(self, k: int = 10, bank_fraction: float = 0.01, seed: int = 0, chunk_rows: int = 16384) -> None:
        self.k = k
        self.bank_fraction = bank_fraction
        self.seed = seed
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not self.k >= 1:
            raise ConfigError(f"nnguide: k must be >= 1, got {self.k}")
        if not 0 < self.bank_fraction <= 1:
            raise ConfigError(f"nnguide: bank_fraction must be in (0, 1], got {self.bank_fraction}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"nnguide: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        features, logits = train.features.detach(), train.logits.detach()
        if features.ndim != 2 or len(features) == 0 or logits.ndim != 2 or len(logits) != len(features):
            raise ConfigError(f"nnguide: train features (N, D) and logits (N, C) must be non-empty with equal N, "
                             f"got {tuple(features.shape)} and {tuple(logits.shape)}")
        size = max(1, int(len(features) * self.bank_fraction))
        self.bank_indices_ = sample_rows(len(features), size, self.seed)
        parts = []
        for indices in self.bank_indices_.split(self.chunk_rows):
            rows = indices.to(features.device)
            energy = torch.logsumexp(logits[rows.to(logits.device)].to(features.device, torch.float64), dim=1)
            parts.append(F.normalize(features[rows].to(torch.float64), dim=1) * energy[:, None])
        self.bank_ = torch.cat(parts)
        self.k_ = size_within(self, "k", len(self.bank_), f"rows of its guidance bank (bank_fraction="
                                                           f"{self.bank_fraction:g} of {len(features)} training rows)")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features, logits = outputs.features.detach(), outputs.logits.detach()
        dim = self.bank_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"nnguide: features must have shape (N, {dim}), got {tuple(features.shape)}")
        bank = self.bank_.to(features.device)
        block = max(1, min(self.chunk_rows, SIMILARITY_ELEMENTS // len(bank)))
        parts = []
        for rows in row_slices(features.shape[0], dim, block):
            queries = F.normalize(features[rows].to(torch.float64), dim=1)
            guidance = (queries @ bank.T).topk(self.k_, dim=1).values.mean(dim=1)
            energy = torch.logsumexp(logits[rows].to(features.device, torch.float64), dim=1)
            parts.append(energy * guidance)
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()


def sample_rows(rows: int, size: int | None, seed: int) -> Tensor:
    """Sorted indices of a seeded random subset of ``size`` of ``rows`` rows (all rows when ``size`` is None
    or at least ``rows``), int64 on the CPU."""
    if size is None or size >= rows:
        return torch.arange(rows)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(rows, generator=generator)[:size].sort().values
