"""Mahalanobis feature ensemble with input preprocessing (Lee et al. 2018, the full method)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from oodforge.detectors.base import (
    DETECTORS,
    Detector,
    ModelOutputs,
    features_and_logits,
    outputs_of,
    require_interface,
)
from oodforge.detectors.batches import input_batches, training_subset
from oodforge.detectors.layers import chosen_layers, layer_key, layer_outputs, layer_values
from oodforge.detectors.mahalanobis import _class_means_and_covariance, pinv_sqrt, squared_distances
from oodforge.util.errors import ConfigError


@DETECTORS.register("mds_ensemble")
class MDSEnsemble(Detector):
    """Score = b + sum_l w_l M_l(x_l'), M_l(x) = -min_c (z_l(x) - mu_lc)^T S_l^+ (z_l(x) - mu_lc).

    z_l is the spatial mean of layer l's output, mu_lc its class means and S_l the covariance of the class-centred
    training values (divided by N, pseudo-inverted as in ``mahalanobis``), all from every training image. Each
    layer has its own input preprocessing: x_l' = x - epsilon * sign(grad_x min_c (z_l(x) - mu_lc)^T S_l^+
    (z_l(x) - mu_lc)), the step that brings x nearer its closest class at layer l (``epsilon`` in the scale of
    the inputs, [0, 1] pixels for oodforge's models). The weights w, b are a logistic regression of ID (1) against
    OOD (0) on the per-layer scores; ``layers``: module names joined by ``+`` (default: the model's stage ends).
    Lee et al. 2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks".

    The paper fits the regression on validation OOD images, or, without any OOD data, on FGSM adversarial images
    (its "validation on adversarial samples"); OpenOOD's ``mds_ensemble`` fits it on validation ID and OOD sets.
    A detector here sees only the training set, so it takes the paper's OOD-free variant: ``regression_images``
    training images (a seeded uniform draw) against their FGSM versions x + ``adversarial_epsilon`` *
    sign(grad_x CE(f(x), y)), clipped to [0, 1] (0.05, the authors' FGSM step in pixel units). As the paper's
    code, scikit-learn's ``LogisticRegressionCV`` (L2, accuracy, 5 folds) chooses the regularization; here on
    standardized per-layer scores, the scaling folded back into w and b. The authors' adversarial sets keep only
    correctly classified images whose FGSM version is misclassified; all are used here. Scoring runs, per layer,
    a forward and backward pass and a forward pass.
    """

    needs_fit = True
    needs_inputs = True
    fits_on_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("layers", "gradients", "train")
    search_space: ClassVar[dict[str, list]] = {"epsilon": [0.0, 0.0005, 0.0014, 0.005]}

    def __init__(self, layers: str | None = None, epsilon: float = 0.0014, adversarial_epsilon: float = 0.05,
                 regression_images: int = 1000, seed: int = 0) -> None:
        self.layers = layers
        self.epsilon = epsilon
        self.adversarial_epsilon = adversarial_epsilon
        self.regression_images = regression_images
        self.seed = seed

    def _check(self) -> None:
        if self.epsilon < 0:
            raise ConfigError(f"mds_ensemble: epsilon must be >= 0, got {self.epsilon}")
        if not self.adversarial_epsilon > 0:
            raise ConfigError(f"mds_ensemble: adversarial_epsilon must be > 0, got {self.adversarial_epsilon}")
        if self.regression_images < 10:
            raise ConfigError(f"mds_ensemble: regression_images must be >= 10, got {self.regression_images}")

    def _fit_inputs(self, batches: Iterable, model: nn.Module) -> None:
        self.keys_ = [layer_key(name, "mean") for name in chosen_layers(model, self.layers)]
        train = outputs_of(model, batches, self.keys_)
        if train.labels is None:
            raise ConfigError("mds_ensemble needs labelled training images (batches of (x, y))")
        classes, inverse = torch.unique(train.labels, return_inverse=True)
        self.whitening_, self.whitened_means_ = [], []
        for key in self.keys_:
            means, covariance = _class_means_and_covariance(layer_values(train, key), inverse, len(classes), None)
            self.whitening_.append(pinv_sqrt(covariance))
            self.whitened_means_.append(means @ self.whitening_[-1])
        clean, adversarial = [], []
        for x, y in input_batches(training_subset(batches, self.regression_images, self.seed), model):
            clean.append(self.layer_scores(model, x))
            adversarial.append(self.layer_scores(model, fgsm(model, x, y, self.adversarial_epsilon)))
        if not clean:
            raise ConfigError("mds_ensemble reads the training inputs twice (class means, then the regression): "
                              "fit it on a DataLoader, not a one-shot iterator")
        self.weights_, self.bias_ = logistic_weights(torch.cat(clean), torch.cat(adversarial))

    def layer_scores(self, model: nn.Module, x: Tensor) -> Tensor:
        """M_l(x_l') of each layer (N, L), float64: minus the squared distance to the closest class mean."""
        model = require_interface(model)
        columns = []
        for key, whitening, means in zip(self.keys_, self.whitening_, self.whitened_means_, strict=True):
            whitening, means = whitening.to(x.device), means.to(x.device)
            x_step = x.detach()
            if self.epsilon > 0:
                x_grad = x.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    values = layer_outputs(model, x_grad, [key], features_and_logits)[2][key].flatten(1)
                    if values.shape[1] != whitening.shape[0]:
                        raise ConfigError(f"layer {key} has width {values.shape[1]}, fitted on {whitening.shape[0]}")
                    whitened = values.double() @ whitening
                    nearest = (whitened.unsqueeze(1) - means.unsqueeze(0)).square().sum(dim=2).min(dim=1).values
                    (gradient,) = torch.autograd.grad(nearest.sum(), x_grad)
                x_step = x.detach() - self.epsilon * gradient.sign()
            with torch.no_grad():
                values = layer_outputs(model, x_step, [key], features_and_logits)[2][key].flatten(1)
                if values.shape[1] != whitening.shape[0]:
                    raise ConfigError(f"layer {key} has width {values.shape[1]}, fitted on {whitening.shape[0]}")
                columns.append(-squared_distances(values.double() @ whitening, means).min(dim=1).values)
        return torch.stack(columns, dim=1)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        self.check_fitted()
        scores = self.layer_scores(model, x)
        return (scores @ self.weights_.to(scores.device) + self.bias_.to(scores.device)).float()

    def _score(self, outputs: ModelOutputs) -> Tensor:
        raise ConfigError("mds_ensemble preprocesses the inputs: call score(model, x) with the inputs")


def fgsm(model: nn.Module, x: Tensor, y: Tensor | None, epsilon: float) -> Tensor:
    """x + epsilon * sign(grad_x CE(f(x), y)) clipped to [0, 1]; y: the predicted classes when None."""
    x_grad = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        _, logits = features_and_logits(require_interface(model), x_grad)
        target = logits.argmax(dim=1).detach() if y is None else y.to(logits.device)
        (gradient,) = torch.autograd.grad(nn.functional.cross_entropy(logits.float(), target), x_grad)
    return (x.detach() + epsilon * gradient.sign()).clamp(0.0, 1.0)


def logistic_weights(positive: Tensor, negative: Tensor) -> tuple[Tensor, Tensor]:
    """(w, b) of an L2 logistic regression of ``positive`` (1) against ``negative`` (0) rows, the regularization
    chosen by 5-fold cross-validated accuracy on standardized columns, in the columns' own scale (float64)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    data = torch.cat([positive, negative]).double().cpu().numpy()
    labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
    if not np.isfinite(data).all():
        raise ConfigError("mds_ensemble: the layer scores of the regression images are not finite")
    centre, scale = data.mean(axis=0), data.std(axis=0)
    scale[scale == 0] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        regression = LogisticRegressionCV(l1_ratios=(0.0,), scoring="accuracy", use_legacy_attributes=False,
                                          max_iter=1000, n_jobs=1).fit((data - centre) / scale, labels)
    weights = regression.coef_.reshape(-1) / scale
    bias = float(regression.intercept_[0]) - float(weights @ centre)
    return torch.from_numpy(weights), torch.tensor(bias, dtype=torch.float64)
