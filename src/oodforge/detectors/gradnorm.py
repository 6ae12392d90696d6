"""GradNorm (Huang, Geng & Li, NeurIPS 2021): L1 norm of the final-layer weight gradient of KL(u || softmax)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, features_and_logits, require_interface
from oodforge.detectors.chunks import CHUNK_ROWS
from oodforge.util.errors import ConfigError

GRADIENT_ELEMENTS = 1 << 24  # per-sample gradients held at once by the autograd path (samples x weight size)


@DETECTORS.register("gradnorm")
class GradNorm(Detector):
    """Score = || d KL(u || softmax(f(x) / T)) / dW ||_1, W the final layer's weight, u uniform over C classes.

    For a linear head f = W h + b the gradient is outer(p - u, h) / T with p = softmax(f / T), so the
    score is (1 / T) * sum_c |p_c - 1/C| * sum_d |h_d| (``_score`` uses this closed form, from cached
    features and logits). ``score(model, x)`` runs the model (no grad) and differentiates its head
    per sample with ``torch.func`` (vmap of grad), which also covers non-linear heads with a ``weight``
    parameter. Only the weight's gradient counts, not the bias's, as in the official code
    (github.com/deeplearning-wisc/gradnorm_ood, ``test_ood.py``: ``iterate_data_gradnorm``, T = 1 by
    default) and OpenOOD v1.5. The official code's loss is sum_c -log p_c (all-ones targets), C times
    the KL's gradient; scores here are the paper's (Eq. 4), 1 / C of the official values (same ranking).
    """

    needs_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("gradients", "head")
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"gradnorm: temperature must be > 0, got {self.temperature}")

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        model = require_interface(model)
        with torch.no_grad():
            features, _ = features_and_logits(model, x)
        return head_gradient_norms(model.head, features.flatten(1), self.temperature).to(x.device)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        """The closed form for a linear head, from features h and logits f = W h + b."""
        features, logits = outputs.features.detach(), outputs.logits.detach()
        if features.ndim != 2 or logits.ndim != 2 or len(features) != len(logits):
            raise ConfigError(f"gradnorm: need (N, D) features and (N, C) logits, got {tuple(features.shape)} "
                             f"and {tuple(logits.shape)}")
        parts = []
        for start in range(0, len(logits), CHUNK_ROWS):
            probs = torch.softmax(logits[start:start + CHUNK_ROWS].double() / self.temperature, dim=1)
            spread = (probs - 1.0 / probs.shape[1]).abs().sum(dim=1)
            size = features[start:start + CHUNK_ROWS].double().abs().sum(dim=1).to(spread.device)
            parts.append(spread * size / self.temperature)
        return torch.cat(parts).float().to(logits.device) if parts else logits.new_zeros(0, dtype=torch.float32)


def head_gradient_norms(head: nn.Module, features: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample || d KL(u || softmax(head(h) / T)) / d head.weight ||_1 by autograd, float32, shape (N,)."""
    params = {name: p.detach() for name, p in head.named_parameters()}
    if "weight" not in params:
        raise ConfigError(f"gradnorm needs a head with a .weight parameter; {type(head).__name__} has none")
    weight = params["weight"]
    features = features.detach().to(weight.device, weight.dtype)

    def kl_to_uniform(w: Tensor, h: Tensor) -> Tensor:
        logits = functional_call(head, {**params, "weight": w}, (h.unsqueeze(0),)).squeeze(0) / temperature
        return -math.log(logits.shape[-1]) - torch.log_softmax(logits, dim=-1).mean()

    per_sample = vmap(grad(kl_to_uniform), in_dims=(None, 0))
    step = max(1, GRADIENT_ELEMENTS // weight.numel())
    was_training = head.training
    head.eval()
    try:
        with torch.enable_grad():
            parts = [per_sample(weight, features[start:start + step]).abs().flatten(1).sum(dim=1)
                     for start in range(0, len(features), step)]
    finally:
        head.train(was_training)
    return torch.cat(parts).float() if parts else features.new_zeros(0, dtype=torch.float32)
