"""KL matching (Hendrycks et al., ICML 2022): KL divergence of the posterior to class posterior templates."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import CHUNK_ROWS, row_slices
from oodforge.util.errors import ConfigError

MATCHES = ("nearest", "predicted")


@DETECTORS.register("klm")
class KLMatching(Detector):
    """Score = -min_k KL(p(x) || d_k), d_k = mean softmax of the fitting outputs the model predicts as class k.

    From "Scaling Out-of-Distribution Detection for Real-World Settings" (arXiv:1911.11132, Sec. 4):
    templates d_k from (label-free) ID validation outputs, anomaly score min_k KL[p(y|x) || d_k]. The
    argument order and the minimum over all templates follow the paper and OpenOOD v1.5
    (``openood/postprocessors/kl_matching_postprocessor.py``: ``scipy.stats.entropy(p, d_k)`` inside
    ``pairwise_distances_argmin_min``) and pytorch-ood 0.4.0. ``match="predicted"`` uses only the template of the
    class x is predicted as, KL(p(x) || d_pred(x)) (earlier pytorch-ood releases). Classes that no fitting sample is
    predicted as have no template: they are left out of the minimum (OpenOOD gives them a one-hot
    template, whose KL is infinite for any non-one-hot p: the same), and with ``match="predicted"`` a
    sample predicted as such a class falls back to the nearest template. Fitted on the outputs passed
    to ``fit`` (validation outputs when the caller has them), ``CHUNK_ROWS`` rows at a time, float64.
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "train")
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, match: str = "nearest") -> None:
        self.match = match

    def _check(self) -> None:
        if self.match not in MATCHES:
            raise ConfigError(f"klm: match must be one of {', '.join(MATCHES)}, got {self.match!r}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        logits = train.logits.detach()
        if logits.ndim != 2 or len(logits) == 0:
            raise ConfigError(f"klm: need non-empty (N, C) training logits, got {tuple(logits.shape)}")
        classes = logits.shape[1]
        sums = torch.zeros(classes, classes, dtype=torch.float64, device=logits.device)
        counts = torch.zeros(classes, dtype=torch.float64, device=logits.device)
        for start in range(0, len(logits), CHUNK_ROWS):
            probs = torch.softmax(logits[start:start + CHUNK_ROWS].double(), dim=1)
            predicted = probs.argmax(dim=1)
            sums.index_add_(0, predicted, probs)
            counts += torch.bincount(predicted, minlength=classes).double()
        present = counts > 0
        self.template_classes_ = present.nonzero().squeeze(1).cpu()
        self.templates_ = (sums[present] / counts[present, None]).cpu()

    def _score(self, outputs: ModelOutputs) -> Tensor:
        logits = outputs.logits.detach()
        if logits.ndim != 2 or logits.shape[1] != self.templates_.shape[1]:
            raise ConfigError(f"klm: logits must be (N, {self.templates_.shape[1]}), got {tuple(logits.shape)}")
        parts = [self._block(logits[rows]) for rows in row_slices(logits.shape[0], logits.shape[1], CHUNK_ROWS)]
        return torch.cat(parts).float() if parts else logits.new_zeros(0, dtype=torch.float32)

    def _block(self, logits: Tensor) -> Tensor:
        """-KL(p || template) per row, float64."""
        log_probs = torch.log_softmax(logits.double(), dim=1)
        probs = log_probs.exp()
        log_templates = self.templates_.to(probs.device).clamp_min(torch.finfo(torch.float64).tiny).log()
        divergences = (probs * log_probs).sum(dim=1, keepdim=True) - probs @ log_templates.T  # (n, K)
        nearest = divergences.min(dim=1).values
        if self.match == "nearest":
            return -nearest
        lookup = torch.full((logits.shape[1],), -1, dtype=torch.long, device=probs.device)
        lookup[self.template_classes_.to(probs.device)] = torch.arange(len(self.template_classes_),
                                                                        device=probs.device)
        rows = lookup[probs.argmax(dim=1)]
        own = divergences.gather(1, rows.clamp_min(0)[:, None]).squeeze(1)
        return -torch.where(rows >= 0, own, nearest)
