"""Output extraction split over the processes of a distributed run (Fabric DDP, any backend).

Each of ``world`` processes takes one contiguous shard of the rows (``shard_range``): every row exactly
once. torch's ``DistributedSampler`` instead pads the last shard with repeated rows, which would
duplicate scores. The shards are gathered in rank order with the padding (needed by ``all_gather``, which
wants equal shapes) dropped, so every process gets the outputs a single process would compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from oodforge.detectors.base import ModelOutputs
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import Images, compute_outputs
from oodforge.evaluation.sets import fit_images, scored_sets
from oodforge.util.errors import ConfigError
from oodforge.util.precision import resolve_precision


def shard_range(rows: int, rank: int, world: int) -> range:
    """The contiguous rows of process ``rank`` of ``world``; the shards cover ``range(rows)`` once."""
    if not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, {world}), got {rank}")
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


def prefill_cache(fabric, model: nn.Module, sets: list[Images], cache: OutputCache, device: torch.device | str,
                  batch_size: int = 500, precision: str = "32-true") -> None:
    """Extract every set not yet in rank 0's ``cache`` over all processes and store it there (rank 0 writes).

    Every process must call this with the same sets; rank 0 decides which are missing (broadcast), so
    the collective calls match even when the processes do not share a cache folder.
    """
    precision = resolve_precision(precision, device)
    sync_buffers(model, fabric)
    for images in sets:
        missing = fabric.broadcast(not cache.has(model, images, precision) if fabric.is_global_zero else None, src=0)
        if missing:
            outputs = distributed_outputs(model, images, fabric, device, batch_size, True, precision)
            if fabric.is_global_zero:
                cache.store(model, images, outputs, precision)


def sync_buffers(model: nn.Module, fabric) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics, which DDP does not keep equal:
    each rank updates them with its own batches), so that every shard is scored by the checkpointed model."""
    if fabric.world_size > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def prefill_benchmark(fabric, model: nn.Module, benchmark, cache: OutputCache, train_subset: int | None = None,
                      precision: str = "32-true", batch_size: int = 500) -> None:
    """``prefill_cache`` with every set that scoring ``benchmark`` reads: its test sets and the training
    images detectors fit on (``train_subset`` as in training)."""
    sets = [*scored_sets(benchmark).values(), fit_images(benchmark, train_subset=train_subset)]
    prefill_cache(fabric, model, sets, cache, fabric.device, batch_size, precision)


@contextmanager
def every_process(fabric) -> Iterator[None]:
    """The part of a run that needs every process (training, sharded extraction); on leaving it each process
    ends its process group, so that none exits with gloo's threads still running.

    A process that exits with the group alive can abort at interpreter exit ("terminate called without an
    active exception", in about 1 run in 5 on CPU), and the launcher then kills its peers (exit -9): most
    often when one rank has nothing left to do, e.g. a finished run called again. Leaving normally, every
    process waits for the others at a barrier first; leaving with an error it does not wait (a peer may
    never come), it only ends the group.
    """
    if fabric.world_size == 1:
        yield
        return
    try:
        yield
    except BaseException:
        _end_process_group(wait=False)
        raise
    _end_process_group(wait=True)


def _end_process_group(wait: bool) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
