"""Batches of training inputs for detectors that fit on the inputs themselves (``fits_on_inputs``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset


def training_subset(batches: Iterable, count: int, seed: int = 0) -> Iterable:
    """At most ``count`` of the images in ``batches``: a seeded uniform draw from a DataLoader's dataset (only
    those are loaded), else the first ``count`` rows."""
    dataset = getattr(batches, "dataset", None)
    if isinstance(batches, DataLoader) and hasattr(dataset, "__len__"):
        if count >= len(dataset):
            return batches
        rows = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].sort().values
        return DataLoader(Subset(dataset, rows.tolist()), batch_size=batches.batch_size or 1,
                          num_workers=batches.num_workers, collate_fn=batches.collate_fn,
                          pin_memory=batches.pin_memory)
    return _first_rows(batches, count)


def _first_rows(batches: Iterable, count: int) -> Iterator:
    left = count
    for batch in batches:
        if left <= 0:
            return
        x, y = _split(batch)
        yield (x[:left], None if y is None else y[:left])
        left -= len(x)


def _split(batch: object) -> tuple[Tensor, Tensor | None]:
    x, y = (batch[0], batch[1]) if isinstance(batch, list | tuple) and len(batch) > 1 else (batch, None)
    return (x[0] if isinstance(x, list | tuple) else x), y


def input_batches(batches: Iterable, model: nn.Module) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(x, y or None) of each batch, ``x`` on the model's device, the model in eval mode meanwhile."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x, y = _split(batch)
            yield x.to(device), None if y is None else torch.as_tensor(y).long().to(device)
    finally:
        model.train(was_training)
