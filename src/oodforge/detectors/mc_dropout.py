"""Monte-Carlo dropout (Gal & Ghahramani 2016): average the softmax over stochastic passes with dropout on."""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, features_and_logits, require_interface
from oodforge.util.errors import ConfigError

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
MODES = ("mean", "var")


@DETECTORS.register("mc_dropout")
class MCDropout(Detector):
    """Score = max_c (1/T) sum_t softmax(f_t(x))_c (``mean``), or -(1/C) sum_c Var_t softmax(f_t(x))_c (``var``).

    f_1 .. f_T are T = ``samples`` forward passes with every dropout layer (``nn.Dropout`` and its 1d/2d/3d and
    alpha variants) in training mode and every other module, BatchNorm included, in eval mode (Gal &
    Ghahramani, "Dropout as a Bayesian Approximation: Representing Model Uncertainty in Deep Learning"
    (ICML 2016)). ``mean`` is the MSP of the predictive mean; ``var`` the class-averaged variance of the
    softmax across passes (with Bessel's correction), as in pytorch-ood's ``MCD``, negated so that higher
    means more ID. Dropout applied through ``torch.nn.functional.dropout`` inside a module's forward is
    not switched on. With ``seed`` set, every call draws its masks from a generator seeded with it (the
    global random state is left as it was), so the same batch gets the same scores; ``None`` uses the
    global random state. Runs only on networks with a dropout layer of p > 0 (``supports``).
    """

    needs_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("logits",)
    search_space: ClassVar[dict[str, list]] = {"mode": ["mean", "var"]}

    def __init__(self, samples: int = 30, mode: str = "mean", seed: int | None = 0) -> None:
        self.samples = samples
        self.mode = mode
        self.seed = seed

    def _check(self) -> None:
        if self.samples < 2:
            raise ConfigError(f"mc_dropout: samples must be >= 2, got {self.samples}")
        if self.mode not in MODES:
            raise ConfigError(f"mc_dropout: mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    def supports(self, model: nn.Module | None) -> bool:
        return model is not None and bool(dropout_layers(model)) and super().supports(model)

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        model = require_interface(model)
        layers = dropout_layers(model)
        if not layers:
            warnings.warn(f"mc_dropout: {type(model).__name__} has no dropout layer with p > 0; its "
                          "passes are all the same", stacklevel=2)
        modes = [(module, module.training) for module in model.modules()]
        with ExitStack() as stack:
            if self.seed is not None:
                stack.enter_context(torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []))
                torch.manual_seed(self.seed)
            try:
                model.eval()
                for layer in layers:
                    layer.train()
                total, squares = self._passes(model, x)
            finally:
                for module, mode in modes:
                    module.training = mode
        mean = total / self.samples
        if self.mode == "mean":
            return mean.max(dim=1).values.float()
        variance = (squares - self.samples * mean.square()) / (self.samples - 1)
        return -variance.clamp(min=0).mean(dim=1).float()

    def _passes(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sum and sum of squares (float64) of the softmax over ``samples`` stochastic passes."""
        total = squares = None
        with torch.no_grad():
            for _ in range(self.samples):
                probs = torch.softmax(features_and_logits(model, x)[1].double(), dim=1)
                total = probs if total is None else total + probs
                squares = probs.square() if squares is None else squares + probs.square()
        return total, squares

    def _score(self, outputs: ModelOutputs) -> Tensor:
        raise ConfigError("mc_dropout needs the inputs and the model (its passes resample dropout masks): "
                          "call score(model, x)")


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The dropout layers of ``model`` that drop something (p > 0)."""
    return [m for m in model.modules() if isinstance(m, DROPOUT_LAYERS) and m.p > 0]
