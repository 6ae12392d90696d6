"""The contract between output extraction and the detectors (imports only torch): ``ModelOutputs``, what one
forward pass gives, and the classifier interface detectors expect of a model (``has_interface``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class ModelOutputs:
    """What one forward pass of a classifier gives for a dataset: logits, penultimate features, labels and, for
    detectors that read intermediate layers, their reduced outputs by key ``<layer>@<reduction>``
    (``oodforge.detectors.layers``)."""

    logits: Tensor  # (N, C)
    features: Tensor  # (N, D)
    labels: Tensor | None = None  # (N,), absent for unlabeled OOD sets
    layers: dict[str, Tensor] = field(default_factory=dict)  # key -> (N, ...) reduced layer outputs

    def __len__(self) -> int:
        return self.logits.shape[0]

    def to(self, device: torch.device | str) -> ModelOutputs:
        """The same outputs on ``device``."""
        labels = None if self.labels is None else self.labels.to(device)
        return ModelOutputs(self.logits.to(device), self.features.to(device), labels,
                            {k: v.to(device) for k, v in self.layers.items()})

    def with_layers(self, layers: dict[str, Tensor]) -> ModelOutputs:
        """The same outputs with ``layers`` added (each must have one row per output row)."""
        for key, values in layers.items():
            if values.shape[0] != len(self):
                raise ValueError(f"layer {key!r} has {values.shape[0]} rows, the outputs {len(self)}")
        return ModelOutputs(self.logits, self.features, self.labels, {**self.layers, **layers})

    @staticmethod
    def cat(parts: list[ModelOutputs]) -> ModelOutputs:
        """Concatenate outputs of consecutive batches."""
        labels = None if parts[0].labels is None else torch.cat([p.labels for p in parts])
        layers = {key: torch.cat([p.layers[key] for p in parts]) for key in parts[0].layers}
        return ModelOutputs(
            torch.cat([p.logits for p in parts]), torch.cat([p.features for p in parts]), labels, layers
        )


def has_interface(model: nn.Module) -> bool:
    """Whether ``model`` has ``features_and_logits``, or ``features`` and a ``head`` module."""
    return callable(getattr(model, "features_and_logits", None)) or (
        callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Module))
