"""VRA, SSD, GROOD-generic, CARef, CADRef and WeiPer against pytorch-ood or independent numpy references, and their
behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score
from torch import nn

from oodforge.detectors import create_detector
from oodforge.detectors.base import ModelOutputs, NotFittedError

CLASSES, DIM = 5, 12
NAMES = ["vra", "ssd", "grood_generic", "caref", "cadref", "weiper"]


class TinyClassifier(nn.Module):
    """Just a head, which is all these detectors use from the model."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


@pytest.fixture(scope="module")
def case() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs, ModelOutputs]:
    """Five classes of relu(centre + noise) in 12-d, a linear head roughly aligned with the centres, and OOD
    points drawn far from every centre."""
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


def auroc(detector, model, train, test, ood) -> float:
    detector.fit(train, model)
    scores = torch.cat([detector.score_outputs(test), detector.score_outputs(ood)]).numpy()
    return roc_auc_score(np.r_[np.ones(len(test)), np.zeros(len(ood))], scores)


# ----------------------------------------------------------------------------------------------------- VRA


def reference_vra(model, train, test, alpha=60.0, beta=90.0, per_dimension=True) -> np.ndarray:
    """VRA-P from the paper: 0 below the alpha-percentile, clipped at the beta-percentile, energy of the head."""
    x = arrays(train)[0]
    axis = 0 if per_dimension else None
    low, high = np.percentile(x, alpha, axis=axis), np.percentile(x, beta, axis=axis)
    z = arrays(test)[0]
    rectified = np.where(z < low, 0.0, np.minimum(z, high))
    w, b = head_arrays(model)
    return logsumexp(rectified @ w.T + b, axis=1)


def pytorch_ood_vra(model, train, features: torch.Tensor, alpha=60.0, beta=90.0) -> np.ndarray:
    """pytorch-ood's VRA on the same features and head, in oodforge's convention (higher = more ID)."""
    from pytorch_ood.detector import VRA as TorchOodVRA

    detector = TorchOodVRA(backbone=None, head=model.head, lower_percentile=alpha / 100, upper_percentile=beta / 100)
    detector.fit_feature_maps(train.features, train.labels)
    return -detector.predict_feature_maps(features).double().numpy()


@pytest.mark.parametrize("kwargs", [{}, {"alpha": 20.0, "beta": 95.0}, {"per_dimension": False},
                                    {"alpha": 0.0, "beta": 100.0}])
def test_vra_matches_numpy_reference(case, kwargs):
    model, train, test, ood = case
    detector = create_detector("vra", **kwargs).fit(train, model)
    for outputs in (test, ood):
        np.testing.assert_allclose(detector.score_outputs(outputs).numpy(),
                                   reference_vra(model, train, outputs, **kwargs), rtol=1e-5, atol=1e-5)


def test_vra_equals_pytorch_ood_where_no_activation_is_below_alpha(case):
    """pytorch-ood clamps low activations up to the alpha-percentile instead of zeroing them: on features
    that are all at or above it the two agree."""
    model, train, test, _ = case
    low = torch.from_numpy(np.quantile(arrays(train)[0], 0.6, axis=0)).float()
    raised = ModelOutputs(test.logits, torch.maximum(test.features, low + 1e-4))
    ours = create_detector("vra").fit(train, model).score_outputs(raised).numpy()
    np.testing.assert_allclose(ours, pytorch_ood_vra(model, train, raised.features), rtol=1e-5, atol=1e-5)


def test_vra_zeroes_what_pytorch_ood_clamps(case):
    """The documented difference: below alpha VRA-P sets activations to 0, pytorch-ood to the threshold."""
    model, train, test, _ = case
    ours = create_detector("vra").fit(train, model).score_outputs(test).numpy()
    theirs = pytorch_ood_vra(model, train, test.features)
    low = np.quantile(arrays(train)[0], 0.6, axis=0)
    z = arrays(test)[0]
    w, b = head_arrays(model)
    clamped_low = logsumexp(np.clip(z, low, np.quantile(arrays(train)[0], 0.9, axis=0)) @ w.T + b, axis=1)
    np.testing.assert_allclose(theirs, clamped_low, rtol=1e-5, atol=1e-5)
    assert (z < low).any(axis=1).all(), "every test row has activations below alpha"
    assert np.abs(ours - theirs).min() > 1e-3


def test_vra_suppresses_overactivated_inputs_that_energy_trusts(case):
    """Features scaled up 4x look more ID than ID to energy; clipped at beta they lose most of that edge, and
    raising an activation already above beta changes nothing."""
    model, train, test, _ = case
    with torch.no_grad():
        over = ModelOutputs(model.head(4.0 * test.features), 4.0 * test.features)
    energy = auroc(create_detector("energy"), model, train, test, over)
    vra = auroc(create_detector("vra"), model, train, test, over)
    assert energy < 0.1 and vra > energy + 0.2
    detector = create_detector("vra").fit(train, model)
    higher = over.features.clone()
    higher[over.features > detector.high_.float()] += 100.0
    torch.testing.assert_close(detector.score_outputs(ModelOutputs(over.logits, higher)), detector.score_outputs(over))


@pytest.mark.parametrize(("kwargs", "message"), [({"alpha": 95.0, "beta": 90.0}, "alpha must not exceed beta"),
                                                 ({"alpha": -1.0}, "vra: alpha"), ({"beta": 101.0}, "vra: beta")])
def test_vra_refuses_bad_percentiles_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_detector("vra", **kwargs)


# ----------------------------------------------------------------------------------------------------- SSD


def reference_ssd(train, test, k=1, seed=0) -> np.ndarray:
    """The official eval_ssd.py: unit rows, standardize with train statistics, clusters, per-cluster
    pinv(np.cov(bias=True)), minimum squared distance (negated)."""
    x, z = arrays(train)[0], arrays(test)[0]
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
    z = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-10)
    m, s = x.mean(axis=0), x.std(axis=0)
    x, z = (x - m) / (s + 1e-10), (z - m) / (s + 1e-10)
    labels = np.zeros(len(x)) if k == 1 else KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    distances = []
    for c in np.unique(labels):
        members = x[labels == c]
        d = z - members.mean(axis=0)
        distances.append(np.einsum("nd,de,ne->n", d, np.linalg.pinv(np.cov(members.T, bias=True)), d))
    return -np.min(distances, axis=0)


@pytest.mark.parametrize("k", [1, 3])
def test_ssd_matches_numpy_reference(case, k):
    model, train, test, ood = case
    detector = create_detector("ssd", k=k).fit(train, model)
    for outputs in (test, ood):
        np.testing.assert_allclose(detector.score_outputs(outputs).numpy(), reference_ssd(train, outputs, k=k),
                                   rtol=1e-4, atol=1e-4)


def test_ssd_is_scale_invariant_and_ranks_id_above_far_ood(case):
    model, train, test, ood = case
    detector = create_detector("ssd").fit(train, model)
    scaled = ModelOutputs(test.logits, 7.0 * test.features)
    torch.testing.assert_close(detector.score_outputs(scaled), detector.score_outputs(test), rtol=1e-5, atol=1e-4)
    assert auroc(create_detector("ssd"), model, train, test, ood) > 0.9


def test_ssd_refuses_bad_k(case):
    model, train, _, _ = case
    with pytest.raises(ValueError, match="ssd: k must be an integer >= 1"):
        create_detector("ssd", k=0)
    with pytest.raises(ValueError, match=r"ssd:k=500 is more than the 300 training features"):
        create_detector("ssd", k=500).fit(train, model)


# ------------------------------------------------------------------------------------------- GROOD-generic


def reference_grood_generic(train, test, draws=400_000, seed=0) -> np.ndarray:
    """The paper's statistic with scipy Gaussians; F_c by plain Monte Carlo: the fraction of draws of the
    class Gaussian whose likelihood ratio is at most the sample's."""
    x, logits = arrays(train)
    y = train.labels.numpy()
    classes = np.unique(y)
    prototypes = np.stack([x[y == c].mean(axis=0) for c in classes])

    def plane(features, scores):
        distances = np.sqrt(((features[:, None, :] - prototypes[None]) ** 2).sum(axis=2))
        return np.stack([scores[:, classes], 1.0 / (1.0 + distances)], axis=2)

    train_plane, test_plane = plane(x, logits), plane(*arrays(test))
    scales = np.quantile(train_plane[..., 0], 0.9) / 4.0, np.quantile(train_plane[..., 1], 0.9) / 8.0
    ood = multivariate_normal(np.zeros(2), np.diag(np.square(scales)))
    rng = np.random.default_rng(seed)
    calibrated = []
    for k, c in enumerate(classes):
        own = train_plane[y == c, k]
        gaussian = multivariate_normal(own.mean(axis=0), np.cov(own.T))
        reference = np.sort(_log_ratio(gaussian, ood, gaussian.rvs(draws, random_state=rng)))
        values = _log_ratio(gaussian, ood, test_plane[:, k])
        calibrated.append(np.searchsorted(reference, values, side="right") / draws)
    return np.max(calibrated, axis=0)


def _log_ratio(gaussian, ood, points: np.ndarray) -> np.ndarray:
    return gaussian.logpdf(points) - ood.logpdf(points)


def test_grood_generic_matches_monte_carlo_reference(case):
    model, train, test, ood = case
    detector = create_detector("grood_generic").fit(train, model)
    for outputs in (test, ood):
        np.testing.assert_allclose(detector.score_outputs(outputs).numpy(),
                                   reference_grood_generic(train, outputs), atol=0.01)


def test_grood_generic_is_calibrated_on_its_own_gaussian(case):
    """Samples drawn from a class's Gaussian in the (logit, similarity) plane get F_c uniform on [0, 1]."""
    model, train, _, _ = case
    detector = create_detector("grood_generic").fit(train, model)
    rng = np.random.default_rng(1)
    mean, precision = detector.gauss_means_[0].numpy(), detector.gauss_precisions_[0].numpy()
    points = torch.from_numpy(rng.multivariate_normal(mean, np.linalg.inv(precision), size=4000))
    log_ratio = detector._log_ratio(points[:, None, :].expand(-1, len(detector.classes_), -1))[:, 0]
    from oodforge.detectors.grood_generic import _interpolated_cdf

    values = _interpolated_cdf(detector.knots_[:1], log_ratio[None])[0].numpy()
    np.testing.assert_allclose(np.quantile(values, [0.1, 0.25, 0.5, 0.75, 0.9]), [0.1, 0.25, 0.5, 0.75, 0.9],
                               atol=0.03)


def test_grood_generic_scores_lie_in_unit_interval_and_rank_id_above_far_ood(case):
    model, train, test, ood = case
    detector = create_detector("grood_generic").fit(train, model)
    scores = torch.cat([detector.score_outputs(test), detector.score_outputs(ood)])
    assert scores.dtype == torch.float32 and ((scores >= 0) & (scores <= 1)).all()
    assert auroc(create_detector("grood_generic"), model, train, test, ood) > 0.9


def test_grood_generic_refuses_bad_samples_and_unlabelled_training_data(case):
    model, train, _, _ = case
    with pytest.raises(ValueError, match="grood_generic: samples must be an integer >= 2"):
        create_detector("grood_generic", samples=1)
    with pytest.raises(ValueError, match="grood_generic needs labelled training outputs"):
        create_detector("grood_generic").fit(ModelOutputs(train.logits, train.features), model)


# ------------------------------------------------------------------------------------------- CARef, CADRef


def predicted_means(train) -> np.ndarray:
    x, logits = arrays(train)
    predicted = logits.argmax(axis=1)
    assert len(np.unique(predicted)) == CLASSES, "every class is predicted for some training sample"
    return np.stack([x[predicted == c].mean(axis=0) for c in range(CLASSES)])


def reference_caref(model, train, test) -> np.ndarray:
    """The official CARef.py: L1 distance to the predicted class's mean (grouped by prediction) over ||h||_1."""
    z, logits = arrays(test)
    means = predicted_means(train)[logits.argmax(axis=1)]
    return -np.abs(means - z).sum(axis=1) / np.abs(z).sum(axis=1)


def logit_confidence(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "energy":
        return logsumexp(logits, axis=1)
    if kind == "maxlogit":
        return logits.max(axis=1)
    p = softmax(logits, axis=1)
    if kind == "msp":
        return p.max(axis=1)
    m = max(10, logits.shape[1] // 10)
    top = np.sort(p, axis=1)[:, -m:]
    return 1.0 / (top**0.1 * (1.0 - top) ** 0.1).sum(axis=1)


def reference_cadref(model, train, test, logit_score="energy") -> np.ndarray:
    """The official CADRef.py: errors along and against sign(w_p), over the own and the mean training score."""
    z, logits = arrays(test)
    predicted = logits.argmax(axis=1)
    w, _ = head_arrays(model)
    aligned = (z - predicted_means(train)[predicted]) * np.sign(w[predicted])
    norm = np.abs(z).sum(axis=1)
    positive, negative = np.maximum(aligned, 0).sum(axis=1) / norm, np.maximum(-aligned, 0).sum(axis=1) / norm
    mean_score = logit_confidence(arrays(train)[1], logit_score).mean()
    return -(positive / logit_confidence(logits, logit_score) + negative / mean_score)


@pytest.mark.parametrize(("name", "kwargs", "reference"), [
    ("caref", {}, reference_caref), ("cadref", {}, reference_cadref),
    ("cadref", {"logit_score": "maxlogit"}, reference_cadref), ("cadref", {"logit_score": "msp"}, reference_cadref),
    ("cadref", {"logit_score": "gen"}, reference_cadref)])
def test_caref_and_cadref_match_numpy_reference(case, name, kwargs, reference):
    model, train, test, ood = case
    detector = create_detector(name, **kwargs).fit(train, model)
    for outputs in (test, ood):
        np.testing.assert_allclose(detector.score_outputs(outputs).numpy(), reference(model, train, outputs, **kwargs),
                                   rtol=1e-5, atol=1e-6)


def test_cadref_splits_the_caref_error_by_the_weight_signs(case):
    """With every logit score equal to the training mean, CADRef is CARef divided by that mean."""
    model, train, test, _ = case
    cadref = create_detector("cadref", logit_score="maxlogit").fit(train, model)
    caref = create_detector("caref").fit(train, model)
    mean = cadref.train_logit_score_.item()
    flat = test.logits - test.logits.max(dim=1, keepdim=True).values + mean  # same argmax, max logit = mean
    outputs = ModelOutputs(flat, test.features)
    torch.testing.assert_close(cadref.score_outputs(outputs), caref.score_outputs(outputs) / mean)


def test_caref_ranks_id_above_far_ood_and_unpredicted_classes_fall_back_to_labels(case):
    model, train, test, ood = case
    assert auroc(create_detector("caref"), model, train, test, ood) > 0.75
    logits = train.logits.clone()
    logits[:, 4] = -100.0  # class 4 is never predicted
    with pytest.warns(UserWarning, match="1 of 5 classes are predicted for no training sample"):
        detector = create_detector("caref").fit(ModelOutputs(logits, train.features, train.labels), model)
    torch.testing.assert_close(detector.means_[4], train.features[train.labels == 4].double().mean(dim=0))


def test_cadref_refuses_unknown_logit_score():
    with pytest.raises(ValueError, match="cadref: logit_score must be one of energy, maxlogit, msp, gen"):
        create_detector("cadref", logit_score="odin")


# -------------------------------------------------------------------------------------------------- WeiPer


def reference_weiper(train, test, perturbed_weight, perturbed_bias, repeats=100, bins=100, smoothing=20,
                     smoothing_perturbed=20, lambda_1=1.0, lambda_2=1.0, **_) -> np.ndarray:
    """WeiPer+KLD as the authors' code computes it: per-sample histograms by explicit half-open bin tests,
    edge-replicated moving average of the sample's histogram, symmetric KL to the training mean, mean MSP over
    the perturbed heads."""
    x, z = arrays(train)[0], arrays(test)[0]
    spaces = [(x, z), (x @ perturbed_weight.T + perturbed_bias, z @ perturbed_weight.T + perturbed_bias)]

    def histograms(values, low, high):
        edges = np.linspace(low, high + 1e-8, bins + 1)
        return ((values[:, :, None] >= edges[None, None, :-1]) & (values[:, :, None] < edges[None, None, 1:])).mean(1)

    def divergence(p, q, size, eps):
        left = (size - 1) // 2
        padded = np.pad(q, ((0, 0), (left, size - 1 - left)), mode="edge")
        q = np.stack([padded[:, j:j + size].mean(axis=1) for j in range(bins)], axis=1) + eps
        p = (p + eps)[None]
        p, q = p / p.sum(axis=1, keepdims=True), q / q.sum(axis=1, keepdims=True)
        return (p * np.log(p / q)).sum(axis=1) + (q * np.log(q / p)).sum(axis=1)

    terms = []
    settings = zip(spaces, (smoothing, smoothing_perturbed), (0.01, 0.025), strict=True)
    for (train_values, test_values), size, eps in settings:
        low, high = train_values.min(), train_values.max()
        mean_density = histograms(train_values, low, high).mean(axis=0)
        terms.append(divergence(mean_density, histograms(test_values, low, high), size, eps))
    logits = spaces[1][1].reshape(len(z), repeats, -1)
    msp = softmax(logits, axis=2).max(axis=2).mean(axis=1)
    return -(terms[0] + lambda_1 * terms[1] - lambda_2 * msp)


@pytest.mark.parametrize("kwargs", [{}, {"repeats": 7, "bins": 30, "smoothing": 4, "smoothing_perturbed": 9,
                                         "lambda_1": 2.5, "lambda_2": 0.1, "delta": 1.0}])
def test_weiper_matches_numpy_reference(case, kwargs):
    model, train, test, ood = case
    detector = create_detector("weiper", **kwargs).fit(train, model)
    weight, bias = (t.numpy() for t in detector.perturbed_head())
    for outputs in (test, ood):
        np.testing.assert_allclose(detector.score_outputs(outputs).numpy(),
                                   reference_weiper(train, outputs, weight, bias, **kwargs), rtol=1e-5, atol=1e-5)


def test_weiper_perturbs_each_class_weight_by_delta_times_its_norm(case):
    model, train, _, _ = case
    detector = create_detector("weiper", delta=1.5, repeats=6).fit(train, model)
    weight, bias = head_arrays(model)
    perturbed, perturbed_bias = (t.numpy() for t in detector.perturbed_head())
    shifts = perturbed.reshape(6, CLASSES, DIM) - weight[None]
    np.testing.assert_allclose(np.linalg.norm(shifts, axis=2), 1.5 * np.linalg.norm(weight, axis=1)[None].repeat(6, 0))
    np.testing.assert_allclose(perturbed_bias, np.tile(bias, 6))
    directions = shifts / np.linalg.norm(shifts, axis=2, keepdims=True)
    assert np.abs(np.einsum("rcd,scd->rsc", directions, directions)[~np.eye(6, dtype=bool)]).max() < 0.99
    again = create_detector("weiper", delta=1.5, repeats=6).fit(train, model).perturbed_head()[0].numpy()
    other = create_detector("weiper", delta=1.5, repeats=6, seed=1).fit(train, model).perturbed_head()[0].numpy()
    assert np.array_equal(again, perturbed) and not np.allclose(other, perturbed)


def test_weiper_flags_rescaled_features_that_energy_misses(case):
    """Shrunken or over-activated features change the shape of the activation histograms: WeiPer ranks ID
    above both; energy prefers the over-activated ones to ID."""
    model, train, test, _ = case
    with torch.no_grad():
        rescaled = {s: ModelOutputs(model.head(s * test.features), s * test.features) for s in (0.25, 3.0)}
    assert auroc(create_detector("weiper"), model, train, test, rescaled[0.25]) > 0.9
    weiper = auroc(create_detector("weiper"), model, train, test, rescaled[3.0])
    assert weiper > 0.5 and weiper > auroc(create_detector("energy"), model, train, test, rescaled[3.0]) + 0.3


def test_weiper_refuses_smoothing_wider_than_the_histogram():
    with pytest.raises(ValueError, match=r"weiper: smoothing_perturbed must be in \[1, bins=10\]"):
        create_detector("weiper", bins=10, smoothing=5, smoothing_perturbed=11)


# ---------------------------------------------------------------------------------------------------- all


@pytest.mark.parametrize("name", NAMES)
def test_unfitted_refused_then_float32_scores_one_per_row(case, name):
    model, train, test, _ = case
    detector = create_detector(name)
    with pytest.raises(NotFittedError):
        detector.score_outputs(test)
    scores = detector.fit(train, model).score_outputs(test)
    assert scores.shape == (len(test),) and scores.dtype == torch.float32 and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", NAMES)
def test_chunked_scores_equal_one_chunk(case, name):
    model, train, test, _ = case
    chunked = create_detector(name, chunk_rows=7).fit(train, model).score_outputs(test)
    whole = create_detector(name, chunk_rows=10**6).fit(train, model).score_outputs(test)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
