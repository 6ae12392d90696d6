"""GEN (Liu, Lochman & Zach, CVPR 2023): generalized entropy of the largest softmax probabilities."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.chunks import CHUNK_ROWS, row_slices
from oodforge.util.errors import ConfigError


@DETECTORS.register("gen")
class GEN(Detector):
    """Score = -sum_{j<=M} p_(j)^gamma (1 - p_(j))^gamma over the M largest softmax probabilities p_(j).

    M must not exceed the number of classes C; the default M = 100 on fewer classes means all C of them (the
    value used is recorded in ``params_used_``), any other M > C is refused (``base.size_within``). Defaults
    gamma = 0.1 and M = 100 are the paper's and those of the official code (github.com/XixiLiu95/GEN,
    ``benchmark.py``) and OpenOOD v1.5 (``configs/postprocessors/gen.yml``,
    ``openood/postprocessors/gen_postprocessor.py``). The grid is OpenOOD's sweep with gamma restricted to
    (0, 1], the range in which the paper defines G_gamma, and smaller M added for datasets with few classes.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits",)
    search_space: ClassVar[dict[str, list]] = {"gamma": [0.01, 0.05, 0.1, 0.5, 1.0],
                                               "m": [1, 5, 10, 50, 100, 1000]}

    def __init__(self, gamma: float = 0.1, m: int = 100) -> None:
        self.gamma = gamma
        self.m = m

    def _check(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"gen: gamma must be in (0, 1], got {self.gamma}")
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ConfigError(f"gen: m must be an integer >= 1, got {self.m!r}")

    def _score(self, outputs: ModelOutputs) -> Tensor:
        logits = outputs.logits.detach()
        m = size_within(self, "m", logits.shape[1], "classes", warn=False)
        parts = [self._block(logits[rows], m) for rows in row_slices(logits.shape[0], logits.shape[1], CHUNK_ROWS)]
        return torch.cat(parts).float() if parts else logits.new_zeros(0, dtype=torch.float32)

    def _block(self, logits: Tensor, m: int) -> Tensor:
        probs = torch.softmax(logits.double(), dim=1)
        top = probs.topk(m, dim=1).values
        return -(top.pow(self.gamma) * (1.0 - top).pow(self.gamma)).sum(dim=1)
