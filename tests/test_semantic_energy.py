"""The semantic-energy and representation detectors against hand-computed scores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from oodforge.detectors.base import ModelOutputs, NotFittedError, create_detector
from oodforge.detectors.semantic_energy import Representation, SemanticEnergy

CENTRES = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
# Test outputs: -E(x) = logsumexp(f) = ln(e + 1) = 1.3132617 and ln 2 = 0.6931472;
# R(x) = max_c cos(h, mu_c) = 1 for h = [1, 0] and 1/sqrt2 = 0.7071068 for h = [0, 1].
TEST = ModelOutputs(
    logits=torch.tensor([[1.0, 0.0], [0.0, 0.0]]), features=torch.tensor([[1.0, 0.0], [0.0, 1.0]])
)
TRAIN = ModelOutputs(
    logits=torch.zeros(3, 2),
    features=torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]]),
    labels=torch.tensor([0, 0, 1]),
)


class ModelWithCentres(nn.Module):
    def __init__(self, centres: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("class_centres", centres)


def test_representation_uses_model_centres():
    detector = create_detector("representation").fit(TRAIN, ModelWithCentres(CENTRES))
    assert isinstance(detector, Representation)
    assert detector.centre_source_ == "model"
    scores = detector.score_outputs(TEST)
    assert scores.shape == (2,)
    assert scores.tolist() == pytest.approx([1.0, 0.7071068], abs=1e-6)


def test_representation_accepts_parameter_centres():
    model = nn.Module()
    model.class_centres = nn.Parameter(CENTRES.clone())
    detector = Representation().fit(TRAIN, model)
    assert detector.centre_source_ == "model"
    assert not detector.centres_.requires_grad


def test_semantic_energy_combines_energy_and_representation():
    detector = create_detector("semantic_energy", beta=0.5).fit(TRAIN, ModelWithCentres(CENTRES))
    assert isinstance(detector, SemanticEnergy)
    expected = [math.log(math.e + 1) + 0.5 * 1.0, math.log(2) + 0.5 / math.sqrt(2)]
    assert expected == pytest.approx([1.8132617, 1.0467006], abs=1e-6)
    assert detector.score_outputs(TEST).tolist() == pytest.approx(expected, abs=1e-6)


def test_semantic_energy_parts_alone():
    model = ModelWithCentres(CENTRES)
    energy_only = SemanticEnergy(beta=0.0).fit(TRAIN, model).score_outputs(TEST)
    assert energy_only.tolist() == pytest.approx([1.3132617, 0.6931472], abs=1e-6)
    energy_detector = create_detector("energy").fit(TRAIN, model)
    assert torch.allclose(energy_only, energy_detector.score_outputs(TEST))
    default = SemanticEnergy().fit(TRAIN, model)
    assert (default.beta, default.temperature) == (1.0, 1.0)
    assert default.score_outputs(TEST).tolist() == pytest.approx([2.3132617, 1.4002540], abs=1e-6)


def test_semantic_energy_temperature():
    detector = SemanticEnergy(beta=1.0, temperature=2.0).fit(TRAIN, ModelWithCentres(CENTRES))
    # -E_T = T logsumexp(f / T): 2 ln(e^0.5 + 1) = 1.9481545 and 2 ln 2 = 1.3862944
    expected = [2 * math.log(math.exp(0.5) + 1) + 1.0, 2 * math.log(2) + 1 / math.sqrt(2)]
    assert detector.score_outputs(TEST).tolist() == pytest.approx(expected, abs=1e-6)


def test_fallback_to_class_means_of_normalized_features():
    for model in (None, nn.Linear(2, 2)):
        detector = Representation().fit(TRAIN, model)
        assert detector.centre_source_ == "class_means"
        # class 0: mean of [1, 0] and [1/sqrt2, 1/sqrt2]; class 1: [0, 1]
        half = 1 / math.sqrt(2) / 2
        expected_centres = torch.tensor([[0.5 + half, half], [0.0, 1.0]])
        assert torch.allclose(detector.centres_, expected_centres, atol=1e-6)
        # class-0 centre sits at 22.5 degrees: cos 22.5 = 0.9238795 (unnormalized means would give 14.04)
        probe = ModelOutputs(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        scores = detector.score_outputs(probe)
        assert scores.tolist() == pytest.approx([math.cos(math.pi / 8), 0.0], abs=1e-6)


def test_semantic_energy_fallback_combination():
    detector = SemanticEnergy(beta=2.0).fit(TRAIN)
    assert detector.centre_source_ == "class_means"
    expected = [math.log(math.e + 1) + 2 * math.cos(math.pi / 8), math.log(2) + 2 * 1.0]
    assert detector.score_outputs(TEST).tolist() == pytest.approx(expected, abs=1e-6)


def test_errors():
    with pytest.raises(NotFittedError):
        SemanticEnergy().score_outputs(TEST)
    unlabeled = ModelOutputs(TRAIN.logits, TRAIN.features)
    with pytest.raises(ValueError, match="class_centres"):
        Representation().fit(unlabeled)
    with pytest.raises(ValueError, match="dimension"):
        Representation().fit(TRAIN, ModelWithCentres(torch.ones(2, 5)))
    with pytest.raises(ValueError, match="temperature"):
        SemanticEnergy(temperature=0.0).fit(TRAIN)
