"""KNN, Mahalanobis and ViM fitted chunk by chunk against few-line full-matrix numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from oodforge.detectors.base import ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.knn import KNN
from oodforge.detectors.mahalanobis import Mahalanobis, squared_distances
from oodforge.detectors.vim import ViM

ROWS, DIM, CLASSES = 500, 16, 5


class TinyClassifier(nn.Module):
    """Just a head, which is all ViM uses from the model."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


def class_outputs(n: int, seed: int, head: nn.Linear, unseen: bool = False) -> ModelOutputs:
    """relu(class mean + noise) features of CLASSES classes (fresh means when ``unseen``), and the head's logits."""
    generator = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1000 + unseen))
    labels = torch.randint(CLASSES, (n,), generator=generator)
    features = (means[labels] + torch.randn(n, DIM, generator=generator)).relu()
    with torch.no_grad():
        return ModelOutputs(head(features), features, None if unseen else labels)


@pytest.fixture
def data() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs]:
    head = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        head.weight.copy_(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(7)))
        head.bias.copy_(torch.randn(CLASSES, generator=torch.Generator().manual_seed(8)))
    train = class_outputs(ROWS, seed=1, head=head)
    known, unseen = class_outputs(30, seed=2, head=head), class_outputs(30, seed=3, head=head, unseen=True)
    test = ModelOutputs(torch.cat([known.logits, unseen.logits]), torch.cat([known.features, unseen.features]))
    return TinyClassifier(head), train, test


def test_row_slices_cover_every_row_once():
    assert row_slices(20, 4, 7) == [slice(0, 7), slice(7, 14), slice(14, 20)]
    assert row_slices(0, 4, 7) == []
    assert row_slices(10, 2**30) == [slice(i, i + 1) for i in range(10)]  # one row a chunk at least
    assert row_slices(10, 16) == [slice(0, 10)]


@pytest.mark.parametrize("elements", [1, 7, 80, 10**6])
def test_squared_distances_in_blocks(elements):
    generator = torch.Generator().manual_seed(4)
    points, centres = torch.randn(23, 8, generator=generator).double(), torch.randn(5, 8, generator=generator).double()
    expected = ((points.numpy()[:, None, :] - centres.numpy()[None]) ** 2).sum(axis=2)
    np.testing.assert_allclose(squared_distances(points, centres, elements).numpy(), expected, rtol=1e-12)
    assert squared_distances(points[:0], centres, elements).shape == (0, 5)


def test_mahalanobis_chunked_matches_numpy(data):
    model, train, test = data
    x, y, q = train.features.double().numpy(), train.labels.numpy(), test.features.double().numpy()
    means = np.stack([x[y == c].mean(axis=0) for c in range(CLASSES)])
    centred = x - means[y]
    precision = np.linalg.pinv(centred.T @ centred / len(x))
    diff = q[:, None, :] - means[None]
    expected = -np.einsum("nci,ij,ncj->nc", diff, precision, diff).min(axis=1)
    detector = Mahalanobis(chunk_rows=7).fit(train, model)
    whitening = detector.whitening_.numpy()
    np.testing.assert_allclose(whitening @ whitening.T, precision, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(detector.whitened_means_.numpy(), means @ whitening, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(detector.score_outputs(test).numpy(), expected, rtol=1e-5)
    unchunked = Mahalanobis().fit(train, model).score_outputs(test)
    torch.testing.assert_close(detector.score_outputs(test), unchunked, rtol=1e-6, atol=1e-6)


def reference_vim(model: TinyClassifier, train: ModelOutputs, test: ModelOutputs, dim: int) -> dict:
    """ViM with numpy on whole matrices: origin, residual projector, alpha and test scores."""
    weight, bias = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    origin = -np.linalg.pinv(weight) @ bias
    centred = train.features.double().numpy() - origin
    _, vectors = np.linalg.eigh(centred.T @ centred / len(centred))
    residual = vectors[:, : DIM - dim]
    alpha = train.logits.double().numpy().max(axis=1).mean() / np.linalg.norm(centred @ residual, axis=1).mean()
    logits = test.logits.double().numpy()
    energy = logits.max(axis=1) + np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1))
    virtual = alpha * np.linalg.norm((test.features.double().numpy() - origin) @ residual, axis=1)
    return {"origin": origin, "projector": residual @ residual.T, "alpha": alpha, "scores": energy - virtual}


@pytest.mark.parametrize("dim", [None, 3, 12])
def test_vim_chunked_matches_numpy(data, dim):
    model, train, test = data
    expected = reference_vim(model, train, test, DIM // 2 if dim is None else dim)
    detector = ViM(dim=dim, chunk_rows=7).fit(train, model)
    np.testing.assert_allclose(detector.origin_.numpy(), expected["origin"], rtol=1e-9, atol=1e-9)
    basis = detector.residual_basis_.numpy()
    np.testing.assert_allclose(basis @ basis.T, expected["projector"], atol=1e-8)
    assert detector.alpha_ == pytest.approx(expected["alpha"], rel=1e-10)
    np.testing.assert_allclose(detector.score_outputs(test).numpy(), expected["scores"], rtol=1e-5, atol=1e-4)
    unchunked = ViM(dim=dim).fit(train, model).score_outputs(test)
    torch.testing.assert_close(detector.score_outputs(test), unchunked, rtol=1e-6, atol=1e-5)


def reference_knn(train: ModelOutputs, test: ModelOutputs, k: int) -> np.ndarray:
    """Minus sqrt(2 - 2 s_k), s_k the k-th largest cosine similarity of a query to a training row (0 for zero rows)."""
    x, q = train.features.double().numpy(), test.features.double().numpy()
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    kth = -np.sort(-(q @ x.T), axis=1)[:, min(k, len(x)) - 1]
    return -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))


@pytest.mark.parametrize("k", [1, 5, 50, 499, 500])  # 500: every row (a larger k is refused)
@pytest.mark.parametrize("path", ["in_memory", "chunked"])
def test_knn_matches_numpy(data, k, path):
    _, train, test = data
    features = train.features.clone()
    features[3] = 0.0  # a zero row stays at similarity 0, as F.normalize leaves it
    train = ModelOutputs(train.logits, features, train.labels)
    options = {"memory_mb": 0.01, "chunk_rows": 7} if path == "chunked" else {}
    detector = KNN(k=k, **options).fit(train)
    if path == "chunked":
        assert detector.train_features_.data_ptr() == features.data_ptr()  # a reference, not a copy
        assert detector.train_inverse_norms_.shape == (ROWS,)
    else:
        assert detector.train_inverse_norms_ is None
        assert detector.train_features_.data_ptr() != features.data_ptr()
    scores = detector.score_outputs(test)
    np.testing.assert_allclose(scores.double().numpy(), reference_knn(train, test, k), rtol=1e-5, atol=1e-5)


def test_knn_chunked_default_chunk_rows_and_empty_queries(data):
    _, train, test = data
    detector = KNN(k=10, memory_mb=0.02).fit(train)  # 32 KB of float32 features > 20 KB: chunked, default rows
    assert detector.train_inverse_norms_ is not None
    np.testing.assert_allclose(detector.score_outputs(test).numpy(), reference_knn(train, test, 10), atol=1e-5)
    empty = ModelOutputs(test.logits[:0], test.features[:0])
    assert detector.score_outputs(empty).shape == (0,)


@pytest.mark.parametrize("options", [{}, {"memory_mb": 0.01, "chunk_rows": 7}])
def test_knn_faiss_matches_torch_search(data, options):
    pytest.importorskip("faiss")
    _, train, test = data
    detector = KNN(k=5, use_faiss=True, **options).fit(train)
    assert detector.index_ is not None and detector.index_.ntotal == ROWS
    expected = KNN(k=5, **options).fit(train).score_outputs(test)
    torch.testing.assert_close(detector.score_outputs(test), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: Mahalanobis(chunk_rows=0), lambda: ViM(chunk_rows=-1),
                                  lambda: KNN(chunk_rows=0), lambda: KNN(memory_mb=0.0)])
def test_bad_chunk_options_raise(data, make):
    model, train, _ = data
    with pytest.raises(ValueError, match="chunk_rows|memory_mb"):
        make().fit(train, model)


def test_memory_mapped_training_outputs(data, tmp_path):
    """Fit on np.load(mmap_mode="c") arrays, as the benchmark does; same scores as in memory."""
    model, train, test = data
    np.save(tmp_path / "features.npy", train.features.numpy())
    np.save(tmp_path / "logits.npy", train.logits.numpy())
    mapped = ModelOutputs(
        torch.from_numpy(np.load(tmp_path / "logits.npy", mmap_mode="c")),
        torch.from_numpy(np.load(tmp_path / "features.npy", mmap_mode="c")),
        train.labels,
    )
    for make in (lambda: Mahalanobis(chunk_rows=64), lambda: ViM(chunk_rows=64), lambda: KNN(memory_mb=0.01)):
        expected = make().fit(train, model).score_outputs(test)
        torch.testing.assert_close(make().fit(mapped, model).score_outputs(test), expected)


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) any torch op allocates, ignoring views of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("make", [lambda: Mahalanobis(chunk_rows=50), lambda: ViM(chunk_rows=50),
                                  lambda: KNN(k=20, memory_mb=0.01, chunk_rows=50)])
def test_no_full_size_copy_of_training_features(make):
    """No op in fit or score allocates more than a quarter of the float32 training matrix (N x D)."""
    rows, dim = 4000, 32
    head = nn.Linear(dim, CLASSES)
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(CLASSES, (rows,), generator=generator)
    features = (torch.randn(CLASSES, dim, generator=generator)[labels] + torch.randn(rows, dim, generator=generator))
    with torch.no_grad():
        train = ModelOutputs(head(features), features.relu(), labels)
        test = ModelOutputs(head(features[:40]), features[:40].relu())
    detector = make()
    with LargestAllocation() as spy:
        detector.fit(train, TinyClassifier(head)).score_outputs(test)
    assert 0 < spy.largest <= rows * dim * 4 // 4
