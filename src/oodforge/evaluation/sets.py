"""The benchmark runner: outputs once per dataset, every detector on every OOD set, metrics, files."""

from __future__ import annotations

from pathlib import Path

from oodforge.data.benchmark import Benchmark
from oodforge.evaluation.extraction import Images


def scored_sets(benchmark: Benchmark, root: str | Path | None = None) -> dict[str, Images]:
    """The ID test set and every OOD test set of ``benchmark``, by name."""
    return {benchmark.id_dataset: benchmark.id_set("test", root)} | {n: benchmark.ood_set(n, root)
                                                                     for n in benchmark.ood}


def fit_images(benchmark: Benchmark, root: str | Path | None = None, train_subset: int | None = None,
               tune: bool = False) -> Images:
    """The ID training images detectors fit on: the training split (less the ID validation hold-out when
    tuning), ``train_subset`` class-balanced images of it if given (as in training)."""
    images = benchmark.split_train(root)[0] if tune else benchmark.id_set("train", root)
    return images.balanced_head(train_subset) if train_subset else images


def evaluated_sets(benchmark: Benchmark, root: str | Path | None = None, train_subset: int | None = None,
                   tune: bool = False) -> dict[str, Images]:
    """Every set an evaluation reads: the scored test sets, the images detectors fit on and, when tuning,
    the ID and OOD validation sets (keys ``test:<name>``, ``fit``, ``val:id``, ``val:<name>``)."""
    sets = {f"test:{name}": images for name, images in scored_sets(benchmark, root).items()}
    sets["fit"] = fit_images(benchmark, root, train_subset, tune)
    if tune:
        sets["val:id"] = benchmark.split_train(root)[1]
        sets |= {f"val:{name}": images for name, images in benchmark.val_ood_sets(root).items()}
    return sets
