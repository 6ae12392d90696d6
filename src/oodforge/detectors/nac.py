"""NAC-UE (Liu et al., ICLR 2024): how well the training images cover each neuron's activation state."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, features_and_logits, require_interface
from oodforge.detectors.batches import input_batches, training_subset
from oodforge.detectors.layers import chosen_layers, forward_with_layers
from oodforge.util.errors import ConfigError

LOG_BASE = 1000.0  # the authors' bin edges: log_1000 of evenly spaced values in [1, sqrt(1000)], mirrored at 0.5


@DETECTORS.register("nac")
class NAC(Detector):
    """Neuron activation coverage: the mean over neurons of min(kappa_i(z_i) / r, 1), averaged over layers.

    For each chosen layer with output o (N, C, H, W), the state of neuron i is z_i = sigmoid(a * (sum_hw o_i) *
    (sum_hw g_i)), g = d KL(u || softmax(f(x))) / d o the gradient of the KL divergence from the uniform
    distribution u over classes; token maps (N, T, C) are summed over tokens, (N, D) outputs used as they are.
    kappa_i(z) counts the training states of neuron i in z's bin; r (``coverage``) is the count that covers a bin
    fully. Fit: the histograms of the states of ``train_images`` training images (a seeded uniform draw, all if
    fewer; the authors draw a class-balanced 1000). Liu et al. 2024, "Neuron Activation Coverage: Rethinking
    Out-of-distribution Detection and Generalization" (NAC-UE).

    The sigmoid steepness a: with ``relative`` (the default) a = ``alpha`` / RMS of the layer's products
    (sum o)(sum g) over the fitting images, so that one value suits every layer and model; with
    ``relative=False`` a = ``alpha``, the paper's steepness, whose good values depend on the layer's scale (the
    authors tune it per layer on OOD validation data: 100 for the pooled features of their CIFAR-10 ResNet-18,
    0.001 for its first stages). ``alpha``, ``bins`` and ``coverage`` take one value for all layers or one per
    layer joined by ``+``. As the authors' code (github.com/BierOne/ood_coverage): maps and gradients are summed
    over positions before their product; the ``bins`` edges are theirs, log_1000 of ``bins // 2`` evenly spaced
    values in [1, sqrt(1000)] mirrored about 0.5 (fine near 0.5), the last moved to 1.01, plus 1.2; the layers'
    coverages are averaged. pytorch-ood's ``NACUE`` pools the product o * g (mean over positions), bins the states
    geometrically (fine near 0 and 1) and sums the layers. ``layers``: module names joined by ``+`` (default: the
    model's stage ends). Scoring runs a forward and a backward pass per batch.
    """

    needs_fit = True
    needs_inputs = True
    fits_on_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("layers", "gradients", "train")
    search_space: ClassVar[dict[str, list]] = {"alpha": [0.3, 1.0, 3.0, 10.0], "coverage": [10, 50, 100]}

    def __init__(self, layers: str | None = None, alpha: float | str = 1.0, relative: bool = True,
                 bins: int | str = 50, coverage: int | str = 50, train_images: int = 1000, seed: int = 0) -> None:
        self.layers = layers
        self.alpha = alpha
        self.relative = relative
        self.bins = bins
        self.coverage = coverage
        self.train_images = train_images
        self.seed = seed

    def _check(self) -> None:
        count = len(self.layers.split("+")) if self.layers else None
        if any(a <= 0 for a in per_layer("nac", "alpha", self.alpha, count, float)):
            raise ConfigError(f"nac: alpha must be > 0, got {self.alpha!r}")
        if any(b < 4 for b in per_layer("nac", "bins", self.bins, count, int)):
            raise ConfigError(f"nac: bins must be >= 4, got {self.bins!r}")
        if any(r < 1 for r in per_layer("nac", "coverage", self.coverage, count, int)):
            raise ConfigError(f"nac: coverage must be >= 1, got {self.coverage!r}")
        if self.train_images < 1:
            raise ConfigError(f"nac: train_images must be >= 1, got {self.train_images}")

    def _fit_inputs(self, batches: Iterable, model: nn.Module) -> None:
        self.layers_ = chosen_layers(model, self.layers)
        count = len(self.layers_)
        alphas = per_layer("nac", "alpha", self.alpha, count, float)
        self.coverage_ = per_layer("nac", "coverage", self.coverage, count, int)
        self.edges_ = [bin_edges(m) for m in per_layer("nac", "bins", self.bins, count, int)]
        parts = [self._products(model, x) for x, _ in input_batches(training_subset(batches, self.train_images,
                                                                                    self.seed), model)]
        if not parts:
            raise ConfigError("nac: the training inputs gave no batches")
        products = [torch.cat(layer).cpu() for layer in zip(*parts, strict=True)]
        self.steepness_ = [alpha / _rms(p) if self.relative else alpha
                           for alpha, p in zip(alphas, products, strict=True)]
        self.counts_ = []
        for p, steepness, edges in zip(products, self.steepness_, self.edges_, strict=True):
            flat = bin_index(torch.sigmoid(steepness * p), edges) + torch.arange(p.shape[1]) * (len(edges) - 1)
            counts = torch.bincount(flat.flatten(), minlength=p.shape[1] * (len(edges) - 1))
            self.counts_.append(counts.view(p.shape[1], len(edges) - 1).double())

    def _products(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """(sum_hw o) * (sum_hw dKL/do) of each chosen layer for a batch ``x``, (N, neurons) float64."""
        maps, logits = hooked_forward(model, x, self.layers_)
        kl = -torch.log_softmax(logits.float(), dim=1).mean(dim=1) - math.log(logits.shape[1])
        grads = torch.autograd.grad(kl.sum(), maps)
        return [summed(o.detach()).double() * summed(g).double() for o, g in zip(maps, grads, strict=True)]

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        self.check_fitted()
        model = require_interface(model)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for product, steepness, edges, counts, r in zip(self._products(model, x), self.steepness_, self.edges_,
                                                        self.counts_, self.coverage_, strict=True):
            states = torch.sigmoid(steepness * product)
            if states.shape[1] != counts.shape[0]:
                raise ConfigError(f"nac: a layer gives {states.shape[1]} neurons, fitted on {counts.shape[0]}")
            counts = counts.to(states.device)
            flat = bin_index(states, edges.to(states.device)) + torch.arange(states.shape[1], device=states.device
                                                                             ) * counts.shape[1]
            total += (counts.flatten()[flat] / r).clamp(max=1.0).mean(dim=1).to(total.device)
        return (total / len(self.counts_)).float()

    def _score(self, outputs: ModelOutputs) -> Tensor:
        raise ConfigError("nac scores through the network's backward pass: call score(model, x) with the inputs")


def _rms(products: Tensor) -> float:
    """The root mean square of a layer's training products (1 when they are all zero)."""
    rms = float(products.square().mean().sqrt())
    return rms if rms > 0 else 1.0


def per_layer(owner: str, name: str, value: float | int | str, count: int | None, cast: type) -> list:
    """One value per layer from a number or numbers joined by ``+``; ``count`` None checks the values only."""
    try:
        values = [cast(v) for v in value.split("+")] if isinstance(value, str) else [cast(value)]
    except ValueError:
        raise ConfigError(f"{owner}: {name} must be a number or numbers joined by '+', got {value!r}") from None
    if count is None:
        return values
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ConfigError(f"{owner}: {name} has {len(values)} values for {count} layers")
    return values


def bin_edges(bins: int) -> Tensor:
    """The authors' ``bins`` histogram edges (float64): fine near 0.5, the last two 1.01 and 1.2."""
    half = torch.linspace(1.0, math.sqrt(LOG_BASE), bins // 2, dtype=torch.float64).log() / math.log(LOG_BASE)
    edges = torch.cat([half[:-1], (1.0 - half).flip(0)])
    edges[-1] += 0.01
    return torch.cat([edges, edges.new_tensor([1.2])])


def bin_index(states: Tensor, edges: Tensor) -> Tensor:
    """The bin j with edges[j] <= state < edges[j + 1] of each state (states in [0, 1])."""
    return (torch.bucketize(states.contiguous(), edges.to(states.device), right=True) - 1).clamp(0, len(edges) - 2)


def summed(maps: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C) sum over positions; (N, T, C) -> (N, C) sum over tokens; else flattened."""
    if maps.ndim == 4:
        return maps.sum(dim=(2, 3))
    if maps.ndim == 3:
        return maps.sum(dim=1)
    return maps.flatten(1)


def hooked_forward(model: nn.Module, x: Tensor, layers: list[str]) -> tuple[list[Tensor], Tensor]:
    """(the outputs of ``layers``, logits) of one forward pass with gradients on, the outputs kept in the graph."""
    model = require_interface(model)
    with torch.enable_grad():
        (_, logits), maps = forward_with_layers(
            model, layers, lambda: features_and_logits(model, x.detach().clone().requires_grad_(True)))
    return [maps[layer] for layer in layers], logits
