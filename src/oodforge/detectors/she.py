"""SHE (Zhang et al., ICLR 2023): similarity of the feature to the stored pattern of its predicted class."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.util.errors import ConfigError

METRICS = ("inner_product", "euclidean", "cosine")


@DETECTORS.register("she")
class SHE(Detector):
    """Score = <h, s_p>, s_p = the stored pattern of the predicted class p (argmax of the logits).

    The pattern of class c is the mean training feature of the training samples labelled c AND
    predicted c (argmax of their logits); a class without such samples falls back to the mean of all
    samples labelled c (with a warning), and to zeros without any. ``metric`` "euclidean" scores
    -||h - s_p|| and "cosine" cos(h, s_p) instead. Sources: Zhang et al., "Out-of-Distribution
    Detection based on In-Distribution Data Patterns Memorization with Modern Hopfield Energy"
    (ICLR 2023, openreview.net/forum?id=KkazG4lgKL) and OpenOOD v1.5's
    openood/postprocessors/she_postprocessor.py with configs/postprocessors/she.yml (metric =
    inner_product). Needs labelled training outputs; patterns are accumulated in float64,
    ``chunk_rows`` rows at a time.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {}
    needs_fit: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True

    def __init__(self, metric: str = "inner_product", chunk_rows: int = 16384) -> None:
        self.metric = metric
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"she: metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"she: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        features, logits = train.features.detach(), train.logits.detach()
        labels = train.labels.detach().to(features.device).long()
        if features.ndim != 2 or len(features) == 0 or logits.ndim != 2 or len(logits) != len(features) \
                or labels.shape != (len(features),):
            raise ConfigError(f"she: train features (N, D), logits (N, C) and labels (N,) must be non-empty with equal "
                             f"N, got {tuple(features.shape)}, {tuple(logits.shape)} and {tuple(labels.shape)}")
        classes = logits.shape[1]
        low, high = labels.min().item(), labels.max().item()
        if low < 0 or high >= classes:
            raise ConfigError(f"she: labels must be class indices in [0, {classes}), got {low}..{high}")
        correct_sums, correct_counts, all_sums, all_counts = self._sums(features, logits, labels, classes)
        has_correct = correct_counts > 0
        if not has_correct.all():
            warnings.warn(f"she: {int((~has_correct).sum())} of {classes} classes have no correctly classified "
                          "training sample; their patterns are the mean of all samples of the class", stacklevel=3)
        self.patterns_ = torch.where(has_correct[:, None], correct_sums / correct_counts.clamp(min=1)[:, None],
                                     all_sums / all_counts.clamp(min=1)[:, None])

    def _sums(self, features: Tensor, logits: Tensor, labels: Tensor, classes: int) -> tuple[Tensor, ...]:
        """Per class, feature sums (C, D) and counts (C,) of the correctly classified samples, then of all."""
        correct_sums = torch.zeros(classes, features.shape[1], dtype=torch.float64, device=features.device)
        all_sums = torch.zeros_like(correct_sums)
        correct_counts = torch.zeros(classes, dtype=torch.float64, device=features.device)
        all_counts = torch.zeros_like(correct_counts)
        for start in range(0, len(features), self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            chunk, chunk_labels = features[rows].to(torch.float64), labels[rows]
            correct = logits[rows].argmax(dim=1).to(labels.device) == chunk_labels
            all_sums.index_add_(0, chunk_labels, chunk)
            correct_sums.index_add_(0, chunk_labels[correct], chunk[correct])
            all_counts += torch.bincount(chunk_labels, minlength=classes)
            correct_counts += torch.bincount(chunk_labels[correct], minlength=classes)
        return correct_sums, correct_counts, all_sums, all_counts

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features, logits = outputs.features.detach(), outputs.logits.detach()
        classes, dim = self.patterns_.shape
        if features.ndim != 2 or features.shape[1] != dim or logits.shape != (features.shape[0], classes):
            raise ConfigError(f"she: features must be (N, {dim}) and logits (N, {classes}), got "
                             f"{tuple(features.shape)} and {tuple(logits.shape)}")
        patterns = self.patterns_.to(features.device)
        parts = []
        for rows in row_slices(features.shape[0], dim, self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            pattern = patterns[logits[rows].argmax(dim=1).to(features.device)]
            if self.metric == "inner_product":
                parts.append((chunk * pattern).sum(dim=1))
            elif self.metric == "euclidean":
                parts.append(-(chunk - pattern).norm(dim=1))
            else:
                parts.append(F.cosine_similarity(chunk, pattern, dim=1))
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()
