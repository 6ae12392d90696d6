"""Neural Relation Graph (Kim et al., NeurIPS 2023): summed kernel similarity to a bank of training samples."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import exporting, row_slices
from oodforge.detectors.nnguide import sample_rows
from oodforge.util.errors import ConfigError

QUERY_TILE, BANK_TILE = 256, 4096  # one kernel tile: 4 MiB of float32, so it stays in cache (2x faster)


@DETECTORS.register("relation")
class Relation(Detector):
    """Score = sum over bank samples j with k_j > ``threshold`` of k_j ** ``power``, where
    k_j = max(0, cos(h, h_j)) * <softmax(f(x)), softmax(f(x_j))>.

    The kernel multiplies the (clamped) cosine similarity of the features by the inner product of
    the class-probability vectors; edges at or below ``threshold`` are dropped. Higher = more ID (the
    official code reports 1 / (score + 1e-6) as an OOD score, which ranks the same). Sources: Kim et
    al., "Neural Relation Graph: A Unified Framework for Identifying Label Noise and Outlier Data"
    (NeurIPS 2023, arXiv:2301.12321), the official code github.com/snu-mllab/Neural-Relation-Graph
    (relation.py: kernel ``cos_p``, thres = 0.03; its README: ``--pow 1`` for OOD detection) and OpenOOD
    v1.5's openood/postprocessors/relation_postprocessor.py with configs/postprocessors/relation.yml
    (pow = 1, swept over 1, 2, 4, 6, 8). Both use the whole training set as the bank; here, by default, the
    bank is a seeded random subset of ``bank_size`` = 20,000 training samples (all of them when the training
    set is smaller; the whole set with ``bank_size=None``), so that scoring stays cheap next to the forward
    passes: on CIFAR-10 (ResNet-20, 50,000 training images) the full bank costs 4.2 s per 41,200 queries on
    one thread and 20,000 samples 1.7 s, with AUROCs within 0.5 points of the full bank (two seeds;
    ``benchmarks/relation_bank.py``).
    The official code offers a strided ``--hop`` subsample for the same reason. The bank is kept as
    float32 normalized features and probabilities (gathered ``chunk_rows`` rows at a time; indices in
    ``bank_indices_``), so that a large training set (1.28M ImageNet rows) is never copied whole. Queries
    meet the bank in tiles of QUERY_TILE x BANK_TILE, small enough to stay in cache.
    """

    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {"power": [1.0, 2.0, 4.0, 6.0, 8.0]}
    needs_fit: ClassVar[bool] = True

    def __init__(self, power: float = 1.0, threshold: float = 0.03, bank_size: int | None = 20000, seed: int = 0,
                 chunk_rows: int = 16384) -> None:
        self.power = power
        self.threshold = threshold
        self.bank_size = bank_size
        self.seed = seed
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if not self.power > 0:
            raise ConfigError(f"relation: power must be > 0, got {self.power}")
        if not self.threshold >= 0:
            raise ConfigError(f"relation: threshold must be >= 0, got {self.threshold}")
        if self.bank_size is not None and not self.bank_size >= 1:
            raise ConfigError(f"relation: bank_size must be None or >= 1, got {self.bank_size}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"relation: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        features, logits = train.features.detach(), train.logits.detach()
        if features.ndim != 2 or len(features) == 0 or logits.ndim != 2 or len(logits) != len(features):
            raise ConfigError(f"relation: train features (N, D) and logits (N, C) must be non-empty with equal N, "
                             f"got {tuple(features.shape)} and {tuple(logits.shape)}")
        self.bank_indices_ = sample_rows(len(features), self.bank_size, self.seed)
        bank_features, bank_probabilities = [], []
        for indices in self.bank_indices_.split(self.chunk_rows):
            bank_features.append(F.normalize(features[indices.to(features.device)].to(torch.float64), dim=1).float())
            chunk_logits = logits[indices.to(logits.device)].to(features.device, torch.float64)
            bank_probabilities.append(torch.softmax(chunk_logits, dim=1).float())
        self.bank_features_ = torch.cat(bank_features)
        self.bank_probabilities_ = torch.cat(bank_probabilities)

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features, logits = outputs.features.detach(), outputs.logits.detach()
        dim, classes = self.bank_features_.shape[1], self.bank_probabilities_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim or logits.shape != (features.shape[0], classes):
            raise ConfigError(f"relation: features must be (N, {dim}) and logits (N, {classes}), got "
                             f"{tuple(features.shape)} and {tuple(logits.shape)}")
        device = features.device
        bank_features, bank_probabilities = self.bank_features_.to(device), self.bank_probabilities_.to(device)
        bank_tiles = [slice(start, min(start + BANK_TILE, len(bank_features)))
                      for start in range(0, len(bank_features), BANK_TILE)]
        if not exporting():  # reused buffers (a traced graph allocates per tile, for any batch size)
            width = min(BANK_TILE, len(bank_features))
            cosines, products = (torch.empty(min(QUERY_TILE, len(features)) * width, device=device) for _ in range(2))
        parts = []
        for rows in row_slices(features.shape[0], dim, QUERY_TILE):
            queries = F.normalize(features[rows].to(torch.float64), dim=1).float()
            probabilities = torch.softmax(logits[rows].to(device, torch.float64), dim=1).float()
            total = torch.zeros(queries.shape[0], dtype=torch.float64, device=device)
            for tile in bank_tiles:
                if exporting():
                    kernel, product = queries @ bank_features[tile].T, probabilities @ bank_probabilities[tile].T
                else:
                    size = len(queries) * (tile.stop - tile.start)  # contiguous views of the reused buffers
                    kernel, product = (b[:size].view(len(queries), -1) for b in (cosines, products))
                    torch.mm(queries, bank_features[tile].T, out=kernel)
                    torch.mm(probabilities, bank_probabilities[tile].T, out=product)
                kernel.mul_(product)  # cos * (p . p_j)
                F.threshold_(kernel, self.threshold, 0.0)  # in place; threshold >= 0 also drops negative cosines
                if self.power != 1.0:
                    kernel.pow_(self.power)
                total += kernel.sum(dim=1)  # float32 within a tile of BANK_TILE, float64 across tiles
            parts.append(total)
        scores = torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float64)
        return scores.float()
