"""RankFeat (Song et al. 2022): energy after the largest singular component of the last feature maps is removed."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.head import head_logits
from oodforge.detectors.layers import chosen_layers, layer_key, layer_values
from oodforge.scores import energy_score
from oodforge.util.errors import ConfigError


@DETECTORS.register("rankfeat")
class RankFeat(Detector):
    """Energy T logsumexp(f'(x)/T) of the logits f' the head gives for the last stage's feature map X (C, HW)
    with its rank-1 part s1 u1 v1^T removed and then average-pooled (power iteration, as the paper's fast
    variant; pytorch-ood uses the full SVD). ``layer``: the module whose pooled output is the penultimate
    feature (default: the model's last stage end). The paper's block-3 + block-4 fusion is not included.
    """

    requires: ClassVar[tuple[str, ...]] = ("layers", "head")
    search_space: ClassVar[dict[str, list]] = {"temperature": [0.5, 1.0, 2.0]}

    def __init__(self, layer: str | None = None, temperature: float = 1.0) -> None:
        self.layer = layer
        self.temperature = temperature

    def _check(self) -> None:
        if self.layer is not None and "+" in self.layer:
            raise ConfigError(f"rankfeat: layer names one module, got {self.layer!r}")
        if not self.temperature > 0:
            raise ConfigError(f"rankfeat: temperature must be > 0, got {self.temperature}")

    def layer_keys(self, model: nn.Module | None) -> list[str]:
        """The rank-1-removed spatial mean of the chosen layer."""
        return [layer_key(chosen_layers(model, self.layer)[-1], "rankfeat")]

    def _score(self, outputs: ModelOutputs) -> Tensor:
        if self.model_ is None:
            raise ConfigError("rankfeat needs the classifier's head: pass the model")
        key = self.layer_keys(self.model_)[0]
        pooled = layer_values(outputs, key)
        if pooled.shape[1] != outputs.features.shape[1]:
            raise ConfigError(f"rankfeat: layer {key.split('@')[0]!r} gives {pooled.shape[1]} channels but the head "
                              f"reads {outputs.features.shape[1]} features; name the last stage with layer=")
        return energy_score(head_logits(self.model_, pooled.float()), self.temperature)
