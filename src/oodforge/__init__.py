"""oodforge: train, synthesize, score and benchmark OOD detectors for PyTorch image classifiers.

The public Python API (``oodforge.api``; names load on first use, so ``import oodforge`` stays light)::

    import oodforge
    model = oodforge.wrap_model(torchvision_net)
    results = oodforge.evaluate_ood(model, train_loader, test_loader, {"textures": dtd_loader})
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load lazily below
    from oodforge.api import (
        DETECTORS,
        Detector,
        Evaluation,
        Guard,
        ModelOutputs,
        OODResults,
        OutputCache,
        Prediction,
        Preprocessing,
        TrainConfig,
        build_guard,
        build_model,
        create_detector,
        evaluate,
        evaluate_ood,
        export_guard,
        extract_outputs,
        get_benchmark,
        load_dataset,
        load_guard,
        load_model,
        parse_detector_spec,
        train,
        wrap_model,
    )

__all__ = [
    "DETECTORS",
    "Detector",
    "Evaluation",
    "Guard",
    "ModelOutputs",
    "OODResults",
    "OutputCache",
    "Prediction",
    "Preprocessing",
    "TrainConfig",
    "build_guard",
    "build_model",
    "create_detector",
    "evaluate",
    "evaluate_ood",
    "export_guard",
    "extract_outputs",
    "get_benchmark",
    "load_dataset",
    "load_guard",
    "load_model",
    "parse_detector_spec",
    "train",
    "wrap_model",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module 'oodforge' has no attribute {name!r}")
    value = getattr(importlib.import_module("oodforge.api"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
