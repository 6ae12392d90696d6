"""Deep nearest neighbours (Sun et al. 2022): distance to the k-th nearest normalized training feature."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs


@DETECTORS.register("knn")
class KNN(Detector):
    """Negative Euclidean distance from h/||h|| to its ``k``-th nearest L2-normalized training feature.

    ``k`` is clamped to the training set size. Search is exact: query blocks times the training
    matrix, with each block's (rows, N_train) float32 similarity matrix kept under ``memory_mb``.
    With ``use_faiss=True`` an exact faiss inner-product index is used when faiss can be imported
    (otherwise a warning, and the torch search).
    """

    needs_fit = True

    def __init__(self, k: int = 50, memory_mb: float = 256.0, use_faiss: bool = False) -> None:
        self.k = k
        self.memory_mb = memory_mb
        self.use_faiss = use_faiss

    def _fit(self, train: ModelOutputs) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if train.features.ndim != 2 or len(train.features) == 0:
            raise ValueError(f"train features must be non-empty (N, D), got {tuple(train.features.shape)}")
        self.train_features_ = normalize(train.features.detach()).contiguous()
        self.k_ = min(self.k, len(self.train_features_))
        self.index_ = _faiss_index(self.train_features_) if self.use_faiss else None

    def _score(self, outputs: ModelOutputs) -> Tensor:
        dim = self.train_features_.shape[1]
        if outputs.features.ndim != 2 or outputs.features.shape[1] != dim:
            raise ValueError(f"features must have shape (N, {dim}), got {tuple(outputs.features.shape)}")
        queries = normalize(outputs.features.detach().to(self.train_features_.device))
        if self.index_ is not None:
            similarities, _ = self.index_.search(queries.cpu().numpy(), self.k_)
            kth = torch.from_numpy(similarities[:, -1]).to(queries.device)
        else:
            kth = self._kth_similarity(queries)
        return -(2.0 - 2.0 * kth).clamp(min=0.0).sqrt().to(outputs.features.device)

    def _kth_similarity(self, queries: Tensor) -> Tensor:
        """Cosine similarity of each query to its k-th most similar training feature, shape (N,)."""
        train = self.train_features_
        rows = max(1, int(self.memory_mb * 2**20) // (4 * len(train)))
        parts = [(block @ train.T).topk(self.k_, dim=1).values[:, -1] for block in queries.split(rows)]
        return torch.cat(parts) if parts else queries.new_zeros(0)


def normalize(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float32 (zero rows stay zero)."""
    return torch.nn.functional.normalize(features.float(), dim=1)


def _faiss_index(train: Tensor):
    """An exact faiss inner-product index over ``train``, or None when faiss is not installed."""
    try:
        import faiss
    except ImportError:
        warnings.warn("use_faiss=True but faiss is not installed; using exact torch search", stacklevel=3)
        return None
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train.cpu().numpy())
    return index
