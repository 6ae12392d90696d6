"""RMDS, fDBD, NCI, NNGuide, Relation, SHE and Residual against few-line numpy references."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax
from torch import nn

from oodforge.detectors.base import DETECTORS, ModelOutputs, NotFittedError
from oodforge.detectors.fdbd import FDBD
from oodforge.detectors.nci import NCI
from oodforge.detectors.nnguide import NNGuide
from oodforge.detectors.relation import Relation
from oodforge.detectors.residual import Residual
from oodforge.detectors.rmds import RMDS
from oodforge.detectors.she import SHE

CLASSES, DIM = 5, 12
DETECTOR_CLASSES = {"rmds": RMDS, "fdbd": FDBD, "nci": NCI, "nnguide": NNGuide, "relation": Relation, "she": SHE,
                    "residual": Residual}
NAMES = list(DETECTOR_CLASSES)
REQUIREMENTS = {"logits", "features", "train", "head", "gradients"}
SMALL_BANKS = {"nnguide": {"bank_fraction": 1.0}, "relation": {"bank_size": None}}


class TinyClassifier(nn.Module):
    """Just a head, which is all these detectors use from the model."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


@pytest.fixture(scope="module")
def case() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs, ModelOutputs]:
    """Five classes of relu(centre + noise) in 12-d, a linear head roughly aligned with the centres, and
    OOD points drawn far from every centre."""
    generator = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(CLASSES, DIM, generator=generator)
    head = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        head.weight.copy_(F.normalize(centres, dim=1) + 0.3 * torch.randn(CLASSES, DIM, generator=generator))
        head.bias.copy_(0.2 * torch.randn(CLASSES, generator=generator))

    def outputs(features: torch.Tensor, labels: torch.Tensor | None) -> ModelOutputs:
        with torch.no_grad():
            return ModelOutputs(head(features), features, labels)

    def in_distribution(n: int) -> ModelOutputs:
        labels = torch.randint(CLASSES, (n,), generator=generator)
        return outputs((centres[labels] + torch.randn(n, DIM, generator=generator)).relu(), labels)

    ood = outputs(3.0 * torch.randn(60, DIM, generator=generator), None)
    return TinyClassifier(head), in_distribution(300), in_distribution(40), ood


def arrays(outputs: ModelOutputs) -> tuple[np.ndarray, np.ndarray]:
    return outputs.features.double().numpy(), outputs.logits.double().numpy()


def head_arrays(model: TinyClassifier) -> tuple[np.ndarray, np.ndarray]:
    return model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_rmds(model, train, test) -> np.ndarray:
    x, y = train.features.double().numpy(), train.labels.numpy()
    means = np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])
    within = np.linalg.inv(np.cov(np.concatenate([x[y == c] - means[c] for c in np.unique(y)]), rowvar=False,
                                  bias=True))
    total = np.linalg.inv(np.cov(x, rowvar=False, bias=True))
    q = arrays(test)[0]

    def squared(d: np.ndarray, precision: np.ndarray) -> np.ndarray:
        return np.einsum("nd,de,ne->n", d, precision, d)

    background = squared(q - x.mean(axis=0), total)
    return np.max([-(squared(q - m, within) - background) for m in means], axis=0)


def reference_fdbd(model, train, test, distance_as_normalizer=True) -> np.ndarray:
    w, b = head_arrays(model)
    mean = arrays(train)[0].mean(axis=0)
    scores = []
    for z in arrays(test)[0]:
        logits = w @ z + b
        p = logits.argmax()
        gaps = [abs(logits[p] - logits[c]) / np.linalg.norm(w[p] - w[c]) for c in range(len(b)) if c != p]
        scores.append(np.mean(gaps) / np.linalg.norm(z - mean if distance_as_normalizer else z))
    return np.array(scores)


def reference_nci(model, train, test, alpha=1e-4) -> np.ndarray:
    w, b = head_arrays(model)
    z = arrays(test)[0]
    centred = z - arrays(train)[0].mean(axis=0)
    predicted = (z @ w.T + b).argmax(axis=1)
    return (w[predicted] * centred).sum(axis=1) / np.linalg.norm(centred, axis=1) + alpha * np.abs(z).sum(axis=1)


def reference_nnguide(model, train, test, k=10, rows=None) -> np.ndarray:
    x, logits = arrays(train)
    rows = slice(None) if rows is None else rows
    bank = unit(x[rows]) * logsumexp(logits[rows], axis=1)[:, None]
    z, test_logits = arrays(test)
    similarities = unit(z) @ bank.T
    top = -np.sort(-similarities, axis=1)[:, :k]
    return logsumexp(test_logits, axis=1) * top.mean(axis=1)


def reference_relation(model, train, test, power=1.0, threshold=0.03, rows=None) -> np.ndarray:
    x, logits = arrays(train)
    rows = slice(None) if rows is None else rows
    z, test_logits = arrays(test)
    kernel = np.maximum(unit(z) @ unit(x[rows]).T, 0) * (softmax(test_logits, axis=1) @ softmax(logits[rows], axis=1).T)
    return np.where(kernel > threshold, kernel**power, 0.0).sum(axis=1)


def reference_she(model, train, test, metric="inner_product") -> np.ndarray:
    x, logits = arrays(train)
    y, predicted = train.labels.numpy(), logits.argmax(axis=1)
    patterns = np.stack([x[(y == c) & (predicted == c)].mean(axis=0) for c in range(CLASSES)])
    z, test_logits = arrays(test)
    s = patterns[test_logits.argmax(axis=1)]
    if metric == "euclidean":
        return -np.linalg.norm(z - s, axis=1)
    if metric == "cosine":
        return (unit(z) * unit(s)).sum(axis=1)
    return (z * s).sum(axis=1)


def reference_residual(model, train, test, dim=None) -> np.ndarray:
    """Origin by least squares, principal subspace by SVD, residual by subtraction."""
    w, b = head_arrays(model)
    origin = -np.linalg.lstsq(w, b, rcond=None)[0]  # minimum-norm solution = -pinv(W) b
    _, _, vt = np.linalg.svd(arrays(train)[0] - origin, full_matrices=False)
    principal = vt[: DIM // 2 if dim is None else dim].T
    centred = arrays(test)[0] - origin
    return -np.linalg.norm(centred - centred @ principal @ principal.T, axis=1)


CASES = [
    ("rmds", {}, reference_rmds),
    ("fdbd", {}, reference_fdbd),
    ("fdbd", {"distance_as_normalizer": False}, reference_fdbd),
    ("nci", {}, reference_nci),
    ("nci", {"alpha": 0.05}, reference_nci),
    ("nnguide", {"k": 10}, reference_nnguide),
    ("nnguide", {"k": 1}, reference_nnguide),
    ("relation", {"power": 1.0}, reference_relation),
    ("relation", {"power": 4.0, "threshold": 0.1}, reference_relation),
    ("she", {}, reference_she),
    ("she", {"metric": "euclidean"}, reference_she),
    ("she", {"metric": "cosine"}, reference_she),
    ("residual", {}, reference_residual),
    ("residual", {"dim": 3}, reference_residual),
]


def build(name: str, **kwargs):
    """A detector with a whole-training-set bank (so that references need not know the subset), checked."""
    detector = DETECTOR_CLASSES[name](**{**SMALL_BANKS.get(name, {}), **kwargs})
    detector._check()
    return detector


@pytest.mark.parametrize(("name", "kwargs", "reference"), CASES)
def test_matches_numpy_reference(case, name, kwargs, reference):
    model, train, test, _ = case
    scores = build(name, **kwargs).fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), reference(model, train, test, **kwargs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_fit_and_score_equal_one_chunk(case, name):
    model, train, test, _ = case
    chunked = build(name, chunk_rows=7).fit(train, model).score_outputs(test)
    whole = build(name, chunk_rows=10**6).fit(train, model).score_outputs(test)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_unfitted_and_state(case, name):
    model, train, test, _ = case
    detector = DETECTOR_CLASSES[name]()
    detector._check()
    with pytest.raises(NotFittedError):
        detector.score_outputs(test)
    scores = detector.fit(train, model).score_outputs(test)
    assert scores.shape == (len(test),)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert DETECTORS.get(name) is DETECTOR_CLASSES[name]
    state = {k: v for k, v in vars(detector).items() if k.endswith("_") and k not in ("model_", "fitted_")}
    assert state, "no learned state"
    for key, value in state.items():  # what the generic save can write
        assert isinstance(value, torch.Tensor | bool | int | float | str | list | dict), key


@pytest.mark.parametrize("name", NAMES)
def test_contract_attributes(name):
    cls = DETECTOR_CLASSES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert cls.needs_fit
    assert "train" in cls.requires and set(cls.requires) <= REQUIREMENTS
    assert set(cls.search_space) <= set(params)
    for key, values in cls.search_space.items():
        assert values, key
        for value in values:
            cls(**{key: value})._check()
    defaults = cls()
    assert all(getattr(defaults, p) == inspect.signature(cls.__init__).parameters[p].default for p in params)


@pytest.mark.parametrize(
    ("name", "kwargs", "parameter"),
    [
        ("rmds", {"chunk_rows": 0}, "chunk_rows"),
        ("fdbd", {"distance_as_normalizer": "yes"}, "distance_as_normalizer"),
        ("fdbd", {"chunk_rows": -1}, "chunk_rows"),
        ("nci", {"alpha": -0.1}, "alpha"),
        ("nnguide", {"k": 0}, "k"),
        ("nnguide", {"bank_fraction": 0.0}, "bank_fraction"),
        ("nnguide", {"bank_fraction": 1.5}, "bank_fraction"),
        ("relation", {"power": 0.0}, "power"),
        ("relation", {"threshold": -0.01}, "threshold"),
        ("relation", {"bank_size": 0}, "bank_size"),
        ("she", {"metric": "manhattan"}, "metric"),
        ("residual", {"dim": 0}, "dim"),
        ("residual", {"chunk_rows": 0}, "chunk_rows"),
    ],
)
def test_check_rejects_bad_values(name, kwargs, parameter):
    with pytest.raises(ValueError, match=f"^{name}: {parameter}"):
        DETECTOR_CLASSES[name](**kwargs)._check()


@pytest.mark.parametrize("name", NAMES)
def test_ood_scores_lower_on_average(case, name):
    model, train, test, ood = case
    detector = build(name).fit(train, model)
    assert detector.score_outputs(test).mean() > detector.score_outputs(ood).mean()


def test_nnguide_bank_is_a_seeded_subset(case):
    model, train, test, _ = case
    detector = NNGuide(k=3, bank_fraction=0.2, seed=1).fit(train, model)
    rows = detector.bank_indices_
    assert len(rows) == 60 and len(detector.bank_) == 60
    assert torch.equal(rows, rows.unique())  # sorted, no repeats
    assert torch.equal(rows, NNGuide(k=3, bank_fraction=0.2, seed=1).fit(train, model).bank_indices_)
    assert not torch.equal(rows, NNGuide(k=3, bank_fraction=0.2, seed=2).fit(train, model).bank_indices_)
    expected = reference_nnguide(model, train, test, k=3, rows=rows.numpy())
    np.testing.assert_allclose(detector.score_outputs(test).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="using k=3"):
        default = NNGuide().fit(train, model)  # 1% of 300 rows: a bank of 3, the default k=10 clamped to it
    assert len(default.bank_) == 3 and default.k_ == 3 and default.params_used_ == {"k": 3}
    with pytest.raises(ValueError, match="nnguide:k=100 is more than the 3 rows"):
        NNGuide(k=100).fit(train, model)  # an explicit k larger than the bank is refused


def test_relation_bank_is_a_seeded_subset(case):
    model, train, test, _ = case
    detector = Relation(bank_size=100, seed=3).fit(train, model)
    rows = detector.bank_indices_
    assert len(rows) == 100 and torch.equal(rows, rows.unique())
    expected = reference_relation(model, train, test, rows=rows.numpy())
    np.testing.assert_allclose(detector.score_outputs(test).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(Relation().fit(train, model).bank_indices_) == len(train)  # default 20,000 > 300 rows: all


def test_relation_tiles_sum_to_the_untiled_score(case, monkeypatch):
    """Tiles smaller than both sets (and not dividing them) give the reference score."""
    import oodforge.detectors.relation as relation

    model, train, test, _ = case
    monkeypatch.setattr(relation, "QUERY_TILE", 7)
    monkeypatch.setattr(relation, "BANK_TILE", 33)
    detector = Relation(bank_size=None, power=2.0).fit(train, model)
    expected = reference_relation(model, train, test, power=2.0)
    np.testing.assert_allclose(detector.score_outputs(test).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_she_class_without_correct_samples_uses_class_mean(case):
    model, train, _, _ = case
    logits = train.logits.clone()
    logits[:, CLASSES - 1] = -100.0  # nothing is predicted as the last class
    with pytest.warns(UserWarning, match="no correctly classified"):
        detector = SHE().fit(ModelOutputs(logits, train.features, train.labels), model)
    expected = train.features[train.labels == CLASSES - 1].double().mean(dim=0)
    torch.testing.assert_close(detector.patterns_[CLASSES - 1], expected)


@pytest.mark.parametrize("name", ["rmds", "she"])
def test_needs_labels(case, name):
    model, train, _, _ = case
    with pytest.raises(ValueError, match="labels"):
        DETECTOR_CLASSES[name]().fit(ModelOutputs(train.logits, train.features), model)


@pytest.mark.parametrize("name", ["fdbd", "nci", "residual"])
def test_head_detectors_need_a_linear_head(case, name):
    _, train, _, _ = case
    with pytest.raises(ValueError, match=rf"{name} needs the classifier"):
        DETECTOR_CLASSES[name]().fit(train)
    with pytest.raises(ValueError, match="weight"):
        DETECTOR_CLASSES[name]().fit(train, TinyClassifier(nn.Sequential(nn.Linear(DIM, CLASSES))))


def test_residual_dim_must_leave_a_residual(case):
    model, train, _, _ = case
    with pytest.raises(ValueError, match="dim"):
        Residual(dim=DIM).fit(train, model)
