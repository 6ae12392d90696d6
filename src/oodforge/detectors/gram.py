"""Gram matrices (Sastry & Oore 2020): class-wise ranges of higher-order feature correlations, per layer."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.layers import chosen_layers, layer_key, layer_values
from oodforge.util.errors import ConfigError

EPS = 1e-6


@DETECTORS.register("gram")
class Gram(Detector):
    """Negative total deviation of an image's Gram features from the ranges seen for its predicted class.

    For each layer l and order p = 1..``orders``, the Gram features g_lp (``oodforge.detectors.layers``:
    the signed p-th root of the row sums of F^p F^p^T) are compared with their per-class minimum and maximum
    over the training images predicted as that class (the authors' code; pytorch-ood uses the labels):
    delta_l = sum_p sum_j relu(min - g)/|min + 1e-6| + relu(g - max)/|max + 1e-6|. Each layer's deviation is
    divided by its mean on ``holdout`` of the training images (per class, a seeded draw), which the ranges
    leave out. Score = -sum_l delta_l / E[delta_l]. ``layers``: module names joined by ``+`` (default: the model's
    stage ends).
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("layers", "logits", "train")
    search_space: ClassVar[dict[str, list]] = {"orders": [1, 3, 5, 10]}

    def __init__(self, layers: str | None = None, orders: int = 10, holdout: float = 0.1, seed: int = 0) -> None:
        self.layers = layers
        self.orders = orders
        self.holdout = holdout
        self.seed = seed

    def _check(self) -> None:
        if not 1 <= self.orders <= 99:
            raise ConfigError(f"gram: orders must be in 1..99, got {self.orders}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"gram: holdout must be in (0, 1), got {self.holdout}")

    def layer_keys(self, model: nn.Module | None) -> list[str]:
        """The Gram features of orders 1..``orders`` of the chosen layers."""
        return [layer_key(name, f"gram{self.orders}") for name in chosen_layers(model, self.layers)]

    def _fit(self, train: ModelOutputs) -> None:
        self.keys_ = self.layer_keys(self.model_)
        predicted = train.logits.argmax(dim=1)
        classes = int(train.logits.shape[1])
        generator = torch.Generator().manual_seed(self.seed)
        fit_rows, check_rows = [], []
        for c in range(classes):
            rows = torch.nonzero(predicted == c).flatten()
            rows = rows[torch.randperm(len(rows), generator=generator)]
            held = int(self.holdout * len(rows))
            fit_rows.append(rows[held:])
            check_rows.append(rows[:held])
        self.minimum_, self.maximum_, norms = [], [], []
        for key in self.keys_:
            values = layer_values(train, key).double()
            low = values.new_full((classes, values.shape[1]), float("nan"))
            high = low.clone()
            for c, rows in enumerate(fit_rows):
                if len(rows):
                    low[c], high[c] = values[rows].min(dim=0).values, values[rows].max(dim=0).values
            self.minimum_.append(low)
            self.maximum_.append(high)
            held = torch.cat(check_rows)
            deviation = _deviation(values[held], low[predicted[held]], high[predicted[held]]) if len(held) else None
            mean = float(deviation.nanmean()) if deviation is not None else float("nan")
            norms.append(mean if mean > 0 else 1.0)
        self.norms_ = torch.tensor(norms, dtype=torch.float64)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        predicted = outputs.logits.argmax(dim=1)
        total = torch.zeros(len(outputs), dtype=torch.float64)
        for key, low, high, norm in zip(self.keys_, self.minimum_, self.maximum_, self.norms_, strict=True):
            values = layer_values(outputs, key).double()
            total += _deviation(values, low[predicted], high[predicted]) / norm
        return -total.float()


def _deviation(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Summed relative excursions of ``values`` below ``low`` and above ``high``, per row; a class never predicted
    in training (NaN ranges) counts as no deviation from it."""
    below = torch.relu(low - values) / (low + EPS).abs()
    above = torch.relu(values - high) / (high + EPS).abs()
    return torch.nan_to_num(below + above, nan=0.0).sum(dim=1)
