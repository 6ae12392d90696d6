"""Batch index samplers: plain shuffled batches, or SIO's real + synthetic mix (design.md §3 "SIO")."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from oodforge.util.errors import ConfigError


class MixedBatchSampler(Sampler[list[int]]):
    """Batches of ``round(B * real_ratio)`` real and ``B - round(B * real_ratio)`` synthetic indices.

    Real indices are ``0..n_real-1`` and synthetic ones ``n_real..n_real+n_synthetic-1`` (as in a
    ``ConcatDataset([real, synthetic])``). An epoch is ``ceil(n_real / B)`` batches; each source is
    drawn from its own reshuffled permutation, wrapping around when used up. Without synthetic images
    (``n_synthetic = 0``) this is a plain shuffled batch sampler whose last batch may be smaller.
    With ``world_size > 1`` each rank yields every ``world_size``-th batch of the same sequence.
    """

    def __init__(self, n_real: int, batch_size: int, n_synthetic: int = 0, real_ratio: float = 1.0,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if n_real <= 0 or batch_size <= 0:
            raise ConfigError(f"need n_real > 0 and batch_size > 0, got {n_real} and {batch_size}")
        if not 0.0 < real_ratio <= 1.0:
            raise ConfigError(f"real_ratio must be in (0, 1], got {real_ratio}")
        self.n_real, self.n_synthetic, self.batch_size = n_real, n_synthetic, batch_size
        self.real_per_batch = batch_size if n_synthetic == 0 else round(batch_size * real_ratio)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use a different shuffle for each epoch (same on every rank)."""
        self.epoch = epoch

    def __len__(self) -> int:
        total = math.ceil(self.n_real / self.batch_size)
        return len(range(self.rank, total, self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = math.ceil(self.n_real / self.batch_size)
        if self.n_synthetic == 0:
            order = torch.randperm(self.n_real, generator=generator).tolist()
            batches = (order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(total))
        else:
            real = _endless(self.n_real, generator, 0)
            synthetic = _endless(self.n_synthetic, generator, self.n_real)
            n_syn = self.batch_size - self.real_per_batch
            batches = ([next(real) for _ in range(self.real_per_batch)] + [next(synthetic) for _ in range(n_syn)]
                       for _ in range(total))
        for i, batch in enumerate(batches):
            if i % self.world_size == self.rank:
                yield batch


def _endless(n: int, generator: torch.Generator, offset: int) -> Iterator[int]:
    while True:
        for index in torch.randperm(n, generator=generator).tolist():
            yield index + offset
