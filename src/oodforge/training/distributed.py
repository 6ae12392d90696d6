"""Training on one or several processes (DDP), then every process helping to extract the outputs that rank 0
scores: the part of ``oodforge train`` that needs every process."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from oodforge.data.benchmark import Benchmark
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.distributed import every_process, prefill_benchmark
from oodforge.training.config import TrainConfig
from oodforge.training.loop import make_fabric, train
from oodforge.util.precision import PRECISIONS


def train_everywhere(config: TrainConfig, out: str | Path, benchmark: Benchmark, resume: bool = True,
                     quiet: bool = False) -> tuple[nn.Module | None, str]:
    """Train ``config`` into ``out`` on the processes its accelerator settings launch; with several, every
    process then extracts a shard of each set the benchmark scores into rank 0's output cache, and every
    process ends its process group. Gives (the model on rank 0, else None; the precision to score in: the
    training precision when oodforge scores in it, else ``32-true``, e.g. after ``16-mixed`` training)."""
    fabric = make_fabric(config)  # launches the DDP processes, if any
    scoring = config.precision if config.precision in PRECISIONS else "32-true"
    with every_process(fabric):  # then every process ends its process group, the finished ones too
        model = train(config, out, resume=resume, quiet=quiet, fabric=fabric)
        if fabric.world_size > 1:
            prefill_benchmark(fabric, model, benchmark, OutputCache(), config.train_subset, scoring)
    return (model if fabric.is_global_zero else None), scoring
