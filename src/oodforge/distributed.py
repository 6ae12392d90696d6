"""Output extraction split over the processes of a distributed run (Fabric DDP, any backend).

Each of ``world`` processes takes one contiguous shard of the rows (``shard_range``): every row exactly
once. torch's ``DistributedSampler`` instead pads the last shard with repeated rows, which would
duplicate scores. The shards are gathered in rank order with the padding (needed by ``all_gather``, which
wants equal shapes) dropped, so every process gets the outputs a single process would compute.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from oodforge.detectors.base import ModelOutputs
from oodforge.features import Images, compute_outputs


def shard_range(rows: int, rank: int, world: int) -> range:
    """The contiguous rows of process ``rank`` of ``world``; the shards cover ``range(rows)`` once."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    return range(rows * rank // world, rows * (rank + 1) // world)


def gather_rows(part: Tensor, rows: int, fabric) -> Tensor:
    """Every process's ``part`` (its ``shard_range`` rows), concatenated in rank order, padding dropped."""
    world = fabric.world_size
    sizes = [len(shard_range(rows, r, world)) for r in range(world)]
    padded = part.new_zeros((max(sizes), *part.shape[1:]))
    padded[: len(part)] = part
    gathered = fabric.all_gather(padded)  # (world, max(sizes), ...)
    if world == 1:
        gathered = gathered.unsqueeze(0) if gathered.dim() == part.dim() else gathered
    return torch.cat([gathered[r, : sizes[r]] for r in range(world)])


def distributed_outputs(model: nn.Module, images: Images, fabric, device: torch.device | str = "cpu",
                        batch_size: int = 500, quiet: bool = True, precision: str = "32-true") -> ModelOutputs:
    """The outputs of ``model`` on ``images``, each process computing its shard; every process gets them all."""
    rows = len(images)
    shard = shard_range(rows, fabric.global_rank, fabric.world_size)
    part = compute_outputs(model, images.subset(np.arange(shard.start, shard.stop)), device, batch_size, quiet,
                           precision=precision)
    labels = part.labels if part.labels is not None else torch.full((len(part.logits),), -1, dtype=torch.long)
    return ModelOutputs(gather_rows(part.logits.contiguous(), rows, fabric).cpu(),
                        gather_rows(part.features.contiguous(), rows, fabric).cpu(),
                        gather_rows(labels.contiguous(), rows, fabric).cpu())
