"""Logit detectors against hand-computed values; ODIN against a manual gradient-sign step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from oodforge.detectors.base import ModelOutputs, create_detector
from oodforge.detectors.logits import MSP, ODIN, Energy, MaxLogit
from oodforge.scores import energy_score

LOGITS = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]


def outputs(logits: list[list[float]] = LOGITS) -> ModelOutputs:
    tensor = torch.tensor(logits, dtype=torch.float64)
    return ModelOutputs(tensor, torch.zeros(len(logits), 4, dtype=torch.float64))


def softmax_max(row: list[float], temperature: float = 1.0) -> float:
    exps = [math.exp(v / temperature) for v in row]
    return max(exps) / sum(exps)


def test_msp_matches_hand_computed_values() -> None:
    scores = MSP().score_outputs(outputs())
    assert scores.shape == (2,)
    e = math.e
    expected = [e**3 / (e + e**2 + e**3), math.exp(0.5) / (math.exp(-1) + math.exp(0.5) + 1.0)]
    assert expected[0] == pytest.approx(0.665241, abs=1e-6)
    assert scores.tolist() == pytest.approx(expected, abs=1e-6)


def test_maxlogit_matches_hand_computed_values() -> None:
    scores = MaxLogit().score_outputs(outputs())
    assert scores.shape == (2,)
    assert scores.tolist() == pytest.approx([3.0, 0.5])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_energy_matches_hand_computed_values(temperature) -> None:
    expected = [temperature * math.log(sum(math.exp(v / temperature) for v in row)) for row in LOGITS]
    if temperature == 1.0:
        assert expected[0] == pytest.approx(3.407606, abs=1e-6)
    else:
        assert expected[0] == pytest.approx(2 * math.log(math.exp(0.5) + math.e + math.exp(1.5)))
    scores = Energy(temperature=temperature).score_outputs(outputs())
    assert scores.shape == (2,)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert energy_score(torch.tensor(LOGITS), temperature).tolist() == pytest.approx(expected, abs=1e-5)


def test_energy_default_temperature_is_one() -> None:
    assert Energy().temperature == 1.0


def test_energy_is_at_least_the_max_logit_and_msp_is_a_probability() -> None:
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    out = ModelOutputs(logits, torch.zeros(50, 2))
    energy, maxlogit, msp = (d.score_outputs(out) for d in (Energy(), MaxLogit(), MSP()))
    assert (energy >= maxlogit).all()
    assert (energy <= maxlogit + math.log(7) + 1e-5).all()
    assert ((msp >= 1 / 7 - 1e-6) & (msp <= 1)).all()


def test_registry_builds_the_logit_detectors() -> None:
    assert isinstance(create_detector("msp"), MSP)
    assert isinstance(create_detector("maxlogit"), MaxLogit)
    assert create_detector("energy", temperature=2.0).temperature == 2.0
    assert isinstance(create_detector("odin"), ODIN)


def test_odin_without_inputs_is_temperature_scaled_msp() -> None:
    scores = ODIN(temperature=2.0).score_outputs(outputs())
    assert scores.tolist() == pytest.approx([softmax_max(row, 2.0) for row in LOGITS], abs=1e-6)


class TinyModel(nn.Module):
    """A classifier-like model: ``features`` (tanh layer), ``head`` (linear) and ``logits``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def features(self, x: Tensor) -> Tensor:
        return torch.tanh(self.body(x.flatten(1)))

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@pytest.fixture
def model_and_inputs() -> tuple[TinyModel, Tensor]:
    model = TinyModel().eval()
    x = torch.rand(8, 1, 2, 3, generator=torch.Generator().manual_seed(1))
    return model, x


def test_detector_score_runs_the_model(model_and_inputs) -> None:
    model, x = model_and_inputs
    with torch.no_grad():
        expected = torch.softmax(model.logits(x), dim=1).max(dim=1).values
    torch.testing.assert_close(MSP().score(model, x), expected)


def test_odin_with_zero_epsilon_is_temperature_scaled_msp(model_and_inputs) -> None:
    model, x = model_and_inputs
    scores = ODIN(temperature=10.0, epsilon=0.0).score(model, x)
    with torch.no_grad():
        expected = torch.softmax(model.logits(x) / 10.0, dim=1).max(dim=1).values
    assert scores.shape == (8,)
    torch.testing.assert_close(scores, expected)
    passes = []
    real_logits = model.logits
    model.logits = lambda inputs: passes.append(torch.is_grad_enabled()) or real_logits(inputs)
    ODIN(temperature=10.0, epsilon=0.0).score(model, x)
    assert passes == [False]  # one forward pass, no input gradient (a tuning grid has 4 such trials)


@pytest.mark.parametrize("temperature", [1.0, 1000.0])
def test_odin_step_follows_the_gradient_sign_and_raises_the_score(model_and_inputs, temperature) -> None:
    model, x = model_and_inputs
    epsilon = 0.01
    # manual ODIN: one step against the gradient of -log S_yhat(x; T), yhat the predicted class
    inputs = x.clone().requires_grad_(True)
    scaled = model.logits(inputs) / temperature
    predicted = scaled.argmax(dim=1)
    log_prob = torch.log_softmax(scaled, dim=1)[torch.arange(len(x)), predicted]
    (grad,) = torch.autograd.grad(-log_prob.sum(), inputs)
    perturbed = x - epsilon * grad.sign()
    with torch.no_grad():
        before = torch.softmax(model.logits(x) / temperature, dim=1)
        after = torch.softmax(model.logits(perturbed) / temperature, dim=1)
    expected = after.max(dim=1).values

    scores = ODIN(temperature=temperature, epsilon=epsilon).score(model, x)
    assert scores.shape == (8,)
    torch.testing.assert_close(scores, expected)
    rows = torch.arange(len(x))
    assert (after[rows, predicted] > before[rows, predicted]).all()
    assert (scores > before.max(dim=1).values).all()
    assert not x.requires_grad  # the caller's tensor is untouched


def test_odin_leaves_model_parameters_without_gradients(model_and_inputs) -> None:
    model, x = model_and_inputs
    ODIN(epsilon=0.01).score(model, x)
    assert all(p.grad is None for p in model.parameters())
