"""oodforge: train, synthesize, score and benchmark OOD detectors for PyTorch image classifiers.

The public Python API (names load on first use, so ``import oodforge`` stays light)::

    import oodforge
    model = oodforge.wrap_model(torchvision_net)
    results = oodforge.evaluate_ood(model, train_loader, test_loader, {"textures": dtd_loader})
"""

from __future__ import annotations

import importlib

_API = {
    "wrap_model": "oodforge.models.adapters",
    "build_model": "oodforge.models.adapters",
    "extract_outputs": "oodforge.evaluation.extraction",
    "evaluate_ood": "oodforge.runs.pipeline",
    "create_detector": "oodforge.detectors",
    "DETECTORS": "oodforge.detectors",
    "Detector": "oodforge.detectors",
    "ModelOutputs": "oodforge.detectors",
    "OODResults": "oodforge.runs.results",
    "get_benchmark": "oodforge.data.benchmarks",
    "load_dataset": "oodforge.data.datasets",
    "TrainConfig": "oodforge.training.config",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'oodforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
