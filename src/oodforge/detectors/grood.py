"""GROOD (ElAraby et al. 2023): nearest-neighbour distance between gradients, with respect to an OOD prototype,
of a nearest-prototype loss."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.chunks import check_chunk_rows, row_slices
from oodforge.detectors.mahalanobis import squared_distances
from oodforge.util.errors import ConfigError

OOD_PROTOTYPES = ("mixup", "mean")
TILE_ELEMENTS = 1 << 22  # float64 query-to-bank distances per block of queries (32 MiB)


@DETECTORS.register("grood")
class GROOD(Detector):
    """Score = -|| g(h) - g_(k)(h) ||, the distance from a sample's gradient g(h) to its ``k``-th nearest
    training gradient.

    Class prototypes p_c are the mean training features of each class c, and p_o is an OOD prototype.
    The nearest-prototype loss of a feature h is the cross-entropy L = CE(softmax(s), y^) of the logits
    s_j = -||h - p_j||, j over the classes and o, with y^ the classifier's prediction (argmax of its
    logits). y^ is an ID class, so only the softmax term touches p_o, and the gradient is
        g(h) = dL/dp_o = q_o(h) (h - p_o) / ||h - p_o||,  q_o = softmax(s)_o,
    computed in this closed form from cached features (float64). The training gradients are those of
    the training rows the classifier gets right; distances are exact Euclidean (blocks of queries
    against the whole bank, which holds one float64 gradient per such row).

    The paper builds p_o from synthetic OOD samples made by mix-up at an early intermediate layer; the
    authors' code (in OpenOOD) mixes each training input's early-layer output half and half with the
    early-layer prototype of its runner-up class c' (the class of its second-largest logit), runs the
    rest of the network, and averages the resulting features. Here the mix is made on the penultimate
    features, so that the fit runs on cached outputs: with ``ood_prototype="mixup"``, p_o is the mean
    over all training rows of lam h + (1 - lam) p_c', ``lam`` = 0.5. Being linear, this mix lands close
    to the mean of the class prototypes, which ``ood_prototype="mean"`` takes (OpenOOD's
    ``use_proto_mean``).

    Source: ElAraby et al., "GROOD: GRadient-aware Out-Of-Distribution detection in interpolated
    manifolds" (arXiv:2312.14427; TMLR 2025 as "GROOD: Gradient-Aware Out-of-Distribution Detection")
    and OpenOOD's ``grood`` postprocessor (``openood/postprocessors/grood.py``). Differences from
    OpenOOD: its default configuration builds p_o from about 100 images of the benchmark's validation
    OOD set (``use_val_ood``), which a detector fitted on ID data alone does not see, and its synthetic
    samples come from the first ~100 training images only; it searches an approximate faiss IVF index
    (4 cells probed) for the nearest neighbour only (its ``k`` option is unused) and scores minus the
    squared distance (same order); here search is exact, ``k`` is used, and every correctly classified
    training row is indexed (OpenOOD leaves out the batch its index is trained on). The fit needs
    labelled training outputs with at least one correctly classified row.
    """

    needs_fit = True
    needs_labels = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {"k": [1, 5, 10, 50], "lam": [0.3, 0.5, 0.7, 0.9]}

    def __init__(self, k: int = 1, ood_prototype: str = "mixup", lam: float = 0.5,
                 chunk_rows: int | None = None) -> None:
        self.k = k
        self.ood_prototype = ood_prototype
        self.lam = lam
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.k < 1:
            raise ConfigError(f"grood: k must be >= 1, got {self.k}")
        if self.ood_prototype not in OOD_PROTOTYPES:
            raise ConfigError(f"grood: ood_prototype must be one of {', '.join(OOD_PROTOTYPES)}, "
                              f"got {self.ood_prototype!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"grood: lam must be in [0, 1], got {self.lam}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        features, logits = train.features.detach(), train.logits.detach()
        labels = train.labels.detach().to(features.device)
        if features.ndim != 2 or len(features) == 0 or logits.ndim != 2 or len(logits) != len(features) or \
                labels.shape != (len(features),):
            raise ConfigError(f"grood: train features (N, D), logits (N, C) and labels (N,) must match, got "
                              f"{tuple(features.shape)}, {tuple(logits.shape)} and {tuple(labels.shape)}")
        logits = logits.to(features.device)
        classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if classes.min() < 0 or classes.max() >= logits.shape[1]:
            raise ConfigError(f"grood: training labels must index the {logits.shape[1]} logits, got labels "
                              f"{classes.min().item()}..{classes.max().item()}")
        sums = torch.zeros(len(classes), features.shape[1], dtype=torch.float64, device=features.device)
        self.prototypes_ = sums.index_add_(0, inverse, features.to(torch.float64)) / counts[:, None]
        self.ood_prototype_ = self._ood_prototype(features, logits[:, classes])
        correct = (logits.argmax(dim=1) == labels).nonzero().squeeze(1)
        if len(correct) == 0:
            raise ConfigError("grood: the classifier gets no training row right, so there are no ID gradients")
        self.gradients_ = self._gradients(features[correct])
        self.k_ = size_within(self, "k", len(correct), "correctly classified training rows it searches")

    def _ood_prototype(self, features: Tensor, logits: Tensor) -> Tensor:
        """p_o from the training features and their logits over the prototypes' classes, float64 (D,)."""
        if self.ood_prototype == "mean":
            return self.prototypes_.mean(dim=0)
        if logits.shape[1] < 2:
            raise ConfigError("grood: ood_prototype='mixup' needs training rows of at least two classes")
        feature_sum = torch.zeros_like(self.prototypes_[0])
        counts = torch.zeros(len(self.prototypes_), dtype=torch.float64, device=features.device)
        for rows in row_slices(len(features), features.shape[1], self.chunk_rows):
            feature_sum += features[rows].to(torch.float64).sum(dim=0)
            runner_up = logits[rows].topk(2, dim=1).indices[:, 1]
            counts += torch.bincount(runner_up, minlength=len(counts)).to(torch.float64)
        mixed = self.lam * feature_sum + (1.0 - self.lam) * (counts @ self.prototypes_)
        return mixed / len(features)

    def _gradients(self, features: Tensor) -> Tensor:
        """g(h) = q_o (h - p_o) / ||h - p_o|| for every row of ``features``, float64 (N, D)."""
        prototypes = self.prototypes_.to(features.device)
        ood = self.ood_prototype_.to(features.device)
        parts = []
        for rows in row_slices(features.shape[0], features.shape[1], self.chunk_rows):
            h = features[rows].to(torch.float64)
            away = h - ood
            ood_distance = away.norm(dim=1, keepdim=True)
            distances = torch.cat([squared_distances(h, prototypes).sqrt(), ood_distance], dim=1)
            ood_probability = torch.softmax(-distances, dim=1)[:, -1:]
            parts.append(ood_probability * away / ood_distance.clamp(min=1e-300))
        return torch.cat(parts) if parts else features.new_zeros(0, features.shape[1], dtype=torch.float64)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features = outputs.features.detach()
        dim = self.prototypes_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim:
            raise ConfigError(f"grood: features must have shape (N, {dim}), got {tuple(features.shape)}")
        queries = self._gradients(features)
        bank = self.gradients_.to(features.device)
        bank_norms = bank.square().sum(dim=1)
        block = max(1, TILE_ELEMENTS // max(1, len(bank)))
        parts = []
        for rows in row_slices(queries.shape[0], len(bank), block):
            query = queries[rows]
            squared = (query.square().sum(dim=1, keepdim=True) + bank_norms - 2.0 * query @ bank.T).clamp(min=0.0)
            parts.append(squared.topk(self.k_, dim=1, largest=False).values[:, -1])
        kth = torch.cat(parts) if parts else queries.new_zeros(0)
        return (-kth.sqrt()).float()
