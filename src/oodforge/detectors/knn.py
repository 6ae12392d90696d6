"""Deep nearest neighbours (Sun et al. 2022): distance to the k-th nearest normalized training feature."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, size_within
from oodforge.detectors.chunks import check_chunk_rows, default_chunk_rows, exporting, row_slices
from oodforge.util.errors import ConfigError

TILE_ELEMENTS = 2 << 20  # similarities per query block: 8 MiB of float32 stay in cache (~20% faster than 256 MiB)
MIN_QUERIES = 16  # but never fewer queries than this per matrix product


@DETECTORS.register("knn")
class KNN(Detector):
    """Negative Euclidean distance from h/||h|| to its ``k``-th nearest L2-normalized training feature.

    ``k`` must not exceed the number of training features; the default ``k``, when it does, is clamped to it
    with a warning (``base.size_within``). Search is exact: blocks of queries times the training
    matrix, each block's float32 similarity matrix kept under ``memory_mb``. A training set of at
    most ``memory_mb`` (as float32) is kept as one normalized copy; a larger one is not copied: the
    detector keeps a reference to the training features (which must then stay unchanged, e.g. a
    memory-mapped array) and their inverse norms, and scans them ``chunk_rows`` rows at a time
    (default: 256 MiB of float64 per chunk, fewer when ``memory_mb`` asks), keeping a running top-k.
    With ``use_faiss=True`` an exact faiss inner-product index is used when faiss can be imported
    (otherwise a warning, and the torch search).
    """

    needs_fit = True
    requires: ClassVar[tuple[str, ...]] = ("features", "train")
    search_space: ClassVar[dict[str, list]] = {"k": [1, 5, 10, 20, 50, 100, 200]}

    def __init__(
        self, k: int = 50, memory_mb: float = 256.0, use_faiss: bool = False, chunk_rows: int | None = None
    ) -> None:
        self.k = k
        self.memory_mb = memory_mb
        self.use_faiss = use_faiss
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if self.k < 1:
            raise ConfigError(f"knn: k must be >= 1, got {self.k}")
        if not self.memory_mb > 0:
            raise ConfigError(f"knn: memory_mb must be > 0, got {self.memory_mb}")
        check_chunk_rows(self.chunk_rows)

    def _fit(self, train: ModelOutputs) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if not self.memory_mb > 0:
            raise ConfigError(f"memory_mb must be > 0, got {self.memory_mb}")
        check_chunk_rows(self.chunk_rows)
        features = train.features.detach()
        if features.ndim != 2 or len(features) == 0:
            raise ConfigError(f"train features must be non-empty (N, D), got {tuple(features.shape)}")
        self.k_ = size_within(self, "k", len(features), "training features it searches")
        if 4 * features.numel() <= self.memory_mb * 2**20:
            self.train_features_ = normalize(features).contiguous()
            self.train_inverse_norms_ = None
        else:
            self.train_features_ = features
            self.train_inverse_norms_ = _inverse_norms(features, self.chunk_rows)
        self.index_ = _faiss_index(features, self.chunk_rows) if self.use_faiss else None

    def _score(self, outputs: ModelOutputs) -> Tensor:
        dim = self.train_features_.shape[1]
        if outputs.features.ndim != 2 or outputs.features.shape[1] != dim:
            raise ConfigError(f"features must have shape (N, {dim}), got {tuple(outputs.features.shape)}")
        features = outputs.features.detach()
        if self.index_ is not None:
            similarities, _ = self.index_.search(normalize(features).cpu().numpy(), self.k_)
            kth = torch.from_numpy(similarities[:, -1])
        else:
            kth = self._kth_similarity(features)
        return -(2.0 - 2.0 * kth).clamp(min=0.0).sqrt().to(outputs.features.device)

    def _kth_similarity(self, features: Tensor) -> Tensor:
        """Cosine similarity of each query to its k-th most similar training feature, shape (N,)."""
        train, inverse_norms = self.train_features_, self.train_inverse_norms_
        if exporting():  # one matmul and top-k against the whole bank, for any batch size
            similarities = normalize(features.to(train.device)) @ train.float().T
            if inverse_norms is not None:
                similarities = similarities * inverse_norms
            return similarities.topk(self.k_, dim=1).values[:, -1]
        chunks, block_rows = self._scan_plan()
        width = chunks[0].stop - chunks[0].start
        buffer = torch.empty(min(len(features), block_rows) * width, device=train.device)  # reused by every step
        parts = []
        for block in features.split(block_rows):
            queries = normalize(block.to(train.device))
            best = None
            for rows in chunks:
                shape = (len(queries), rows.stop - rows.start)
                similarities = buffer[: shape[0] * shape[1]].view(shape)
                torch.mm(queries, train[rows].float().T, out=similarities)
                if inverse_norms is not None:
                    similarities.mul_(inverse_norms[rows])
                best = _merge_top(best, similarities, self.k_)
            parts.append(best[:, -1])
        return torch.cat(parts) if parts else features.new_zeros(0, dtype=torch.float32, device=train.device)

    def _scan_plan(self) -> tuple[list[slice], int]:
        """Training row chunks and queries per block, so that one block's similarities fit ``memory_mb``."""
        train = self.train_features_
        budget = max(1, int(self.memory_mb * 2**20) // 4)  # float32 similarities per block
        if self.train_inverse_norms_ is None:
            chunks = [slice(0, len(train))]
        else:
            chunk_rows = min(len(train), budget, self.chunk_rows or default_chunk_rows(train.shape[1]))
            chunks = row_slices(len(train), train.shape[1], chunk_rows)
        width = chunks[0].stop - chunks[0].start
        return chunks, max(1, min(budget // width, max(MIN_QUERIES, TILE_ELEMENTS // width)))


def _merge_top(best: Tensor | None, similarities: Tensor, k: int) -> Tensor:
    """The (up to) ``k`` largest values per row of ``best`` and ``similarities`` together, descending."""
    top = similarities.topk(min(k, similarities.shape[1]), dim=1).values
    if best is None:
        return top
    merged = torch.cat([best, top], dim=1)
    return merged.topk(min(k, merged.shape[1]), dim=1).values


def _inverse_norms(features: Tensor, chunk_rows: int | None) -> Tensor:
    """1 / max(||h||, 1e-12) of every row, float32, shape (N,), computed chunk by chunk in float64."""
    parts = [
        1.0 / features[rows].double().norm(dim=1).clamp(min=1e-12)
        for rows in row_slices(len(features), features.shape[1], chunk_rows)
    ]
    return torch.cat(parts).float()


def normalize(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float32 (zero rows stay zero)."""
    return torch.nn.functional.normalize(features.float(), dim=1)


def _faiss_index(features: Tensor, chunk_rows: int | None):
    """An exact faiss inner-product index over the normalized ``features`` (added chunk by chunk), or None
    when faiss is not installed."""
    try:
        import faiss
    except ImportError:
        warnings.warn("use_faiss=True but faiss is not installed; using exact torch search", stacklevel=3)
        return None
    index = faiss.IndexFlatIP(features.shape[1])
    for rows in row_slices(len(features), features.shape[1], chunk_rows):
        index.add(normalize(features[rows]).cpu().numpy())
    return index
