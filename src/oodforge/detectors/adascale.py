"""AdaSCALE (Regmi 2025): SCALE-like shaping whose percentile adapts to each input's feature shift under a small
input perturbation; ``adascale_a`` scales the activations, ``adascale_l`` the logits."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.ash import safe_ratio
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, features_and_logits, require_interface
from oodforge.detectors.batches import input_batches, training_subset
from oodforge.detectors.head import head_logits
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError

FIT_BATCH = 256  # images per pass when ``fit`` is given one tensor of ID images


class AdaScale(Detector):
    """The common part of AdaSCALE-A and AdaSCALE-L: see the registered ``adascale_a`` and ``adascale_l``.

    Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection" (arXiv:2503.08023, 2025). For an input x with
    penultimate features h and logits f: g = grad_x f_y(x) (y = argmax f), and
    x~ = x + epsilon * sign(g) on the ``perturb_fraction`` (o) of input elements where |g| is smallest
    (x unchanged elsewhere), h~ = h(x~). Q = sum of |h - h~| over the k1 largest activations of h
    (``shift_percent`` % of D), C_o = sum of relu(h~) over the k2 largest (``correction_percent`` % of D),
    Q' = C_o + lambda * Q (lambda = ``shift_weight``). The percentile is
    p = p_min + (1 - F(Q')) * (p_max - p_min), F the empirical CDF of Q' over ID images, and
    r = sum(relu h) / (sum of the K largest of relu h), K = D - round(D * p / 100), at least 1.

    F is fitted on ID images (``fits_on_inputs``: the runner gives the training loader; by hand,
    ``fit(loader, model)`` with a DataLoader, batches of ``x`` or ``(x, y)``, or one tensor of images):
    ``train_images`` of them, a seeded uniform draw (all if fewer). The paper draws them from the ID
    validation images (OpenOOD: 5000).

    Defaults follow the official code and configs (github.com/sudarshanregmi/AdaSCALE, as also in
    OpenOOD v1.5): p in [75, 85], k1 = 1 %, k2 = 5 % (the paper's naming, after the author's k1/k2
    correction), lambda = 10, o = 5 %; k1 and k2 count at least one activation here (the official
    ``int()`` gives none for D < 100). The official step is 0.5 in normalized input units, 0.5 * std per
    channel in [0, 1] pixels; ``epsilon`` is in pixels, default 0.125 (std 0.22-0.26 for the usual
    CIFAR and ImageNet statistics), and the least sensitive elements are ranked by the pixel gradient.
    """

    needs_fit = True
    needs_inputs = True
    fits_on_inputs = True
    search_space: ClassVar[dict[str, list]] = {"p_max": [80.0, 85.0, 90.0, 95.0, 99.0]}

    def __init__(self, p_min: float = 75.0, p_max: float = 85.0, shift_percent: float = 1.0,
                 correction_percent: float = 5.0, shift_weight: float = 10.0, perturb_fraction: float = 0.05,
                 epsilon: float = 0.125, train_images: int = 5000, seed: int = 0) -> None:
        self.p_min = p_min
        self.p_max = p_max
        self.shift_percent = shift_percent
        self.correction_percent = correction_percent
        self.shift_weight = shift_weight
        self.perturb_fraction = perturb_fraction
        self.epsilon = epsilon
        self.train_images = train_images
        self.seed = seed

    def _check(self) -> None:
        label = self._label()
        if not 0.0 <= self.p_min <= self.p_max < 100.0:
            raise ConfigError(f"{label}: p_min and p_max must satisfy 0 <= p_min <= p_max < 100, got "
                              f"p_min={self.p_min}, p_max={self.p_max}")
        for name in ("shift_percent", "correction_percent"):
            if not 0.0 < getattr(self, name) <= 100.0:
                raise ConfigError(f"{label}: {name} must be in (0, 100], got {getattr(self, name)}")
        if not 0.0 < self.perturb_fraction <= 1.0:
            raise ConfigError(f"{label}: perturb_fraction must be in (0, 1], got {self.perturb_fraction}")
        if self.shift_weight < 0:
            raise ConfigError(f"{label}: shift_weight must be >= 0, got {self.shift_weight}")
        if self.epsilon < 0:
            raise ConfigError(f"{label}: epsilon must be >= 0, got {self.epsilon}")
        if self.train_images < 1:
            raise ConfigError(f"{label}: train_images must be >= 1, got {self.train_images}")

    def _fit_inputs(self, batches: Iterable | Tensor, model: nn.Module) -> None:
        """F: the sorted Q' of ``train_images`` ID training images (a seeded draw)."""
        model = require_interface(model)
        batches = batches.split(FIT_BATCH) if isinstance(batches, Tensor) else batches
        chosen = training_subset(batches, self.train_images, self.seed)
        shifts = [self.shift_statistics(model, x)[2].cpu() for x, _ in input_batches(chosen, model)]
        if not shifts:
            raise ConfigError(f"{self._label()}: the training inputs gave no batches")
        self.reference_ = torch.cat(shifts).sort().values

    def shift_statistics(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features h (float64), logits and Q' of a batch, from one pass with the input gradient and one
        pass on the perturbed input."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            features, logits = features_and_logits(model, x)
            (gradient,) = torch.autograd.grad(logits.float().max(dim=1).values.sum(), x)
        step = gradient.sign() * least_sensitive(gradient, self.perturb_fraction)
        with torch.no_grad():
            perturbed = features_and_logits(model, x.detach() + self.epsilon * step)[0].flatten(1).double()
        features = features.detach().flatten(1).double()
        shift = top_sum((features - perturbed).abs(), features, self.shift_percent)
        correction = top_sum(perturbed.relu(), features, self.correction_percent)
        return features, logits.detach(), correction + self.shift_weight * shift

    def percentiles(self, shift: Tensor) -> Tensor:
        """p = p_min + (1 - F(Q')) (p_max - p_min), F the empirical CDF of Q' over the ID training images."""
        reference = self.reference_.to(shift.device)
        cdf = torch.searchsorted(reference, shift.contiguous(), right=True).double() / len(reference)
        return self.p_min + (1.0 - cdf) * (self.p_max - self.p_min)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        self.check_fitted()
        model = require_interface(model)
        features, logits, shift = self.shift_statistics(model, x)
        ratio = adaptive_scale(features, self.percentiles(shift))
        return self._shaped_energy(model, features, logits, ratio).float().to(x.device)

    def _shaped_energy(self, model: nn.Module, features: Tensor, logits: Tensor, ratio: Tensor) -> Tensor:
        raise NotImplementedError

    def _score(self, outputs: ModelOutputs) -> Tensor:
        raise ConfigError(f"{self._label()} needs the inputs and the model (it perturbs the inputs): "
                          "call score(model, x)")


@DETECTORS.register("adascale_a")
class AdaScaleA(AdaScale):
    __doc__ = ("AdaSCALE-A: score = logsumexp(head(h * exp(r))), the activations scaled as by SCALE with a "
               "per-input percentile.\n\n" + AdaScale.__doc__.split("\n\n", 1)[1])

    requires: ClassVar[tuple[str, ...]] = ("features", "head", "train", "gradients")

    def _shaped_energy(self, model: nn.Module, features: Tensor, logits: Tensor, ratio: Tensor) -> Tensor:
        return energy_score(head_logits(model, features * ratio.exp()[:, None]).double())


@DETECTORS.register("adascale_l")
class AdaScaleL(AdaScale):
    __doc__ = ("AdaSCALE-L: score = logsumexp(f(x) * r^2), the logits scaled by the square of the adaptive "
               "ratio.\n\n" + AdaScale.__doc__.split("\n\n", 1)[1])

    requires: ClassVar[tuple[str, ...]] = ("features", "logits", "train", "gradients")

    def _shaped_energy(self, model: nn.Module, features: Tensor, logits: Tensor, ratio: Tensor) -> Tensor:
        return energy_score(logits.to(ratio.device, torch.float64) * ratio.square()[:, None])


def least_sensitive(gradient: Tensor, fraction: float) -> Tensor:
    """Per sample, 1 at the max(1, int(n * fraction)) elements of smallest |gradient| (n per sample), 0 elsewhere."""
    flat = gradient.flatten(1)
    count = max(1, int(flat.shape[1] * fraction))
    where = flat.abs().topk(count, dim=1, largest=False).indices
    return torch.zeros_like(flat).scatter_(1, where, 1.0).view_as(gradient)


def top_sum(values: Tensor, features: Tensor, percent: float) -> Tensor:
    """Per row, the sum of ``values`` at the max(1, int(D * percent / 100)) largest entries of ``features``."""
    count = max(1, int(features.shape[1] * percent / 100.0))
    return values.gather(1, features.topk(count, dim=1).indices).sum(dim=1)


def adaptive_scale(features: Tensor, percentiles: Tensor) -> Tensor:
    """r = sum(relu h) / sum of its K largest entries, K = D - round(D * p / 100) (at least 1), per row."""
    x = features.relu()
    width = x.shape[1]
    kept = (width - torch.round(width * percentiles / 100.0)).clamp(min=1)
    ranked = x.sort(dim=1, descending=True).values
    top = (ranked * (torch.arange(width, device=x.device)[None, :] < kept[:, None])).sum(dim=1)
    return safe_ratio(x.sum(dim=1), top)
