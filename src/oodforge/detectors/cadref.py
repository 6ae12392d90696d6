"""CARef and CADRef (Ling et al., CVPR 2025): the relative error of a feature to its predicted class's mean feature,
whole (CARef) or split by the sign of the class weights and weighed by a logit score (CADRef)."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.head import linear_head
from oodforge.util.errors import ConfigError

LOGIT_SCORES = ("energy", "maxlogit", "msp", "gen")
TINY = 1e-12  # floor of ||h||_1 (an all-zero feature would divide by zero)


@DETECTORS.register("caref")
class CARef(Detector):
    """Score = -||h - mu_p||_1 / ||h||_1: the class-aware relative error of the feature h.

    p = argmax f(x) is the predicted class and mu_p the mean feature of the training samples the model
    predicts as p (grouped by prediction, not by label, as in the official code). A class that no training
    sample is predicted as falls back to the mean of the training samples labelled with it, or, without
    those, to the mean of all training features (with a warning). Source: Ling et al.,
    "CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative Feature
    Leveraging" (CVPR 2025, arXiv:2503.00325) and the official code github.com/LingAndZero/CADRef
    (``ood_methods/CARef.py``, ``utils/get_stat.py``). Runs in float64; training features are read
    ``chunk_rows`` rows at a time.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, chunk_rows: int = 16384) -> None:
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not self.chunk_rows >= 1:
            raise ConfigError(f"{self._label()}: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        self.means_ = predicted_class_means(train, self.chunk_rows, self._label())

    def _relative_errors(self, outputs: ModelOutputs, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        """(h - mu_p, ||h||_1, p) for ``rows`` of ``outputs``, float64."""
        features = outputs.features[rows].to(torch.float64)
        predicted = outputs.logits[rows].argmax(dim=1)
        difference = features - self.means_.to(features.device)[predicted]
        return difference, features.abs().sum(dim=1).clamp(min=TINY), predicted

    def _checked(self, outputs: ModelOutputs) -> ModelOutputs:
        features, logits = outputs.features.detach(), outputs.logits.detach()
        classes, dim = self.means_.shape
        if features.ndim != 2 or features.shape[1] != dim or logits.shape != (features.shape[0], classes):
            raise ConfigError(f"{self._label()}: features must be (N, {dim}) with logits (N, {classes}), got "
                              f"{tuple(features.shape)} and {tuple(logits.shape)}")
        return ModelOutputs(logits, features)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        outputs = self._checked(outputs)
        parts = []
        for rows in row_slices(outputs.features.shape[0], outputs.features.shape[1], self.chunk_rows):
            difference, norm, _ = self._relative_errors(outputs, rows)
            parts.append(-difference.abs().sum(dim=1) / norm)
        scores = torch.cat(parts) if parts else outputs.features.new_zeros(0, dtype=torch.float64)
        return scores.float()


@DETECTORS.register("cadref")
class CADRef(CARef):
    """Score = -(E+(x) / S(f(x)) + E-(x) / mean_train S): decoupled relative errors over a logit score.

    With d = h - mu_p (CARef's difference to the predicted class's mean training feature) and s = sign(w_p)
    the signs of the predicted class's weights in the linear head, E+ = ||max(d * s, 0)||_1 / ||h||_1 is
    the error along the class weights (which raises the logit) and E- = ||max(-d * s, 0)||_1 / ||h||_1 the
    error against them. E+ is divided by the sample's own logit score S (``logit_score``: ``energy`` =
    logsumexp, ``maxlogit``, ``msp`` or ``gen`` = 1 / sum_j p_j^0.1 (1 - p_j)^0.1 over the max(10, C // 10)
    largest probabilities), E- by the mean S over the training samples. The logit score must be positive for
    the score to make sense (energy and max logit of a trained classifier are). Source: Ling et al.,
    "CADRef: Robust Out-of-Distribution Detection via Class-Aware Decoupled Relative Feature Leveraging"
    (CVPR 2025, arXiv:2503.00325) and the official code github.com/LingAndZero/CADRef
    (``ood_methods/CADRef.py``, energy by default). Needs ``fit(train, model)`` with a linear head.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train", "head")
    search_space: ClassVar[dict[str, list]] = {"logit_score": list(LOGIT_SCORES)}

    def __init__(self, logit_score: str = "energy", chunk_rows: int = 16384) -> None:
        self.logit_score = logit_score
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        super()._check()
        if self.logit_score not in LOGIT_SCORES:
            raise ConfigError(f"cadref: logit_score must be one of {', '.join(LOGIT_SCORES)}, "
                              f"got {self.logit_score!r}")

    def _fit(self, train: ModelOutputs) -> None:
        super()._fit(train)
        weight, _ = linear_head(self.model_, "cadref")
        if weight.shape != self.means_.shape:
            raise ConfigError(f"cadref: the head's weight {tuple(weight.shape)} does not match {self.means_.shape[0]} "
                              f"classes of {self.means_.shape[1]}-d features")
        self.signs_ = weight.sign().to(self.means_.device)
        logits = train.logits.detach()
        total = sum(logit_score(logits[rows].to(torch.float64), self.logit_score).sum()
                    for rows in row_slices(logits.shape[0], logits.shape[1], self.chunk_rows))
        self.train_logit_score_ = total / len(logits)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        outputs = self._checked(outputs)
        signs = self.signs_.to(outputs.features.device)
        mean_score = self.train_logit_score_.to(outputs.features.device)
        parts = []
        for rows in row_slices(outputs.features.shape[0], outputs.features.shape[1], self.chunk_rows):
            difference, norm, predicted = self._relative_errors(outputs, rows)
            aligned = difference * signs[predicted]
            positive = aligned.clamp(min=0).sum(dim=1) / norm
            negative = (-aligned).clamp(min=0).sum(dim=1) / norm
            own = logit_score(outputs.logits[rows].to(torch.float64), self.logit_score)
            parts.append(-(positive / own + negative / mean_score))
        scores = torch.cat(parts) if parts else outputs.features.new_zeros(0, dtype=torch.float64)
        return scores.float()


def logit_score(logits: Tensor, kind: str) -> Tensor:
    """CADRef's logit-based confidence S of each row: energy, max logit, MSP or GEN (as its official code)."""
    if kind == "energy":
        return torch.logsumexp(logits, dim=1)
    if kind == "maxlogit":
        return logits.max(dim=1).values
    probabilities = torch.softmax(logits, dim=1)
    if kind == "msp":
        return probabilities.max(dim=1).values
    top = probabilities.topk(min(logits.shape[1], max(10, logits.shape[1] // 10)), dim=1).values
    return 1.0 / (top.pow(0.1) * (1.0 - top).pow(0.1)).sum(dim=1)


def predicted_class_means(train: ModelOutputs, chunk_rows: int, label: str) -> Tensor:
    """Mean training feature of each class over the samples predicted as it, float64 (C, D); a class predicted
    for none falls back to its labelled samples' mean, else to the mean of all training features."""
    features, logits = train.features.detach(), train.logits.detach()
    if features.ndim != 2 or len(features) == 0 or logits.ndim != 2 or len(logits) != len(features):
        raise ConfigError(f"{label}: train features (N, D) and logits (N, C) must be non-empty and match, got "
                          f"{tuple(features.shape)} and {tuple(logits.shape)}")
    classes, dim = logits.shape[1], features.shape[1]
    sums = torch.zeros(classes, dim, dtype=torch.float64, device=features.device)
    counts = torch.zeros(classes, dtype=torch.float64, device=features.device)
    labelled_sums, labelled_counts = torch.zeros_like(sums), torch.zeros_like(counts)
    labels = None if train.labels is None else train.labels.detach().to(features.device)
    for rows in row_slices(len(features), dim, chunk_rows):
        chunk = features[rows].to(torch.float64)
        predicted = logits[rows].argmax(dim=1).to(features.device)
        sums.index_add_(0, predicted, chunk)
        counts.index_add_(0, predicted, torch.ones_like(predicted, dtype=torch.float64))
        if labels is not None:
            kept = (labels[rows] >= 0) & (labels[rows] < classes)
            labelled_sums.index_add_(0, labels[rows][kept], chunk[kept])
            labelled_counts.index_add_(0, labels[rows][kept], torch.ones(int(kept.sum()), dtype=torch.float64,
                                                                         device=features.device))
    means = sums / counts.clamp(min=1)[:, None]
    missing = counts == 0
    if missing.any():
        warnings.warn(f"{label}: {int(missing.sum())} of {classes} classes are predicted for no training sample; "
                      "their means are those of their labelled samples (or of all samples)", stacklevel=4)
        fallback = torch.where((labelled_counts > 0)[:, None], labelled_sums / labelled_counts.clamp(min=1)[:, None],
                               sums.sum(dim=0) / len(features))
        means[missing] = fallback[missing]
    return means
