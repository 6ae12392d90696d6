"""Multi-layer Mahalanobis (Lee et al. 2018, the feature ensemble without its input preprocessing)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.layers import chosen_layers, layer_key, layer_values
from oodforge.detectors.mahalanobis import _class_means_and_covariance, pinv_sqrt, squared_distances
from oodforge.util.errors import ConfigError


@DETECTORS.register("multi_mahalanobis")
class MultiMahalanobis(Detector):
    """Negative weighted sum over layers of the squared Mahalanobis distance to the nearest class mean.

    Score = -sum_l w_l min_c (z_l - mu_lc)^T S_l^+ (z_l - mu_lc), where z_l is the spatial mean of layer l's
    output, mu_lc its class means and S_l the covariance of the class-centred training values (one per layer,
    divided by N, pseudo-inverted as in ``mahalanobis``). ``layers``: module names joined by ``+`` (default:
    the model's stage ends, ``oodforge.models.layers``); ``weights``: one weight per layer joined by ``+``
    (default: all 1, as pytorch-ood's ``MultiMahalanobis``; the paper learns them on validation data, which
    ``mds_ensemble`` does). pytorch-ood scores half the distance, with an unnormalised covariance.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("layers", "train")

    def __init__(self, layers: str | None = None, weights: str | None = None) -> None:
        self.layers = layers
        self.weights = weights

    def _check(self) -> None:
        self._weights(1 if not self.layers else len(self.layers.split("+")), check_count=bool(self.layers))

    def _weights(self, count: int, check_count: bool = True) -> list[float]:
        if self.weights is None:
            return [1.0] * count
        try:
            values = [float(v) for v in self.weights.split("+")]
        except ValueError:
            raise ConfigError(f"multi_mahalanobis: weights must be numbers joined by '+', got {self.weights!r}"
                              ) from None
        if check_count and len(values) != count:
            raise ConfigError(f"multi_mahalanobis: weights has {len(values)} values for {count} layers")
        return values

    def layer_keys(self, model: nn.Module | None) -> list[str]:
        """The spatial means of the chosen layers."""
        return [layer_key(name, "mean") for name in chosen_layers(model, self.layers)]

    def _fit(self, train: ModelOutputs) -> None:
        if train.labels is None:
            raise ConfigError("multi_mahalanobis needs labelled training outputs (train.labels is None)")
        self.keys_ = self.layer_keys(self.model_)
        self.weights_ = torch.tensor(self._weights(len(self.keys_)), dtype=torch.float64)
        classes, inverse = torch.unique(train.labels, return_inverse=True)
        self.whitening_, self.whitened_means_ = [], []
        for key in self.keys_:
            values = layer_values(train, key)
            means, covariance = _class_means_and_covariance(values, inverse, len(classes), None)
            whitening = pinv_sqrt(covariance)
            self.whitening_.append(whitening)
            self.whitened_means_.append(means @ whitening)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        total = torch.zeros(len(outputs), dtype=torch.float64)
        for key, weight, whitening, means in zip(self.keys_, self.weights_, self.whitening_, self.whitened_means_,
                                                 strict=True):
            values = layer_values(outputs, key)
            if values.shape[1] != whitening.shape[0]:
                raise ConfigError(f"layer {key} has width {values.shape[1]}, fitted on {whitening.shape[0]}")
            for rows in row_slices(values.shape[0], values.shape[1]):
                whitened = values[rows].double() @ whitening
                total[rows] += weight * squared_distances(whitened, means).min(dim=1).values
        return -total.float()

