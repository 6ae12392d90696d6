"""The benchmark registry: the built-in benchmarks, and ``get_benchmark`` for a name or a YAML file."""

from __future__ import annotations

from pathlib import Path

from oodforge.data.benchmark import VAL_HOLDOUT, Benchmark, Images, adapt, same_source
from oodforge.data.benchmark_file import load_benchmark_file
from oodforge.util.registry import Registry

__all__ = ["BENCHMARKS", "Benchmark", "Images", "adapt", "get_benchmark", "same_source"]


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _register(benchmark: Benchmark) -> None:
    BENCHMARKS.register(benchmark.name)(lambda: benchmark)


def _val(**sets: tuple[str, str, str]) -> dict:
    """Validation OOD sets: name -> (dataset, split, group); ID validation is a hold-out of the training split."""
    return {"id": {"holdout": VAL_HOLDOUT},
            "ood": {n: {"data": d, "split": split, "group": g} for n, (d, split, g) in sets.items()}}


_register(Benchmark("fashion_mnist", "fashion_mnist", {"mnist": "far", "notmnist": "far", "gaussian": "far"},
                    (28, 28, 1), (0.2860,), (0.3530,),
                    val=_val(mnist_train=("mnist", "train", "far"), uniform_val=("uniform", "train", "far"),
                             patches_val=("natural_patches", "train", "far"))))
_register(Benchmark("mnist", "mnist", {"fashion_mnist": "far", "notmnist": "far", "gaussian": "far"},
                    (28, 28, 1), (0.1307,), (0.3081,),
                    val=_val(fashion_mnist_train=("fashion_mnist", "train", "far"),
                             uniform_val=("uniform", "train", "far"), patches_val=("natural_patches", "train", "far"))))
_register(Benchmark("cifar10", "cifar10",
                    {"tiny_imagenet": "near", "mnist": "far", "dtd": "far", "gaussian": "far"},
                    (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    augment="crop_flip", default_backbone="resnet20",
                    val=_val(patches_val=("natural_patches_b", "train", "near"), mnist_train=("mnist", "train", "far"),
                             uniform_val=("uniform", "train", "far"))))
_register(Benchmark("cifar10_oe", "cifar10",
                    {"tiny_imagenet_b": "near", "mnist": "far", "dtd": "far", "gaussian": "far"},
                    (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                    augment="crop_flip", default_backbone="resnet20",
                    notes={"outliers": "train outliers from tiny_imagenet_a (disjoint classes)"},
                    val=_val(patches_val=("natural_patches_b", "train", "near"), mnist_train=("mnist", "train", "far"),
                             uniform_val=("uniform", "train", "far"))))


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as ``name``, or the one a ``.yaml``/``.yml`` file describes."""
    if name.endswith((".yaml", ".yml")):
        return load_benchmark_file(Path(name))
    return BENCHMARKS.create(name)
