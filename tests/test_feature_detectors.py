"""Feature-space detectors (Mahalanobis, KNN, ViM, ReAct) against plain reference computations."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from torch import nn

from oodforge.detectors.base import DETECTORS, ModelOutputs, NotFittedError
from oodforge.detectors.knn import KNN
from oodforge.detectors.mahalanobis import Mahalanobis
from oodforge.detectors.react import ReAct, percentile
from oodforge.detectors.vim import ViM
from oodforge.models.heads import LinearHead

NAMES = ["mahalanobis", "knn", "vim", "react"]


class TinyClassifier(nn.Module):
    """Just a head, which is all the feature detectors use from the model."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


def random_outputs(n: int, dim: int, classes: int, seed: int, head: nn.Module) -> ModelOutputs:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    centres = 2.0 * torch.randn(classes, dim, generator=generator)
    features = (centres[labels] + torch.randn(n, dim, generator=generator)).relu()
    with torch.no_grad():
        logits = head(features)
    return ModelOutputs(logits, features, labels)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    head = LinearHead(12, 4)
    train = random_outputs(300, 12, 4, seed=1, head=head)
    test = random_outputs(40, 12, 4, seed=2, head=head)
    return TinyClassifier(head), train, test


def test_mahalanobis_matches_scipy(setup):
    model, train, test = setup
    x, y = train.features.double().numpy(), train.labels.numpy()
    means = {c: x[y == c].mean(axis=0) for c in np.unique(y)}
    centred = np.concatenate([x[y == c] - means[c] for c in means])
    precision = np.linalg.inv(np.cov(centred, rowvar=False, bias=True))
    expected = [
        -min(mahalanobis(point, mean, precision) ** 2 for mean in means.values())
        for point in test.features.double().numpy()
    ]
    scores = Mahalanobis().fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_mahalanobis_ridge_and_needs_labels(setup):
    model, train, test = setup
    ridge = 0.5
    x, y = train.features.double().numpy(), train.labels.numpy()
    centred = np.concatenate([x[y == c] - x[y == c].mean(axis=0) for c in np.unique(y)])
    precision = np.linalg.inv(np.cov(centred, rowvar=False, bias=True) + ridge * np.eye(x.shape[1]))
    means = [x[y == c].mean(axis=0) for c in np.unique(y)]
    points = test.features.double().numpy()
    expected = [-min(mahalanobis(p, m, precision) ** 2 for m in means) for p in points]
    scores = Mahalanobis(ridge=ridge).fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        Mahalanobis().fit(ModelOutputs(train.logits, train.features), model)


def test_mahalanobis_survives_singular_covariance(setup):
    model, train, test = setup
    features = train.features.clone()
    features[:, 0] = 0.0  # a dead unit: zero variance
    scores = Mahalanobis().fit(ModelOutputs(train.logits, features, train.labels)).score_outputs(test)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("k", [1, 5, 50, 300])  # 300: the whole training set (a larger k is refused)
def test_knn_matches_brute_force(setup, k):
    model, train, test = setup
    normalize = torch.nn.functional.normalize
    queries, keys = normalize(test.features.double(), dim=1), normalize(train.features.double(), dim=1)
    distances = torch.cdist(queries, keys)
    kth = distances.sort(dim=1).values[:, min(k, len(train)) - 1]
    scores = KNN(k=k, memory_mb=0.01).fit(train, model).score_outputs(test)  # tiny memory: many blocks
    torch.testing.assert_close(scores.double(), -kth, atol=1e-5, rtol=1e-5)


def test_knn_without_faiss_warns_and_falls_back(setup):
    if importlib.util.find_spec("faiss") is not None:
        pytest.skip("faiss is installed")
    model, train, test = setup
    with pytest.warns(UserWarning, match="faiss"):
        detector = KNN(k=5, use_faiss=True).fit(train, model)
    torch.testing.assert_close(detector.score_outputs(test), KNN(k=5).fit(train).score_outputs(test))


def reference_vim(model: TinyClassifier, train: ModelOutputs, test: ModelOutputs, dim: int) -> np.ndarray:
    """ViM re-derived with numpy: origin by least squares, subspace by SVD, residual by subtraction."""
    weight = model.head.weight.detach().double().numpy()
    bias = model.head.bias.detach().double().numpy()
    origin = -np.linalg.lstsq(weight, bias, rcond=None)[0]  # minimum-norm solution = -pinv(W) b
    _, _, vt = np.linalg.svd(train.features.double().numpy() - origin, full_matrices=False)
    principal = vt[:dim].T

    def residual(features: np.ndarray) -> np.ndarray:
        centred = features - origin
        return np.linalg.norm(centred - centred @ principal @ principal.T, axis=1)

    train_logits = train.logits.double().numpy()
    alpha = train_logits.max(axis=1).mean() / residual(train.features.double().numpy()).mean()
    logits = test.logits.double().numpy()
    top = logits.max(axis=1)
    energy = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return energy - alpha * residual(test.features.double().numpy())


@pytest.mark.parametrize("dim", [None, 3, 8])
def test_vim_matches_numpy(setup, dim):
    model, train, test = setup
    expected = reference_vim(model, train, test, 6 if dim is None else dim)
    scores = ViM(dim=dim).fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_vim_head_without_bias_and_without_weight(setup):
    _, train, test = setup
    head = nn.Linear(12, 4, bias=False)
    model = TinyClassifier(head)
    outputs = [ModelOutputs(head(o.features).detach(), o.features, o.labels) for o in (train, test)]
    detector = ViM(dim=5).fit(outputs[0], model)
    assert torch.count_nonzero(detector.origin_) == 0
    nobias = TinyClassifier(LinearHead(12, 4))
    nobias.head.weight.data.copy_(head.weight.data)
    nobias.head.bias.data.zero_()
    expected = reference_vim(nobias, outputs[0], outputs[1], 5)
    np.testing.assert_allclose(detector.score_outputs(outputs[1]).numpy(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="weight"):
        ViM().fit(train, TinyClassifier(nn.Sequential(nn.Linear(12, 4))))
    with pytest.raises(ValueError, match="dim"):
        ViM(dim=12).fit(train, model)


@pytest.mark.parametrize("p", [90.0, 50.0, 99.5])
def test_react_matches_manual_clip(setup, p):
    model, train, test = setup
    threshold = np.percentile(train.features.double().numpy(), p)
    clipped = np.minimum(test.features.double().numpy(), threshold)
    weight = model.head.weight.detach().double().numpy()
    logits = clipped @ weight.T + model.head.bias.detach().double().numpy()
    top = logits.max(axis=1)
    expected = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    scores = ReAct(percentile=p).fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_percentile_matches_numpy():
    values = torch.randn(7, 13)
    for q in (0.0, 12.5, 90.0, 100.0):
        assert percentile(values, q) == pytest.approx(np.percentile(values.double().numpy(), q))


def test_react_needs_model(setup):
    _, train, _ = setup
    with pytest.raises(ValueError, match="model"):
        ReAct().fit(train)


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_raises_and_shape(setup, name):
    model, train, test = setup
    detector = DETECTORS.create(name)
    with pytest.raises(NotFittedError):
        detector.score_outputs(test)
    scores = detector.fit(train, model).score_outputs(test)
    assert scores.shape == (len(test),)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


def separated_case() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs, ModelOutputs]:
    """ID: four classes, each active on its own block of 4 units; OOD: weak activation on all units."""
    generator = torch.Generator().manual_seed(3)
    dim, classes = 16, 4
    centres = torch.zeros(classes, dim)
    for c in range(classes):
        centres[c, 4 * c : 4 * c + 4] = 5.0
    head = LinearHead(dim, classes)
    with torch.no_grad():
        head.weight.copy_(centres / centres.norm(dim=1, keepdim=True))
        head.bias.zero_()

    def outputs(features: torch.Tensor, labels: torch.Tensor | None) -> ModelOutputs:
        with torch.no_grad():
            return ModelOutputs(head(features), features, labels)

    def in_distribution(n: int) -> ModelOutputs:
        labels = torch.randint(classes, (n,), generator=generator)
        return outputs((centres[labels] + 0.1 * torch.randn(n, dim, generator=generator)).relu(), labels)

    ood = outputs(1.5 * torch.rand(100, dim, generator=generator), None)
    return TinyClassifier(head), in_distribution(400), in_distribution(100), ood


@pytest.mark.parametrize("name", NAMES)
def test_separated_ood_scores_lower(name):
    model, train, id_test, ood = separated_case()
    detector = DETECTORS.create(name).fit(train, model)
    id_scores, ood_scores = detector.score_outputs(id_test), detector.score_outputs(ood)
    assert id_scores.min() > ood_scores.max()
