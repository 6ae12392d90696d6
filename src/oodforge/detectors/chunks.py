"""Row chunks over training outputs that may be larger than memory (memory-mapped, say).

Detectors reduce over training features a chunk at a time, so no full-size copy is ever made.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oodforge.util.errors import ConfigError

CHUNK_BYTES = 256 << 20  # default row chunk: its float64 copy takes at most 256 MiB
CHUNK_ROWS = 8192  # fixed row block of detectors that score in float64 (8192 x 2048 x 8 B = 128 MiB)


def default_chunk_rows(dim: int) -> int:
    """How many rows of width ``dim`` fit ``CHUNK_BYTES`` in float64 (at least one)."""
    return max(1, CHUNK_BYTES // (8 * max(1, dim)))


def exporting() -> bool:
    """Whether a graph is being traced for export (ONNX, TorchScript): detectors then score unchunked, so that the
    exported graph works for any batch size."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def row_slices(rows: int, dim: int, chunk_rows: int | None = None) -> list[slice]:
    """Consecutive row ranges covering ``rows`` rows, ``chunk_rows`` each (default: ``default_chunk_rows(dim)``);
    one range over every row while a graph is exported. Pass ``x.shape[0]``, not ``len(x)``, for a batch that may
    be traced: ``len`` fixes an exported graph's batch size."""
    if exporting():
        return [slice(None)]
    step = default_chunk_rows(dim) if chunk_rows is None else chunk_rows
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def check_chunk_rows(chunk_rows: int | None) -> None:
    """Raise a ValueError unless ``chunk_rows`` is None or a positive integer."""
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ConfigError(f"chunk_rows must be None or an integer >= 1, got {chunk_rows!r}")


def column_mean(features: Tensor, chunk_rows: int | None = None) -> Tensor:
    """The float64 mean of the rows of ``features`` (N, D), summed a chunk at a time."""
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for rows in row_slices(len(features), features.shape[1], chunk_rows):
        total += features[rows].to(torch.float64).sum(dim=0)
    return total / len(features)
