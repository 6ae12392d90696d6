"""The detector API: configure in ``__init__``, learn in ``fit``, score with higher = more ID."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.registry import Registry


@dataclass
class ModelOutputs:
    """What one forward pass of a classifier gives for a dataset: logits, penultimate features, labels."""

    logits: Tensor  # (N, C)
    features: Tensor  # (N, D)
    labels: Tensor | None = None  # (N,), absent for unlabeled OOD sets

    def __len__(self) -> int:
        return self.logits.shape[0]

    def to(self, device: torch.device | str) -> ModelOutputs:
        """The same outputs on ``device``."""
        labels = None if self.labels is None else self.labels.to(device)
        return ModelOutputs(self.logits.to(device), self.features.to(device), labels)

    @staticmethod
    def cat(parts: list[ModelOutputs]) -> ModelOutputs:
        """Concatenate outputs of consecutive batches."""
        labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
        return ModelOutputs(
            torch.cat([p.logits for p in parts]), torch.cat([p.features for p in parts]), labels
        )


class NotFittedError(RuntimeError):
    """Raised when ``score`` is called on a detector that needs ``fit`` first."""


class Detector:
    """Base class of OOD detectors. ``score_outputs`` returns shape (N,), higher = more in-distribution.

    Subclasses set ``needs_fit`` when they learn from ID training outputs, and ``needs_inputs``
    when they need the raw inputs and the model (ODIN) rather than cached outputs.
    """

    needs_fit: ClassVar[bool] = False
    needs_inputs: ClassVar[bool] = False

    def fit(self, train: ModelOutputs, model: nn.Module | None = None) -> Detector:
        """Learn from ID training outputs (and the model, for detectors that reuse its head)."""
        self.model_ = model if model is None or hasattr(model, "head") else _wrapped_if_possible(model)
        self._fit(train)
        self.fitted_ = True
        return self

    def _fit(self, train: ModelOutputs) -> None:
        """Override to learn state into attributes ending in ``_``."""

    def check_fitted(self) -> None:
        """Raise ``NotFittedError`` if this detector needs ``fit`` and has not had it."""
        if self.needs_fit and not getattr(self, "fitted_", False):
            raise NotFittedError(f"{type(self).__name__} must be fit on ID training data before scoring")

    def score_outputs(self, outputs: ModelOutputs) -> Tensor:
        """Scores from precomputed outputs, shape (N,)."""
        self.check_fitted()
        return self._score(outputs).reshape(-1)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        """Scores of a batch of inputs ``x`` under ``model`` (any classifier), shape (N,)."""
        with torch.no_grad():
            features, logits = features_and_logits(model, x)
        return self.score_outputs(ModelOutputs(logits, features.flatten(1)))


def classifier_view(model: nn.Module) -> nn.Module:
    """``model`` if it has oodforge's classifier interface (``features_and_logits``, or ``features`` and
    ``head``), else ``wrap_model(model)``."""
    if callable(getattr(model, "features_and_logits", None)) or (
            callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Module)):
        return model
    from oodforge.models.adapters import wrap_model

    return wrap_model(model)


def _wrapped_if_possible(model: nn.Module) -> nn.Module:
    """A plain network's wrapper (so detectors find its final layer as ``.head``), else ``model`` itself."""
    try:
        return classifier_view(model)
    except ValueError:  # no final linear layer: detectors that need one say so themselves
        return model


def features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(penultimate features, logits) of any classifier on a batch, from one forward pass."""
    model = classifier_view(model)
    if callable(getattr(model, "features_and_logits", None)):
        return model.features_and_logits(x)
    features = model.features(x)
    return features, model.head(features)


DETECTORS: Registry[Detector] = Registry("detector")


def create_detector(name: str, **kwargs) -> Detector:
    """Build the detector registered as ``name``."""
    return DETECTORS.create(name, **kwargs)
