"""The public Python API, in one place: ``import oodforge`` exposes these names (loaded on first use)."""

from __future__ import annotations

from oodforge.data.benchmarks import get_benchmark
from oodforge.data.datasets import load_dataset
from oodforge.deploy.build import build_guard
from oodforge.deploy.export import export_guard
from oodforge.deploy.guard import Guard, Prediction, load_guard
from oodforge.deploy.inputs import Preprocessing
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
