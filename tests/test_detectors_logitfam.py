"""OpenMax, GMM, LTS, pNML, weighted energy and NECO against pytorch-ood or NumPy/scikit-learn references."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from pytorch_ood import detector as pood
from scipy.special import expit, logsumexp
from scipy.stats import ks_2samp, multivariate_normal, weibull_min
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler
from torch import nn

from oodforge.detectors.base import DETECTORS, ModelOutputs, NotFittedError
from oodforge.detectors.gmm import GMM
from oodforge.detectors.lts import LTS
from oodforge.detectors.neco import NECO
from oodforge.detectors.openmax import OpenMax, fit_weibull
from oodforge.detectors.pnml import PNML
from oodforge.detectors.weighted_ebo import WeightedEBO, virtual_outliers

CLASSES, DIM = 5, 12
DETECTOR_CLASSES = {"openmax": OpenMax, "gmm": GMM, "lts": LTS, "pnml": PNML, "weighted_ebo": WeightedEBO,
                    "neco": NECO}


class TinyClassifier(nn.Module):
    """Just a linear head, which is all these detectors read from a model."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(DIM, CLASSES)
        with torch.no_grad():  # aligned with the class centres of clustered_outputs, so most rows are right
            self.head.weight.mul_(0.3).add_(torch.eye(CLASSES, DIM)).mul_(scale)


def clustered_outputs(n: int, seed: int, head: nn.Module, spread: float = 1.0) -> ModelOutputs:
    """Non-negative class-clustered features (distinct centres), logits from ``head``, labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    centres = 3.0 * torch.eye(CLASSES, DIM) + 0.5
    features = (centres[labels] + spread * torch.randn(n, DIM, generator=generator)).relu()
    with torch.no_grad():
        logits = head(features)
    return ModelOutputs(logits, features, labels)


@pytest.fixture
def setup() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs]:
    model = TinyClassifier()
    return model, clustered_outputs(400, 1, model.head), clustered_outputs(60, 2, model.head, spread=1.5)


def far_outputs(head: nn.Module, n: int = 60) -> ModelOutputs:
    """Features far from every training cluster."""
    features = 8.0 + torch.rand(n, DIM, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return ModelOutputs(head(features), features)


# --- the registry and the parameter contract --------------------------------------------------------------


@pytest.mark.parametrize("name", list(DETECTOR_CLASSES))
def test_registered_with_grid_of_own_parameters(name: str) -> None:
    cls = DETECTOR_CLASSES[name]
    assert DETECTORS.get(name) is cls
    assert set(cls.search_space) <= set(cls.param_names())
    assert 3 <= sum(len(v) for v in cls.search_space.values()) or not cls.search_space
    for key, values in cls.search_space.items():
        assert getattr(cls(), key) in values or getattr(cls(), key) is None, (name, key)
        for value in values:
            cls(**{key: value})


@pytest.mark.parametrize("cls, options, parameter", [
    (OpenMax, dict(tailsize=0), "tailsize"), (OpenMax, dict(alpha=0), "alpha"),
    (GMM, dict(n_components=0), "n_components"), (GMM, dict(reg=-1.0), "reg"),
    (LTS, dict(percentile=100.0), "percentile"), (LTS, dict(percentile=-1.0), "percentile"),
    (PNML, dict(chunk_rows=0), "chunk_rows"),
    (WeightedEBO, dict(samples=0), "samples"), (WeightedEBO, dict(outliers=0), "outliers"),
    (WeightedEBO, dict(steps=0), "steps"),
    (NECO, dict(dim=0), "dim"),
])
def test_a_bad_parameter_fails_when_the_detector_is_built(cls: type, options: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        cls(**options)


@pytest.mark.parametrize("name", [n for n, c in DETECTOR_CLASSES.items() if c.needs_fit])
def test_fitted_detectors_refuse_to_score_unfitted(name: str, setup) -> None:
    with pytest.raises(NotFittedError):
        DETECTOR_CLASSES[name]().score_outputs(setup[2])


@pytest.mark.parametrize("name", ["openmax", "gmm", "weighted_ebo"])
def test_label_readers_need_labels(name: str, setup) -> None:
    model, train, _ = setup
    with pytest.raises(ValueError, match="labels"):
        DETECTOR_CLASSES[name]().fit(ModelOutputs(train.logits, train.features), model)


# --- OpenMax ------------------------------------------------------------------------------------------------


def test_weibull_fit_is_the_maximum_likelihood() -> None:
    sample = np.random.default_rng(0).weibull(2.5, 20) * 3.0
    shape, scale = fit_weibull(sample)
    reference = weibull_min.fit(sample, floc=0)
    np.testing.assert_allclose([shape, scale], [reference[0], reference[2]], rtol=1e-4)
    assert weibull_min.logpdf(sample, shape, 0, scale).sum() >= weibull_min.logpdf(sample, *reference).sum()
    assert fit_weibull(np.full(5, 3.0)) == (np.inf, 3.0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # inside pytorch-ood's scipy fit
@pytest.mark.parametrize("tailsize, alpha", [(20, 10), (10, 2), (50, 1)])
def test_openmax_matches_pytorch_ood_on_correctly_classified_rows(setup, tailsize: int, alpha: int) -> None:
    model, train, test = setup
    far = far_outputs(model.head)
    both = ModelOutputs(torch.cat([test.logits, far.logits]), torch.cat([test.features, far.features]))
    correct = train.logits.argmax(dim=1) == train.labels
    reference = pood.OpenMax(None, tailsize=tailsize, alpha=alpha, euclid_weight=1.0)
    reference.fit_logits(train.logits[correct].double(), train.labels[correct])
    unknown = reference.predict_logits(both.logits.double()).numpy()
    scores = OpenMax(tailsize=tailsize, alpha=alpha).fit(train, model).score_outputs(both)
    assert scores.shape == (120,) and scores.dtype == torch.float32
    # score = log P(known) / P(unknown); pytorch-ood's Weibull fit is scipy's Nelder-Mead, ours the exact MLE
    np.testing.assert_allclose(expit(-scores.double().numpy()), unknown, atol=1e-5)
    labels = np.r_[np.ones(60), np.zeros(60)]
    assert roc_auc_score(labels, scores.numpy()) == pytest.approx(roc_auc_score(labels, -unknown), abs=1e-4)


def test_openmax_fits_on_correct_rows_where_pytorch_ood_takes_all(setup) -> None:
    model, train, test = setup
    flipped = train.labels.clone()
    flipped[:40] = (flipped[:40] + 1) % CLASSES  # 40 rows the model now gets wrong
    noisy = ModelOutputs(train.logits, train.features, flipped)
    ours = OpenMax().fit(noisy, model)
    correct = train.logits.argmax(dim=1) == flipped
    kept = flipped[correct]
    means = np.stack([train.logits[correct][kept == c].double().mean(dim=0).numpy() for c in range(CLASSES)])
    np.testing.assert_allclose(ours.means_.numpy(), means, rtol=1e-12)
    everything = pood.OpenMax(None, tailsize=20, alpha=10).fit_logits(train.logits.double(), flipped)
    assert not np.allclose(everything._openmax.centers[0], means[0], atol=1e-3)


def test_openmax_hand_computed_and_known_rows_score_higher(setup) -> None:
    model, train, test = setup
    detector = OpenMax(tailsize=20, alpha=2).fit(train, model)
    logits = detector.means_[:1].float() * torch.tensor([[1.0], [6.0]])  # the MAV of class 0, and far out on it
    f = logits.double().numpy()
    distances = np.linalg.norm(f[:, None, :] - detector.means_.numpy()[None], axis=2)
    shape, scale, shift = (t.numpy() for t in (detector.shape_, detector.scale_, detector.shift_))
    w = 1 - np.exp(-(((distances + shift) / scale) ** shape))
    ranks = np.argsort(np.argsort(-f, axis=1), axis=1)
    omega = np.clip((2 - ranks) / 2, 0, None)
    revised = f * (1 - omega * w)
    expected = logsumexp(revised, axis=1) - (f - revised).sum(axis=1)
    scores = detector.score_outputs(ModelOutputs(logits, torch.zeros(2, DIM)))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    assert scores[0] > scores[1]


# --- GMM ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [1e-6, 1e-2])
def test_gmm_matches_pytorch_ood(setup, reg: float) -> None:
    model, train, test = setup
    reference = pood.GMM(None, reg=reg).fit_features(train.features, train.labels)
    expected = -reference.predict_features(test.features).numpy()
    scores = GMM(reg=reg).fit(train, model).score_outputs(test)
    assert scores.shape == (60,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_gmm_with_two_components_per_class_matches_sklearn_and_scipy(setup) -> None:
    model, train, test = setup
    x, y, points = train.features.double().numpy(), train.labels.numpy(), test.features.double().numpy()
    terms = []
    for c in range(CLASSES):
        mixture = GaussianMixture(2, covariance_type="full", reg_covar=1e-4, random_state=0).fit(x[y == c])
        for j in range(2):
            log_density = multivariate_normal(mixture.means_[j], mixture.covariances_[j]).logpdf(points)
            terms.append(np.log(np.mean(y == c) * mixture.weights_[j]) + log_density)
    expected = logsumexp(np.stack(terms, axis=1), axis=1)
    scores = GMM(n_components=2, reg=1e-4).fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_gmm_far_rows_score_lower_and_components_are_bounded(setup) -> None:
    model, train, test = setup
    detector = GMM().fit(train, model)
    assert detector.score_outputs(far_outputs(model.head)).max() < detector.score_outputs(test).min()
    with pytest.raises(ValueError, match="n_components"):
        GMM(n_components=81).fit(train, model)  # 80 rows per class


# --- LTS ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("percentile", [95.0, 90.0, 65.0, 0.0])
def test_lts_matches_pytorch_ood(setup, percentile: float) -> None:
    model, _, test = setup
    reference = pood.LTS(None, head=model.head, p=round(1 - percentile / 100, 2))
    with torch.no_grad():
        expected = -reference.predict_features(test.features).numpy()
    scores = LTS(percentile=percentile).score_outputs(test)
    assert scores.shape == (60,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)


def test_lts_hand_computed() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
    features = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, -5.0, 0.0]])  # S = (4 / 2)^2; (3 / 3)^2 after relu
    expected = [logsumexp(4 * np.array([1.0, 0.0, -1.0])), logsumexp([2.0, 1.0, 0.0])]
    scores = LTS(percentile=50.0).score_outputs(ModelOutputs(logits, features))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)
    zero = LTS().score_outputs(ModelOutputs(logits, torch.zeros(2, 4)))  # no activation: S = 1, plain energy
    np.testing.assert_allclose(zero.numpy(), logsumexp(logits.numpy(), axis=1), rtol=1e-6)


# --- pNML -----------------------------------------------------------------------------------------------------


def test_pnml_matches_pytorch_ood(setup) -> None:
    model, train, test = setup
    reference = pood.PNML(None, head=model.head)  # float32 throughout
    expected = -reference.fit_features(train.features, train.labels).predict_features(test.features).numpy()
    scores = PNML().fit(train, model).score_outputs(test)
    assert scores.shape == (60,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert (scores <= 0).all() and (scores >= -1).all()


def test_pnml_stays_exact_where_probabilities_underflow() -> None:
    model = TinyClassifier(scale=3000.0)  # logit gaps beyond 745: float64 softmax gives exact 0s
    train, test = clustered_outputs(200, 1, model.head), clustered_outputs(20, 2, model.head)
    scores = PNML().fit(train, model).score_outputs(test).double().numpy()
    x = test.features.double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    bank = train.features.double().numpy()
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    projection = np.einsum("nd,de,ne->n", x, np.linalg.pinv(bank.T @ bank), x)
    genie = projection / (1 + projection)
    logits = x @ model.head.weight.detach().double().numpy().T + model.head.bias.detach().double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # the formula as written: 0 / 0 where p underflows
        p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        naive = p / (p + p ** genie[:, None] * (1 - p))
    assert np.isnan(naive).any()
    mpmath.mp.dps = 60
    expected = []
    for row, g in zip(logits, genie, strict=True):
        probs = [mpmath.exp(mpmath.mpf(v) - max(row)) for v in row]
        probs = [q / sum(probs) for q in probs]
        total = sum(q / (q + q ** mpmath.mpf(g) * (1 - q)) for q in probs)
        expected.append(-float(mpmath.log(total) / mpmath.log(CLASSES)))
    np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_pnml_low_variance_directions_score_lower() -> None:
    model = TinyClassifier()
    generator = torch.Generator().manual_seed(0)
    spread = torch.ones(DIM)
    spread[-3:] = 0.01  # the training set barely varies along the last three axes
    features = 1.0 + torch.randn(300, DIM, generator=generator) * spread
    train = ModelOutputs(model.head(features).detach(), features, torch.arange(300) % CLASSES)
    inside, outside = torch.ones(1, DIM), torch.ones(1, DIM)
    outside[0, -3:] = 3.0
    probe = torch.cat([inside, outside])
    scores = PNML().fit(train, model).score_outputs(ModelOutputs(model.head(probe).detach(), probe))
    assert scores[0] > scores[1]


# --- weighted energy ------------------------------------------------------------------------------------------


def test_weighted_ebo_matches_pytorch_ood_with_the_fitted_weights(setup) -> None:
    model, train, test = setup
    detector = WeightedEBO(samples=1000, outliers=50).fit(train, model)
    assert detector.weights_.shape == (CLASSES,) and (detector.weights_ >= 0).all()
    assert not torch.allclose(detector.weights_, torch.ones(CLASSES, dtype=torch.float64))  # moved off plain energy
    expected = -pood.WeightedEBO.score(test.logits.double(), detector.weights_).numpy()
    scores = detector.score_outputs(test)
    assert scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    again = WeightedEBO(samples=1000, outliers=50).fit(train, model)
    torch.testing.assert_close(again.weights_, detector.weights_)


def test_virtual_outliers_are_the_least_likely_of_their_draws(setup) -> None:
    _, train, _ = setup
    samples, per_class = 500, 300
    features, labels = train.features.double(), train.labels
    outliers = virtual_outliers(features, labels, per_class, samples, torch.Generator().manual_seed(1))
    x, y = features.numpy(), labels.numpy()
    means = np.stack([x[y == c].mean(axis=0) for c in range(CLASSES)])
    centred = x - means[y]
    covariance = centred.T @ centred / len(x) + 1e-4 * np.eye(DIM)
    offsets = outliers.numpy() - np.repeat(means, per_class, axis=0)
    radii = np.sqrt(np.einsum("nd,de,ne->n", offsets, np.linalg.inv(covariance), offsets))
    rng = np.random.default_rng(0)  # brute force: the largest norm of `samples` standard normal draws
    brute = np.array([np.linalg.norm(rng.standard_normal((samples, DIM)), axis=1).max() for _ in range(1500)])
    assert ks_2samp(radii, brute).pvalue > 0.01
    assert abs(radii.mean() - brute.mean()) < 0.05 * brute.mean()


def test_weighted_ebo_separates_virtual_outliers_better_than_plain_energy(setup) -> None:
    model, train, _ = setup
    detector = WeightedEBO(samples=1000, outliers=100).fit(train, model)
    generator = torch.Generator().manual_seed(0)  # the seed the fit used: the same virtual outliers
    outliers = virtual_outliers(train.features.double(), train.labels, 100, 1000, generator).float()
    virtual = ModelOutputs(model.head(outliers).detach(), outliers)
    labels = np.r_[np.ones(len(train)), np.zeros(len(virtual))]
    weighted = roc_auc_score(labels, np.r_[detector.score_outputs(train), detector.score_outputs(virtual)])
    energy = DETECTORS.get("energy")()
    plain = roc_auc_score(labels, np.r_[energy.score_outputs(train), energy.score_outputs(virtual)])
    assert weighted > plain


# --- NECO -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim, maxlogit", [(3, True), (6, True), (4, False), (None, True)])
def test_neco_matches_the_sklearn_pipeline(setup, dim: int | None, maxlogit: bool) -> None:
    model, train, test = setup
    scaler = StandardScaler().fit(train.features.double().numpy())
    pca = PCA(DIM).fit(scaler.transform(train.features.double().numpy()))
    z = scaler.transform(test.features.double().numpy())
    kept = DIM // 2 if dim is None else dim
    expected = np.linalg.norm(pca.transform(z)[:, :kept], axis=1) / np.linalg.norm(z, axis=1)
    if maxlogit:
        expected *= test.logits.double().numpy().max(axis=1)
    scores = NECO(dim=dim, maxlogit=maxlogit).fit(train, model).score_outputs(test)
    assert scores.shape == (60,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_neco_principal_rows_score_higher_and_dim_must_leave_a_residual(setup) -> None:
    model, train, _ = setup
    detector = NECO(dim=CLASSES, maxlogit=False).fit(train, model)
    principal = detector.mean_ + detector.std_ * detector.basis_[:, -1] * 3.0  # along the top component
    residual = torch.linalg.svd(detector.basis_.T).Vh[-1]  # orthogonal to the kept components
    probe = torch.stack([principal, detector.mean_ + detector.std_ * residual * 3.0]).float()
    scores = detector.score_outputs(ModelOutputs(torch.zeros(2, CLASSES), probe))
    np.testing.assert_allclose(scores.numpy(), [1.0, 0.0], atol=1e-4)
    with pytest.raises(ValueError, match="dim"):
        NECO(dim=DIM).fit(train, model)
