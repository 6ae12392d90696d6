"""The public Python API, in one place: ``import oodforge`` exposes these names (loaded on first use)."""

from __future__ import annotations

from oodforge.data.benchmarks import get_benchmark
from oodforge.data.datasets import load_dataset
from oodforge.detectors import DETECTORS, Detector, create_detector
from oodforge.evaluation.cache import OutputCache
from oodforge.evaluation.extraction import extract_outputs
from oodforge.evaluation.result import Evaluation
from oodforge.evaluation.runner import evaluate
from oodforge.evaluation.specs import parse_detector_spec
from oodforge.models.adapters import build_model, wrap_model
from oodforge.models.loading import load_model
from oodforge.outputs import ModelOutputs
from oodforge.runs.pipeline import evaluate_ood
from oodforge.runs.results import OODResults
from oodforge.training.config import TrainConfig
from oodforge.training.loop import train

__all__ = [
    "DETECTORS",
    "Detector",
    "Evaluation",
    "ModelOutputs",
    "OODResults",
    "OutputCache",
    "TrainConfig",
    "build_model",
    "create_detector",
    "evaluate",
    "evaluate_ood",
    "extract_outputs",
    "get_benchmark",
    "load_dataset",
    "load_model",
    "parse_detector_spec",
    "train",
    "wrap_model",
]
