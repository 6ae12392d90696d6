"""Detectors that read only the logits: MSP, MaxLogit, Energy, and ODIN (which also perturbs inputs)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, require_interface
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""

    def _score(self, outputs: ModelOutputs) -> Tensor:
        return torch.softmax(outputs.logits.float(), dim=1).max(dim=1).values


@DETECTORS.register("maxlogit")
class MaxLogit(Detector):
    """Largest logit (Hendrycks et al. 2022)."""

    def _score(self, outputs: ModelOutputs) -> Tensor:
        return outputs.logits.float().max(dim=1).values


@DETECTORS.register("energy")
class Energy(Detector):
    """Energy score -E(x) = T logsumexp(f(x)/T) (Liu et al. 2020)."""

    search_space: ClassVar[dict[str, list]] = {"temperature": [0.5, 1.0, 2.0, 5.0]}

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def _check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"energy: temperature must be > 0, got {self.temperature}")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        return energy_score(outputs.logits.float(), self.temperature)


@DETECTORS.register("odin")
class ODIN(Detector):
    """ODIN (Liang et al. 2018): temperature-scaled MSP after a small input step that raises it.

    ``epsilon`` is in the [0, 1] pixel scale of the inputs; gradients flow through the model's
    own normalization, so no per-dataset std division is needed.
    """

    needs_inputs = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "gradients")
    search_space: ClassVar[dict[str, list]] = {"temperature": [1.0, 10.0, 100.0, 1000.0],
                                               "epsilon": [0.0, 0.0005, 0.0014, 0.0028, 0.005]}

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014) -> None:
        self.temperature = temperature
        self.epsilon = epsilon

    def _check(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"odin: temperature must be > 0, got {self.temperature}")
        if self.epsilon < 0:
            raise ConfigError(f"odin: epsilon must be >= 0, got {self.epsilon}")

    def score(self, model: nn.Module, x: Tensor) -> Tensor:
        model = require_interface(model)
        if self.epsilon == 0:  # no input step: no gradient needed
            with torch.no_grad():
                return self._scaled_msp(model.logits(x))
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model.logits(x) / self.temperature
            loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, x)
        x_perturbed = x.detach() - self.epsilon * grad.sign()
        with torch.no_grad():
            return self._scaled_msp(model.logits(x_perturbed))

    def _scaled_msp(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=1).max(dim=1).values

    def _score(self, outputs: ModelOutputs) -> Tensor:
        """Without inputs ODIN reduces to temperature-scaled MSP (epsilon = 0)."""
        return self._scaled_msp(outputs.logits)
