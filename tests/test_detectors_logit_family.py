"""GEN, entropy, temperature scaling, KL matching, ASH, SCALE, DICE and GradNorm against numpy/torch references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax
from scipy.stats import entropy as kl_divergence
from torch import Tensor, nn

from oodforge.detectors import ash as ash_module
from oodforge.detectors import dice as dice_module
from oodforge.detectors import klm as klm_module
from oodforge.detectors import temperature as temperature_module
from oodforge.detectors.ash import ASH, kept_count
from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs, NotFittedError
from oodforge.detectors.dice import DICE
from oodforge.detectors.entropy import Entropy
from oodforge.detectors.gen import GEN
from oodforge.detectors.gradnorm import GradNorm
from oodforge.detectors.klm import KLMatching
from oodforge.detectors.scale import SCALE
from oodforge.detectors.temperature import T_MAX, T_MIN, TemperatureScaling

CLASSES, DIM = 6, 12
DETECTOR_CLASSES = {"gen": GEN, "entropy": Entropy, "temperature": TemperatureScaling, "klm": KLMatching,
                    "ash": ASH, "scale": SCALE, "dice": DICE, "gradnorm": GradNorm}


class TinyClassifier(nn.Module):
    """A tanh feature layer and a linear head: what the detectors read from a model."""

    def __init__(self, head: nn.Module | None = None, in_dim: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(in_dim, DIM)
        self.head = nn.Linear(DIM, CLASSES) if head is None else head

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.body(x.flatten(1)))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def random_outputs(n: int, seed: int, head: nn.Module, positive: bool = False) -> ModelOutputs:
    """Class-clustered features (strictly positive and tie-free with ``positive``), logits from ``head``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=generator)
    centres = 2.0 * torch.randn(CLASSES, DIM, generator=generator)
    features = centres[labels] + torch.randn(n, DIM, generator=generator)
    features = features.abs() + 0.01 * torch.rand(n, DIM, generator=generator) if positive else features.relu()
    with torch.no_grad():
        logits = head(features)
    return ModelOutputs(logits, features, labels)


@pytest.fixture
def setup() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs]:
    model = TinyClassifier()
    return model, random_outputs(300, 1, model.head), random_outputs(40, 2, model.head)


@pytest.fixture
def positive_setup() -> tuple[TinyClassifier, ModelOutputs, ModelOutputs]:
    model = TinyClassifier()
    return model, random_outputs(300, 1, model.head, positive=True), random_outputs(40, 2, model.head, positive=True)


def head_arrays(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()


def confident_and_flat() -> ModelOutputs:
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.05, 0.0, 0.02, 0.0]])
    return ModelOutputs(logits, torch.zeros(2, DIM), torch.tensor([0, 0]))


# --- the registry and the parameter contract --------------------------------------------------------------


@pytest.mark.parametrize("name", list(DETECTOR_CLASSES))
def test_registered_with_grid_of_own_parameters(name) -> None:
    cls = DETECTOR_CLASSES[name]
    assert DETECTORS.get(name) is cls
    assert set(cls.search_space) <= set(cls.param_names())
    assert set(cls.requires) <= {"logits", "features", "train", "head", "gradients"}
    cls()._check()  # defaults pass
    for key, values in cls.search_space.items():
        for value in values:
            cls(**{key: value})._check()


def test_defaults_follow_the_papers() -> None:
    assert (GEN().gamma, GEN().m) == (0.1, 100)
    assert (ASH().variant, ASH().percentile) == ("s", 90.0)
    assert SCALE().percentile == 85.0
    assert DICE().sparsity == 90.0
    assert GradNorm().temperature == 1.0
    assert TemperatureScaling().temperature is None
    assert KLMatching().match == "nearest"
    assert GradNorm.needs_inputs and not any(c.needs_inputs for n, c in DETECTOR_CLASSES.items() if n != "gradnorm")
    assert {n for n, c in DETECTOR_CLASSES.items() if c.needs_fit} == {"temperature", "klm", "dice"}


@pytest.mark.parametrize("cls, options, parameter", [
    (GEN, dict(gamma=-1), "gamma"), (GEN, dict(gamma=0.0), "gamma"), (GEN, dict(gamma=1.5), "gamma"),
    (GEN, dict(m=0), "m"),
    (TemperatureScaling, dict(temperature=0.0), "temperature"),
    (TemperatureScaling, dict(temperature=-2.0), "temperature"),
    (KLMatching, dict(match="closest"), "match"),
    (ASH, dict(variant="q"), "variant"), (ASH, dict(percentile=100.0), "percentile"),
    (ASH, dict(percentile=-1.0), "percentile"),
    (SCALE, dict(percentile=100.0), "percentile"), (SCALE, dict(percentile=-5.0), "percentile"),
    (DICE, dict(sparsity=100.0), "sparsity"), (DICE, dict(sparsity=-1.0), "sparsity"),
    (GradNorm, dict(temperature=0.0), "temperature"),
])
def test_a_bad_parameter_fails_when_the_detector_is_built(cls: type, options: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        cls(**options)


@pytest.mark.parametrize("detector", [TemperatureScaling(), KLMatching(), DICE()])
def test_fitted_detectors_refuse_to_score_unfitted(detector, setup) -> None:
    with pytest.raises(NotFittedError):
        detector.score_outputs(setup[2])


# --- GEN and entropy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma, m", [(0.1, 100), (0.5, 3), (1.0, 1), (0.01, 6)])
def test_gen_matches_numpy(setup, gamma, m) -> None:
    _, _, test = setup
    probs = softmax(test.logits.double().numpy(), axis=1)
    top = -np.sort(-probs, axis=1)[:, : min(m, CLASSES)]
    expected = -(top**gamma * (1 - top) ** gamma).sum(axis=1)
    scores = GEN(gamma=gamma, m=m).score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_entropy_matches_numpy(setup) -> None:
    _, _, test = setup
    probs = softmax(test.logits.double().numpy(), axis=1)
    expected = (probs * np.log(probs)).sum(axis=1)
    scores = Entropy().score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    assert (scores <= 0).all() and (scores >= -math.log(CLASSES) - 1e-6).all()


@pytest.mark.parametrize("detector", [GEN(), GEN(gamma=1.0, m=2), Entropy()])
def test_confident_posterior_scores_higher_than_flat(detector) -> None:
    confident, flat = detector.score_outputs(confident_and_flat()).tolist()
    assert confident > flat


def test_entropy_of_saturated_logits_is_finite() -> None:
    logits = torch.tensor([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]])
    scores = Entropy().score_outputs(ModelOutputs(logits, torch.zeros(2, 1)))
    assert scores.tolist() == pytest.approx([0.0, -math.log(3)], abs=1e-6)


# --- temperature scaling ------------------------------------------------------------------------------------


def labelled_logits(n: int, seed: int, margin: float) -> ModelOutputs:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (n,), generator=generator)
    logits = 3.0 * torch.randn(n, CLASSES, generator=generator) + margin * nn.functional.one_hot(labels, CLASSES)
    return ModelOutputs(logits, torch.zeros(n, 1), labels)


def reference_temperature(outputs: ModelOutputs) -> float:
    logits, labels = outputs.logits.double().numpy(), outputs.labels.numpy()

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(labels)), labels]))

    result = minimize_scalar(nll, bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                             options={"xatol": 1e-10})
    return math.exp(result.x)


@pytest.mark.parametrize("margin", [2.0, 6.0])
def test_temperature_fit_matches_scipy_and_scores_match_numpy(margin, monkeypatch) -> None:
    monkeypatch.setattr(temperature_module, "CHUNK_ROWS", 37)  # several chunks
    train, test = labelled_logits(400, 3, margin), labelled_logits(40, 4, margin)
    detector = TemperatureScaling().fit(train)
    expected_t = reference_temperature(train)
    assert T_MIN < expected_t < T_MAX
    assert detector.temperature_ == pytest.approx(expected_t, rel=1e-3)
    scores = detector.score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    logits = test.logits.double().numpy()
    np.testing.assert_allclose(scores.numpy(), softmax(logits / detector.temperature_, axis=1).max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(scores.numpy(), softmax(logits / expected_t, axis=1).max(axis=1), rtol=1e-3)
    confident, flat = detector.score_outputs(confident_and_flat()).tolist()
    assert confident > flat


def test_temperature_hits_its_bounds_and_can_be_fixed() -> None:
    labels = torch.arange(60) % CLASSES
    separable = ModelOutputs(5.0 * nn.functional.one_hot(labels, CLASSES).float(), torch.zeros(60, 1), labels)
    assert TemperatureScaling().fit(separable).temperature_ == T_MIN  # NLL falls all the way to T -> 0
    anti = ModelOutputs(-separable.logits, separable.features, labels)
    assert TemperatureScaling().fit(anti).temperature_ == T_MAX  # wrong everywhere: T -> infinity
    fixed = TemperatureScaling(temperature=2.0).fit(ModelOutputs(separable.logits, separable.features))
    assert fixed.temperature_ == 2.0
    expected = softmax(separable.logits.double().numpy() / 2.0, axis=1).max(axis=1)
    np.testing.assert_allclose(fixed.score_outputs(separable).numpy(), expected, rtol=1e-6)


def test_temperature_fit_needs_valid_labels() -> None:
    outputs = labelled_logits(20, 0, 2.0)
    with pytest.raises(ValueError, match="labelled"):
        TemperatureScaling().fit(ModelOutputs(outputs.logits, outputs.features))
    with pytest.raises(ValueError, match="labels"):
        TemperatureScaling().fit(ModelOutputs(outputs.logits, outputs.features, torch.full((20,), -1)))


# --- KL matching --------------------------------------------------------------------------------------------


def klm_outputs() -> tuple[ModelOutputs, ModelOutputs]:
    """Fitting logits in which class 5 is never predicted; test logits in which it is."""
    generator = torch.Generator().manual_seed(5)
    train = 2.0 * torch.randn(300, CLASSES, generator=generator)
    train[:, 5] -= 20.0
    test = 2.0 * torch.randn(40, CLASSES, generator=generator)
    test[:4, 5] += 20.0
    return ModelOutputs(train, torch.zeros(300, 1)), ModelOutputs(test, torch.zeros(40, 1))


@pytest.mark.parametrize("match", ["nearest", "predicted"])
def test_klm_matches_scipy_kl(match, monkeypatch) -> None:
    monkeypatch.setattr(klm_module, "CHUNK_ROWS", 64)
    train, test = klm_outputs()
    fit_probs = softmax(train.logits.double().numpy(), axis=1)
    predicted = fit_probs.argmax(axis=1)
    templates = {k: fit_probs[predicted == k].mean(axis=0) for k in np.unique(predicted)}
    assert 5 not in templates
    expected = []
    for row in softmax(test.logits.double().numpy(), axis=1):
        nearest = min(kl_divergence(row, template) for template in templates.values())
        own = templates.get(int(row.argmax()))
        expected.append(-(kl_divergence(row, own) if match == "predicted" and own is not None else nearest))
    detector = KLMatching(match=match).fit(train)
    assert detector.template_classes_.tolist() == sorted(templates)
    scores = detector.score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_klm_scores_a_template_itself_highest() -> None:
    train, test = klm_outputs()
    detector = KLMatching().fit(train)
    template_logits = detector.templates_.log().float()  # softmax(log d) = d
    on_template = detector.score_outputs(ModelOutputs(template_logits, torch.zeros(len(template_logits), 1)))
    assert on_template.abs().max() < 1e-5
    assert (detector.score_outputs(test) <= 1e-6).all()


# --- ASH and SCALE ------------------------------------------------------------------------------------------


def numpy_energy(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return logsumexp(features @ weight.T + bias, axis=1)


def reference_ash(features: np.ndarray, variant: str, percentile: float) -> np.ndarray:
    width = features.shape[1]
    k = max(1, width - int(np.round(width * percentile / 100.0)))
    shaped = np.zeros_like(features)
    for row, out in zip(features, shaped, strict=True):
        keep = np.argsort(row)[::-1][:k]
        if variant == "p":
            out[keep] = row[keep]
        elif variant == "b":
            out[keep] = row.sum() / k
        else:
            out[keep] = row[keep] * np.exp(row.sum() / row[keep].sum())
    return shaped


@pytest.mark.parametrize("variant", ["p", "b", "s"])
@pytest.mark.parametrize("percentile", [0.0, 65.0, 90.0])
def test_ash_matches_numpy(positive_setup, variant, percentile, monkeypatch) -> None:
    monkeypatch.setattr(ash_module, "CHUNK_ROWS", 16)
    model, train, test = positive_setup
    weight, bias = head_arrays(model)
    expected = numpy_energy(reference_ash(test.features.double().numpy(), variant, percentile), weight, bias)
    scores = ASH(variant=variant, percentile=percentile).fit(train, model).score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_ash_p_at_zero_percentile_is_plain_energy(positive_setup) -> None:
    model, train, test = positive_setup
    weight, bias = head_arrays(model)
    scores = ASH(variant="p", percentile=0.0).fit(train, model).score_outputs(test)
    np.testing.assert_allclose(scores.numpy(), numpy_energy(test.features.double().numpy(), weight, bias), rtol=1e-5)


@pytest.mark.parametrize("percentile", [0.0, 50.0, 85.0, 95.0])
def test_scale_matches_numpy(positive_setup, percentile) -> None:
    model, train, test = positive_setup
    features = test.features.double().numpy()
    k = max(1, DIM - int(np.round(DIM * percentile / 100.0)))
    top_sum = -np.sort(-features, axis=1)[:, :k].sum(axis=1)
    scaled = features * np.exp(features.sum(axis=1) / top_sum)[:, None]
    expected = numpy_energy(scaled, *head_arrays(model))
    scores = SCALE(percentile=percentile).fit(train, model).score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)


def test_scale_is_ash_s_without_pruning(positive_setup) -> None:
    """At a percentile that keeps everything, both scale by exp(1) and agree."""
    model, train, test = positive_setup
    ash = ASH(variant="s", percentile=0.0).fit(train, model).score_outputs(test)
    torch.testing.assert_close(SCALE(percentile=0.0).fit(train, model).score_outputs(test), ash)


def test_kept_count_rounds_like_numpy_and_keeps_one() -> None:
    assert kept_count(10, 65.0) == 10 - int(np.round(6.5)) == 4
    assert kept_count(2048, 90.0) == 2048 - int(np.round(2048 * 0.9))
    assert kept_count(12, 99.0) == 1  # 12 - round(11.88) = 0, at least one stays


def test_ash_and_scale_need_the_head(positive_setup) -> None:
    _, train, test = positive_setup
    for detector, name in [(ASH(), "ash"), (SCALE(), "scale")]:
        with pytest.raises(ValueError, match=f"{name} needs the classifier"):
            detector.score_outputs(test)
        with pytest.raises(ValueError, match="fit\\(train, model\\)"):
            detector.fit(train, None)


def test_ash_zero_features_give_bias_energy() -> None:
    model = TinyClassifier()
    zeros = ModelOutputs(torch.zeros(3, CLASSES), torch.zeros(3, DIM))
    expected = torch.logsumexp(model.head.bias.detach(), dim=0).expand(3)
    for detector in (ASH(variant="s"), ASH(variant="b"), SCALE()):
        torch.testing.assert_close(detector.fit(zeros, model).score_outputs(zeros), expected)


# --- DICE ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 50.0, 90.0])
def test_dice_matches_numpy(setup, sparsity, monkeypatch) -> None:
    monkeypatch.setattr(dice_module, "CHUNK_ROWS", 7)  # the training mean over many chunks
    model, train, test = setup
    weight, bias = head_arrays(model)
    contribution = weight * train.features.double().numpy().mean(axis=0)[None, :]
    masked = weight * (contribution > np.percentile(contribution, sparsity))
    expected = numpy_energy(test.features.double().numpy(), masked, bias)
    detector = DICE(sparsity=sparsity).fit(train, model)
    scores = detector.score_outputs(test)
    assert scores.shape == (40,) and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-5)
    kept = (detector.weight_ != 0).double().mean().item()
    assert kept == pytest.approx(1 - sparsity / 100, abs=1.5 / (CLASSES * DIM))


def test_dice_needs_a_linear_head_and_matching_features(setup) -> None:
    model, train, _ = setup
    with pytest.raises(ValueError, match="dice needs the classifier"):
        DICE().fit(train, None)
    with pytest.raises(ValueError, match="dice"):
        DICE().fit(ModelOutputs(train.logits, train.features[:, :5]), model)


def test_fitted_state_survives_save_and_load(setup, tmp_path) -> None:
    model, train, test = setup
    labelled = labelled_logits(100, 1, 3.0)
    for detector, fit_on in [(DICE(sparsity=70.0), train), (KLMatching(match="predicted"), train),
                             (TemperatureScaling(), labelled)]:
        detector.fit(fit_on, model)
        path = detector.save(tmp_path / f"{type(detector).__name__}.pt")
        loaded = Detector.load(path, model)
        assert loaded.get_params() == detector.get_params()
        torch.testing.assert_close(loaded.score_outputs(test), detector.score_outputs(test))


# --- GradNorm -----------------------------------------------------------------------------------------------


def reference_gradnorm(model: TinyClassifier, x: Tensor, temperature: float, ones_targets: bool = False) -> Tensor:
    """Per-sample loop: backward of KL(u || softmax(head(h) / T)) (or the official all-ones-target loss)."""
    model = copy.deepcopy(model)
    norms = []
    for sample in x:
        model.zero_grad()
        with torch.no_grad():
            features = model.features(sample[None])
        log_probs = torch.log_softmax(model.head(features) / temperature, dim=1)
        loss = -log_probs.sum() if ones_targets else -log_probs.mean() - math.log(CLASSES)
        loss.backward()
        norms.append(model.head.weight.grad.abs().sum())
    return torch.stack(norms)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_closed_form_autograd_and_loop_agree(temperature) -> None:
    model = TinyClassifier().double().eval()
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = reference_gradnorm(model, x, temperature)
    detector = GradNorm(temperature=temperature)
    from_inputs = detector.score(model, x)
    with torch.no_grad():
        outputs = ModelOutputs(model.logits(x), model.features(x))
    from_outputs = detector.score_outputs(outputs)
    for scores in (from_inputs, from_outputs):
        assert scores.shape == (40,) and scores.dtype == torch.float32
        np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-5)
    official = reference_gradnorm(model, x, temperature, ones_targets=True)  # all-ones targets: C times larger
    np.testing.assert_allclose(official.numpy(), CLASSES * expected.numpy(), rtol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_gradnorm_in_float32_and_in_small_gradient_blocks(monkeypatch) -> None:
    monkeypatch.setattr("oodforge.detectors.gradnorm.GRADIENT_ELEMENTS", 3 * CLASSES * DIM)  # 3 samples a block
    model = TinyClassifier().eval()
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(4))
    expected = reference_gradnorm(model.double(), x.double(), 1.0)
    model.float()
    np.testing.assert_allclose(GradNorm().score(model, x).numpy(), expected.numpy(), rtol=1e-4)
    assert model.training is False


class SquashedHead(nn.Module):
    """A non-linear head with a ``weight``: logits = 3 tanh(W h)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(7)))

    def forward(self, features: Tensor) -> Tensor:
        return 3.0 * torch.tanh(features @ self.weight.T)


def test_gradnorm_autograd_covers_non_linear_heads() -> None:
    model = TinyClassifier(head=SquashedHead()).double()
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    np.testing.assert_allclose(GradNorm().score(model, x).numpy(), reference_gradnorm(model, x, 1.0).numpy(),
                               rtol=1e-5)


def test_gradnorm_confident_outputs_have_larger_gradients() -> None:
    outputs = confident_and_flat()
    outputs = ModelOutputs(outputs.logits, torch.ones(2, DIM))
    confident, flat = GradNorm().score_outputs(outputs).tolist()
    assert confident > flat
