"""Single-layer pNML (Bibas, Feder & Hassner, NeurIPS 2021): the regret of the last layer's pNML learner."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import check_chunk_rows, row_slices
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError


@DETECTORS.register("pnml")
class PNML(Detector):
    """Score = -Gamma(x), the pNML regret: Gamma = log(sum_c p_c / (p_c + p_c^g (1 - p_c))) / log C.

    x = h / ||h||; g = x^T P x / (1 + x^T P x) with P = pinv(X^T X), X the L2-normalized training features
    (one row each); p = softmax(W x + b), the classifier's linear head applied to the normalized feature.
    Gamma is 0 for a feature the training set spans well and grows to 1 as g -> 1; higher score = more ID.
    Each term is evaluated as 1 / (1 + (1 - p_c) p_c^(g - 1)) in log space, so no probability is clipped
    (pytorch-ood clamps p to [1e-12, 1 - 1e-12]; the official code does neither). Source: Bibas et al.,
    "Single Layer Predictive Normalized Maximum Likelihood for Out-of-Distribution Detection"
    (NeurIPS 2021, arXiv:2110.09246; code github.com/kobybibas/pnml_ood_detection, which scores 1 - Gamma,
    the same ranking). Needs ``fit(train, model)`` with a linear head; the fit runs in float64 and reads the
    training features ``chunk_rows`` rows at a time.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, chunk_rows: int | None = None) -> None:
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        weight, bias = linear_head(self.model_, "pnml")
        features = train.features.detach()
        width = weight.shape[1]
        if features.ndim != 2 or features.shape[1] != width or len(features) == 0:
            raise ConfigError(f"pnml: train features must be non-empty (N, {width}) to match the head, got "
                              f"{tuple(features.shape)}")
        if weight.shape[0] < 2:
            raise ConfigError(f"pnml: the head must have at least 2 classes, got {weight.shape[0]}")
        gram = torch.zeros(width, width, dtype=torch.float64)
        for rows in row_slices(len(features), width, self.chunk_rows):
            normalized = torch.nn.functional.normalize(features[rows].to("cpu", torch.float64), dim=1)
            gram.addmm_(normalized.T, normalized)
        self.projector_ = torch.linalg.pinv(gram, hermitian=True)
        self.weight_, self.bias_ = weight, bias

    def _score(self, outputs: ModelOutputs) -> Tensor:
        width = self.projector_.shape[0]
        features = outputs.features.detach()
        if features.ndim != 2 or features.shape[1] != width:
            raise ConfigError(f"pnml: features must have shape (N, {width}), got {tuple(features.shape)}")
        x = torch.nn.functional.normalize(features.to(self.projector_.device, torch.float64), dim=1)
        log_probs = torch.log_softmax(x @ self.weight_.T + self.bias_, dim=1)
        projection = ((x @ self.projector_) * x).sum(dim=1)
        genie = projection / (1.0 + projection)
        # p / (p + p^g (1 - p)) = 1 / (1 + (1 - p) p^(g - 1)): its log is -log(1 + exp(log(1 - p) + (g - 1) log p));
        # the top class's exponent is at most log C, so only the negligible terms can overflow (to a log of -inf)
        exponent = torch.log1p(-log_probs.exp()) + (genie[:, None] - 1.0) * log_probs
        normalizer = torch.logsumexp(-torch.log1p(exponent.exp()), dim=1)
        return (-normalizer / math.log(log_probs.shape[1])).float().to(features.device)
