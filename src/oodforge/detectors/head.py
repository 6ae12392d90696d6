"""Access to a classifier's final linear layer, for detectors that reuse it (ViM, ReAct, ASH, fDBD, ...)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from oodforge.util.errors import ConfigError


def has_linear_head(model: nn.Module | None) -> bool:
    """Whether ``model.head`` is a linear layer with a 2-D ``weight`` (C, D)."""
    weight = getattr(getattr(model, "head", None), "weight", None)
    return isinstance(weight, Tensor) and weight.ndim == 2


def linear_head(model: nn.Module | None, detector: str = "this detector") -> tuple[Tensor, Tensor]:
    """The head's weight (C, D) and bias (C,) as detached float64 CPU tensors (zeros for no bias)."""
    if model is None or getattr(model, "head", None) is None:
        raise ConfigError(f"{detector} needs the classifier: call fit(train, model) with a model that has .head")
    if not has_linear_head(model):
        raise ConfigError(f"{detector} needs a linear head with .weight (C, D); "
                         f"{type(model.head).__name__} has none")
    weight = model.head.weight.detach().to("cpu", torch.float64)
    bias = getattr(model.head, "bias", None)
    bias = weight.new_zeros(weight.shape[0]) if not isinstance(bias, Tensor) else bias.detach().to("cpu",
                                                                                                 torch.float64)
    return weight, bias


def head_logits(model: nn.Module, features: Tensor) -> Tensor:
    """Logits of the model's head on (modified) ``features``, head in eval mode, float32, on the features' device."""
    head = model.head
    parameter = next(head.parameters(), None)
    inputs = features.detach() if parameter is None else features.detach().to(parameter.device, parameter.dtype)
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad():
            logits = head(inputs)
    finally:
        head.train(was_training)
    return logits.float().to(features.device)
