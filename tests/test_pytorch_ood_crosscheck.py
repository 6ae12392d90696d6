"""Every oodforge detector that pytorch-ood 0.4.0 also implements, scored side by side on the same rows.

One small trained network (12 inputs, 16 Softplus features, 5 classes, wrapped with ``oodforge.wrap_model``) gives
the ID training, ID validation/test and OOD rows. pytorch-ood scores are "higher = more OOD", oodforge's "higher =
more ID", so each pair is checked as ``oodforge == -scale * pytorch_ood`` (``allclose``) and with equal AUROC (ID
positive, ``sklearn.metrics.roc_auc_score``, to 1e-4). Where pytorch-ood departs from the paper, oodforge follows
the paper, and the test states the difference explicitly:

detector     pytorch-ood 0.4.0                           oodforge (the paper)                  checked as
-----------  ------------------------------------------  ------------------------------------  ----------------------
mahalanobis  covariance = sum of outer products (not     covariance / N, full squared          scores equal x 2N
             / N) + 1e-6 I; score = HALF the squared     distance (Lee et al. 2018)
             distance
rmds         both covariances are sums (not / N)         covariances / N (Ren et al. 2021)     scores equal x N
             + 1e-6 I
gen          MEAN over the top M terms; default M = all  SUM over the top M (Liu et al.        scores equal x M
             classes                                     2023); M = 100 (all C when C < 100)
temperature  50 L-BFGS steps at lr 0.01 from T = 1:      T = argmin of the NLL (Guo et al.     T vs SciPy's minimizer;
             stops short of the NLL minimum              2017)                                 equal at pytorch-ood's T
entropy      p clipped to >= 1e-7 before the log         exact -H(p)                           NumPy reference
gradnorm     gradients of ALL parameters by default      final-layer weight only (Huang et     equal with param_filter
                                                         al. 2021)                             = the head's weight
ash          default percentile 0.65                     90 (the authors' ASH-S@90 configs)    equal at one percentile
scale        default percentile 0.65                     85 (the authors' config)              equal at one percentile
nci          default alpha = 0                           alpha = 1e-4 (OpenOOD's config)       equal at one alpha
nnguide      the bank is every row it is fitted on       a seeded bank_fraction of the         pytorch-ood fitted on
                                                         training rows (1%, as the paper)      oodforge's bank rows

Percentiles are fractions in pytorch-ood (0.9) and percents in oodforge (90). Not in pytorch-ood: cosine, flow,
relation, representation, residual, semantic_energy, ssd, grood, grood_generic, caref, cadref, weiper, neco (vra,
openmax, gmm, lts, pnml, weighted_ebo and the multi-layer detectors are cross-checked in the test modules of their
families).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_ood.detector as P
import scipy.optimize
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

import oodforge
from oodforge.detectors import DETECTORS, ModelOutputs, create_detector

# oodforge name -> pytorch-ood 0.4.0 class name
PAIRS = {"msp": "MaxSoftmax", "maxlogit": "MaxLogit", "energy": "EnergyBased", "entropy": "Entropy", "odin": "ODIN",
         "temperature": "TemperatureScaling", "gen": "GEN", "klm": "KLMatching", "mahalanobis": "Mahalanobis",
         "rmds": "RMD", "knn": "KNN", "vim": "ViM", "react": "ReAct", "ash": "ASH", "scale": "SCALE", "dice": "DICE",
         "she": "SHE", "gradnorm": "GradNorm", "nci": "NCI", "fdbd": "fDBD", "nnguide": "NNGuide"}
NOT_IN_PYTORCH_OOD = {"cosine", "flow", "relation", "representation", "residual", "semantic_energy", "ssd",
                      "grood", "grood_generic", "caref", "cadref", "weiper", "neco", "ensemble", "mds_ensemble",
                      "iodin", "adascale_a", "adascale_l"}
# shared with pytorch-ood, cross-checked in the test module of their family
CHECKED_ELSEWHERE = {"multi_mahalanobis": "test_layer_detectors", "gram": "test_layer_detectors",
                     "rankfeat": "test_layer_detectors", "vra": "test_detectors_featfam",
                     "nac": "test_detectors_layerfam2", "mahalanobis_odin": "test_detectors_inputfam",
                     "mc_dropout": "test_detectors_inputfam",
                     **dict.fromkeys(["openmax", "gmm", "lts", "pnml", "weighted_ebo"], "test_detectors_logitfam")}
CLASSES, INPUTS, WIDTH, N_TRAIN = 5, 12, 16, 300


class Setting:
    """A small trained classifier, its inputs and outputs: ID train (labelled), ID test (labelled), OOD."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(INPUTS, WIDTH), nn.Softplus(), nn.Linear(WIDTH, CLASSES))
        self.model = oodforge.wrap_model(net)
        generator = torch.Generator().manual_seed(1)
        centres = 1.2 * torch.randn(CLASSES, INPUTS, generator=generator)

        def blobs(n: int) -> tuple[Tensor, Tensor]:
            labels = torch.arange(n) % CLASSES
            return centres[labels] + torch.randn(n, INPUTS, generator=generator), labels

        self.x_train, self.y_train = blobs(N_TRAIN)
        self.x_id, self.y_id = blobs(200)
        self.x_ood = 1.5 * torch.randn(200, INPUTS, generator=generator)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.005)
        for _ in range(40):
            optimizer.zero_grad()
            nn.functional.cross_entropy(self.model(self.x_train), self.y_train).backward()
            optimizer.step()
        self.model.eval()
        self.train = self.outputs(self.x_train, self.y_train)
        self.id = self.outputs(self.x_id, self.y_id)
        self.ood = self.outputs(self.x_ood)

    def outputs(self, x: Tensor, y: Tensor | None = None) -> ModelOutputs:
        with torch.no_grad():
            features, logits = self.model.features_and_logits(x)
        return ModelOutputs(logits, features, y)

    @property
    def head(self) -> nn.Linear:
        return self.model.head


@pytest.fixture(scope="module")
def s() -> Setting:
    return Setting()


def auroc(id_scores: Tensor, ood_scores: Tensor) -> float:
    """AUROC with ID as the positive class and higher = more ID."""
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return roc_auc_score(labels, np.r_[id_scores.detach().double().numpy(), ood_scores.detach().double().numpy()])


def assert_same(ours: tuple[Tensor, Tensor], theirs: tuple[Tensor, Tensor], scale: float = 1.0,
                rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """oodforge's (ID, OOD) scores equal -scale * pytorch-ood's, and both give the same AUROC."""
    for mine, other in zip(ours, theirs, strict=True):
        mine, other = mine.detach().double(), other.detach().double()
        assert mine.shape == other.shape
        torch.testing.assert_close(mine, -scale * other, rtol=rtol, atol=atol)
    assert auroc(*ours) == pytest.approx(auroc(-theirs[0], -theirs[1]), abs=1e-4)


def ours_scores(detector, s: Setting, fit: bool = True) -> tuple[Tensor, Tensor]:
    if fit:
        detector.fit(s.train, s.model)
    return detector.score_outputs(s.id), detector.score_outputs(s.ood)


def test_every_shared_detector_is_paired() -> None:
    assert set(PAIRS) | NOT_IN_PYTORCH_OOD | set(CHECKED_ELSEWHERE) == set(DETECTORS.names())
    assert not set(PAIRS) & NOT_IN_PYTORCH_OOD and not set(CHECKED_ELSEWHERE) & (set(PAIRS) | NOT_IN_PYTORCH_OOD)
    assert all(hasattr(P, name) for name in PAIRS.values())


def test_setting_is_a_fair_test(s) -> None:
    """Trained but not saturated: ID and OOD rows are told apart (MSP), every class is predicted correctly somewhere
    (SHE), no softmax probability underflows pytorch-ood's 1e-7 clipping (entropy, GEN) and the features have full
    rank (Mahalanobis)."""
    accuracy = (s.id.logits.argmax(dim=1) == s.y_id).float().mean().item()
    assert 0.7 < accuracy < 1.0
    assert auroc(s.id.logits.softmax(dim=1).max(dim=1).values, s.ood.logits.softmax(dim=1).max(dim=1).values) > 0.7
    predicted = s.train.logits.argmax(dim=1)
    assert set(predicted[predicted == s.y_train].tolist()) == set(range(CLASSES))
    for outputs in (s.train, s.id, s.ood):
        assert outputs.logits.softmax(dim=1).min() > 1e-6
    assert torch.linalg.matrix_rank(s.train.features.double() - s.train.features.double().mean(0)) == WIDTH


# --- logits only ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "params", "theirs"), [
    ("msp", {}, lambda: P.MaxSoftmax(None)),
    ("maxlogit", {}, lambda: P.MaxLogit(None)),
    ("energy", {}, lambda: P.EnergyBased(None)),
    ("energy", {"temperature": 2.0}, lambda: P.EnergyBased(None, t=2.0)),
    ("entropy", {}, lambda: P.Entropy(None)),
])
def test_logit_detectors_match(s, name, params, theirs) -> None:
    detector = theirs()
    assert_same(ours_scores(create_detector(name, **params), s, fit=False),
                (detector.predict_logits(s.id.logits), detector.predict_logits(s.ood.logits)))


def test_entropy_is_exact_where_pytorch_ood_clips(s) -> None:
    """Departure: pytorch-ood clips p to >= 1e-7 before the log, so a saturated posterior gets H of about
    (C - 1) * 1.6e-6 instead of ~0; oodforge computes -H(p) exactly (NumPy reference)."""
    logits = torch.tensor([[40.0, 0.0, 0.0, 0.0, 0.0], [30.0, 29.0, 0.0, -5.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    z = logits.double().numpy()
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    reference = (np.exp(log_p) * log_p).sum(1)  # -H(p)
    ours = create_detector("entropy").score_outputs(ModelOutputs(logits, torch.zeros(3, 2))).double().numpy()
    theirs = -P.Entropy(None).predict_logits(logits).double().numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-12)
    assert abs(theirs[0] - reference[0]) > 1e-6  # the clipping's offset on the saturated row
    np.testing.assert_allclose(theirs[2], reference[2], rtol=1e-5)  # and none on an unsaturated one


@pytest.mark.parametrize("m", [None, 3])
def test_gen_is_the_sum_where_pytorch_ood_takes_the_mean(s, m) -> None:
    """Departure: pytorch-ood averages the M terms (score / M); the paper and oodforge sum them. oodforge's default
    M = 100 becomes all C classes here, pytorch-ood's default M = None is all classes."""
    ours = create_detector("gen") if m is None else create_detector("gen", m=m)
    theirs = P.GEN(None, gamma=0.1, M=m)
    assert_same(ours_scores(ours, s, fit=False),
                (theirs.predict_logits(s.id.logits), theirs.predict_logits(s.ood.logits)),
                scale=CLASSES if m is None else m)


def test_klm_matches_the_nearest_template(s) -> None:
    theirs = P.KLMatching(None).fit_logits(s.train.logits)
    assert_same(ours_scores(create_detector("klm"), s),
                (theirs.predict_logits(s.id.logits), theirs.predict_logits(s.ood.logits)), atol=1e-5)


def test_temperature_reaches_the_nll_minimum_where_pytorch_ood_stops_early(s) -> None:
    """Departure: pytorch-ood runs 50 L-BFGS steps at lr 0.01 from T = 1 and stops well short of the minimum of the
    validation NLL; oodforge finds the minimizer (Guo et al. 2017). At pytorch-ood's T the scores are equal."""
    z, y = s.id.logits.double().numpy(), s.id.labels.numpy()

    def nll(t: float) -> float:
        scaled = z / t
        top = scaled.max(1)
        return float(np.mean(np.log(np.exp(scaled - top[:, None]).sum(1)) + top - scaled[np.arange(len(y)), y]))

    best = scipy.optimize.minimize_scalar(nll, bounds=(0.01, 100.0), method="bounded", options={"xatol": 1e-10}).x
    ours = create_detector("temperature").fit(s.id)
    theirs = P.TemperatureScaling(None).fit_logits(s.id.logits, s.id.labels)
    t_theirs = theirs.t.item()
    assert ours.temperature_ == pytest.approx(best, rel=1e-6)
    assert abs(t_theirs - best) > 0.2 * best  # stopped early
    assert nll(t_theirs) > nll(ours.temperature_) + 1e-3
    fixed = create_detector("temperature", temperature=t_theirs).fit(s.id)
    assert_same((fixed.score_outputs(s.id), fixed.score_outputs(s.ood)),
                (theirs.predict_logits(s.id.logits), theirs.predict_logits(s.ood.logits)))


@pytest.mark.parametrize(("temperature", "epsilon"), [(1000.0, 0.0014), (10.0, 0.05)])
def test_odin_matches_on_inputs(s, temperature, epsilon) -> None:
    ours = create_detector("odin", temperature=temperature, epsilon=epsilon)
    theirs = P.ODIN(s.model, eps=epsilon, temperature=temperature)
    assert_same((ours.score(s.model, s.x_id), ours.score(s.model, s.x_ood)),
                (theirs.predict(s.x_id), theirs.predict(s.x_ood)), atol=1e-7)


# --- features (and the head) -----------------------------------------------------------------------------------

def test_mahalanobis_is_the_squared_distance_under_the_covariance_over_n(s) -> None:
    """Departure: pytorch-ood's covariance is the sum of outer products (not divided by N, + 1e-6 I) and its score is
    half the squared distance, so its scores are oodforge's (Lee et al. 2018) divided by 2N."""
    theirs = P.Mahalanobis(None).fit_features(s.train.features, s.train.labels)
    assert_same(ours_scores(create_detector("mahalanobis"), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)),
                scale=2 * N_TRAIN, rtol=1e-3)


def test_rmds_is_relative_to_covariances_over_n(s) -> None:
    """Departure: both covariances are sums in pytorch-ood (not divided by N), so its scores are oodforge's / N."""
    theirs = P.RMD(None).fit_features(s.train.features, s.train.labels)
    assert_same(ours_scores(create_detector("rmds"), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)),
                scale=N_TRAIN, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("k", [1, 10, 50])
def test_knn_matches(s, k) -> None:
    theirs = P.KNN(None, k=k).fit_features(s.train.features, s.train.labels)
    assert_same(ours_scores(create_detector("knn", k=k), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)), atol=1e-5)


@pytest.mark.parametrize("dim", [4, 8])
def test_vim_matches(s, dim) -> None:
    theirs = P.ViM(None, d=dim, w=s.head.weight, b=s.head.bias).fit_features(s.train.features, s.train.labels)
    assert_same(ours_scores(create_detector("vim", dim=dim), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)),
                rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("percentile", [50.0, 90.0])
def test_react_matches(s, percentile) -> None:
    theirs = P.ReAct(None, s.head, percentile=percentile / 100).fit_feature_maps(s.train.features, s.train.labels)
    assert_same(ours_scores(create_detector("react", percentile=percentile), s),
                (theirs.predict_feature_maps(s.id.features), theirs.predict_feature_maps(s.ood.features)))


def maps(features: Tensor) -> Tensor:
    """Pooled features as the B x C x 1 x 1 feature maps pytorch-ood's ASH and SCALE take."""
    return features[:, :, None, None]


@pytest.mark.parametrize("variant", ["p", "b", "s"])
def test_ash_matches_at_the_same_percentile(s, variant) -> None:
    """Departure (default only): pytorch-ood's percentile is 0.65, oodforge's 90 (the authors' ASH-S@90 configs)."""
    assert P.ASH(None, None).percentile == 0.65 and create_detector("ash").percentile == 90.0
    theirs = P.ASH(None, lambda m: s.head(m.flatten(1)), variant=f"ash-{variant}", percentile=0.9)
    with torch.no_grad():
        expected = (theirs.predict_feature_maps(maps(s.id.features)), theirs.predict_feature_maps(maps(s.ood.features)))
    assert_same(ours_scores(create_detector("ash", variant=variant, percentile=90.0), s), expected, atol=1e-5)


@pytest.mark.parametrize("percentile", [65.0, 85.0])
def test_scale_matches_at_the_same_percentile(s, percentile) -> None:
    """Departure (default only): pytorch-ood's percentile is 0.65, oodforge's 85 (the authors' config)."""
    assert P.SCALE(None, None).percentile == 0.65 and create_detector("scale").percentile == 85.0
    theirs = P.SCALE(None, lambda m: s.head(m.flatten(1)), percentile=percentile / 100)
    with torch.no_grad():
        expected = (theirs.predict_feature_maps(maps(s.id.features)), theirs.predict_feature_maps(maps(s.ood.features)))
    assert_same(ours_scores(create_detector("scale", percentile=percentile), s), expected, atol=1e-5)


@pytest.mark.parametrize("sparsity", [50.0, 90.0])
def test_dice_matches(s, sparsity) -> None:
    theirs = P.DICE(None, w=s.head.weight, b=s.head.bias, p=sparsity / 100)
    theirs.fit_features(s.train.features, s.train.labels)
    assert_same(ours_scores(create_detector("dice", sparsity=sparsity), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)))


def test_she_matches(s) -> None:
    theirs = P.SHE(None, s.head).fit_features(s.train.features, s.train.labels)
    with torch.no_grad():
        expected = (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features))
    assert_same(ours_scores(create_detector("she"), s), expected, atol=1e-5)


def test_gradnorm_matches_on_the_final_layer_weight(s) -> None:
    """Departure: pytorch-ood differentiates every parameter unless ``param_filter`` says otherwise; the paper and
    oodforge use the final layer's weight only. With that filter the scores are equal, both from inputs and from
    oodforge's closed form on cached outputs."""
    head_weight = f"net.{s.model.head_name}.weight"
    theirs = P.GradNorm(s.model, param_filter=lambda name: name == head_weight)
    expected = (theirs.predict(s.x_id), theirs.predict(s.x_ood))
    ours = create_detector("gradnorm")
    assert_same((ours.score(s.model, s.x_id), ours.score(s.model, s.x_ood)), expected)
    assert_same(ours_scores(ours, s, fit=False), expected)
    every_parameter = P.GradNorm(s.model).predict(s.x_id)
    assert not torch.allclose(every_parameter, expected[0], rtol=1e-2)


@pytest.mark.parametrize("alpha", [0.0, 1e-4, 0.1])
def test_nci_matches_at_the_same_alpha(s, alpha) -> None:
    """Departure (default only): pytorch-ood's alpha is 0, oodforge's 1e-4 (OpenOOD's config)."""
    assert P.NCI(None, s.head).alpha == 0.0 and create_detector("nci").alpha == 1e-4
    theirs = P.NCI(None, s.head, alpha=alpha).fit_features(s.train.features)
    assert_same(ours_scores(create_detector("nci", alpha=alpha), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)))


def test_fdbd_matches(s) -> None:
    theirs = P.fDBD(None, s.head).fit_features(s.train.features)
    assert_same(ours_scores(create_detector("fdbd"), s),
                (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features)))


def test_nnguide_matches_on_the_same_bank(s) -> None:
    """Departure (bank only): pytorch-ood banks every row it is fitted on; oodforge draws a seeded ``bank_fraction``
    of the training rows (1% by default, as the paper). Fitted on oodforge's bank rows, the scores are equal."""
    ours = create_detector("nnguide", k=10, bank_fraction=0.5).fit(s.train, s.model)
    rows = ours.bank_indices_
    assert len(rows) == N_TRAIN // 2
    theirs = P.NNGuide(None, s.head, k=10).fit_features(s.train.features[rows], s.train.labels[rows])
    with torch.no_grad():
        expected = (theirs.predict_features(s.id.features), theirs.predict_features(s.ood.features))
    assert_same(ours_scores(ours, s, fit=False), expected, atol=1e-5)
