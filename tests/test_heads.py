"""Cosine heads and the max-cosine detector, on features and weights with known angles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oodforge.detectors.base import DETECTORS, ModelOutputs, NotFittedError
from oodforge.detectors.cosine import MaxCosine
from oodforge.models.classifier import Classifier, ModelConfig
from oodforge.models.heads import (
    HEADS,
    AdaCos,
    ArcFace,
    CosFace,
    CosineHead,
    LinearHead,
    SphereFace,
    create_head,
)

PI = math.pi
SQRT3_2 = math.sqrt(3) / 2
CLASS_ANGLES = [0.0, PI / 2, PI]  # class weights W_j point at these angles in the plane


def planar_head(cls: type[CosineHead], **options) -> CosineHead:
    """A 3-class head on 2-d features whose (unnormalized) class weights lie at CLASS_ANGLES."""
    head = cls(2, 3, **options)
    with torch.no_grad():
        head.weight.copy_(2.0 * torch.tensor([[math.cos(a), math.sin(a)] for a in CLASS_ANGLES]))
    return head


def at_angles(*angles: float) -> torch.Tensor:
    """Feature rows of norm 3 at the given angles."""
    return 3.0 * torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_registered_names_and_options():
    assert {"sphereface", "cosface", "arcface", "adacos", "linear"} <= set(HEADS.names())
    head = create_head("arcface", 4, 3, scale=16.0, margin=0.2)
    assert isinstance(head, ArcFace) and (head.scale, head.margin) == (16.0, 0.2)
    assert create_head("cosface", 4, 3).margin == 0.35
    assert create_head("sphereface", 4, 3).margin == 1.35
    assert create_head("arcface", 4, 3).margin == 0.5
    assert create_head("adacos", 4, 11).scale.item() == pytest.approx(math.sqrt(2) * math.log(10))


def test_cosine_normalizes_features_and_weights():
    cos = planar_head(CosFace).cosine(at_angles(PI / 3))
    assert torch.allclose(cos, torch.tensor([[0.5, SQRT3_2, -0.5]]), atol=1e-6)


def test_cosface_training_logits():
    logits = planar_head(CosFace).train()(at_angles(PI / 3), torch.tensor([0]))
    expected = torch.tensor([[30 * (0.5 - 0.35), 30 * SQRT3_2, 30 * -0.5]])
    assert torch.allclose(logits, expected, atol=1e-4)


def test_arcface_training_logits_and_fallback():
    head = planar_head(ArcFace).train()
    # label 0 at theta_y = pi/3: theta_y + 0.5 < pi, so s * cos(theta_y + m)
    logits = head(at_angles(PI / 3), torch.tensor([0]))
    expected = torch.tensor([[30 * math.cos(PI / 3 + 0.5), 30 * SQRT3_2, 30 * -0.5]])
    assert torch.allclose(logits, expected, atol=1e-4)
    # label 2 at theta_y = 11pi/12 > pi - 0.5: fallback s * (cos(theta_y) - m * sin(pi - m))
    logits = head(at_angles(PI / 12), torch.tensor([2]))
    fallback = 30 * (math.cos(11 * PI / 12) - 0.5 * math.sin(PI - 0.5))
    assert logits[0, 2].item() == pytest.approx(fallback, abs=1e-4)
    assert abs(fallback - 30 * math.cos(11 * PI / 12 + 0.5)) > 1.0  # the other branch would differ
    assert logits[0, 0].item() == pytest.approx(30 * math.cos(PI / 12), abs=1e-4)


def test_arcface_easy_margin_keeps_the_plain_cosine_where_it_is_negative():
    head = planar_head(ArcFace, easy_margin=True).train()
    # label 0 at theta_y = pi/3 (cos 0.5 > 0): margin applied as without the option
    logits = head(at_angles(PI / 3), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(30 * math.cos(PI / 3 + 0.5), abs=1e-4)
    # label 2 at theta_y = 11pi/12 (cos < 0): plain s * cos(theta_y), no fallback
    logits = head(at_angles(PI / 12), torch.tensor([2]))
    assert logits[0, 2].item() == pytest.approx(30 * math.cos(11 * PI / 12), abs=1e-4)
    # label 1 at theta_y = pi/2 + pi/12 (cos < 0, theta_y + m < pi): the default applies the margin, easy does not
    default = planar_head(ArcFace).train()(at_angles(PI + PI / 12), torch.tensor([1]))
    assert default[0, 1].item() == pytest.approx(30 * math.cos(PI / 2 + PI / 12 + 0.5), abs=1e-4)
    easy = head(at_angles(PI + PI / 12), torch.tensor([1]))
    assert easy[0, 1].item() == pytest.approx(30 * math.cos(PI / 2 + PI / 12), abs=1e-4)
    assert create_head("arcface", 4, 3, easy_margin=True).easy_margin
    with pytest.raises(ValueError, match="easy_margin"):
        create_head("arcface", 4, 3, easy_margin="sometimes")


def test_sphereface_training_logits():
    head = planar_head(SphereFace).train()
    # theta_y = pi/3, m * theta_y < pi: k = 0, psi = cos(1.35 * pi/3)
    logits = head(at_angles(PI / 3), torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(30 * math.cos(1.35 * PI / 3), abs=1e-4)
    assert logits[0, 1].item() == pytest.approx(30 * SQRT3_2, abs=1e-4)
    # theta_y = 11pi/12, m * theta_y = 1.2375 pi: k = 1, psi = -cos(1.35 * 11pi/12) - 2
    logits = head(at_angles(PI / 12), torch.tensor([2]))
    assert logits[0, 2].item() == pytest.approx(30 * (-math.cos(1.35 * 11 * PI / 12) - 2), abs=1e-4)
    # m = 2, theta_y = 2pi/3: k = 1, psi = -cos(4pi/3) - 2 = 0.5 - 2 = -1.5
    logits = planar_head(SphereFace, margin=2.0, scale=1.0).train()(at_angles(PI / 3), torch.tensor([2]))
    assert logits[0, 2].item() == pytest.approx(-1.5, abs=1e-5)


def test_sphereface_extension_is_monotone_and_continuous():
    head = SphereFace(2, 2, scale=1.0, margin=1.35).train()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    thetas = torch.linspace(0.01, PI - 0.01, 2000, dtype=torch.float64)
    features = torch.stack([thetas.cos(), thetas.sin()], dim=1).float()
    psi = head(features, torch.zeros(2000, dtype=torch.long))[:, 0]
    steps = psi[1:] - psi[:-1]
    assert (steps < 0).all()  # strictly decreasing in theta
    assert steps.abs().max() < 0.01  # no jump at theta = pi / m
    assert psi[-1].item() == pytest.approx(-math.cos(1.35 * (PI - 0.01)) - 2, abs=1e-4)


def test_adacos_scale_updates_by_hand():
    head = planar_head(AdaCos).train()
    s0 = math.sqrt(2) * math.log(2)
    assert head.scale.item() == pytest.approx(s0)
    # step 1: angles 0, pi/6, pi/2 to class 0; theta_y = (0, pi/6, pi/2), median pi/6 < pi/4
    # non-target cosines per row: (0, -1), (1/2, -sqrt3/2), (1, 0)
    head(at_angles(0.0, PI / 6, PI / 2), torch.tensor([0, 0, 0]))
    b_avg = (1 + math.exp(-s0) + math.exp(s0 / 2) + math.exp(-s0 * SQRT3_2) + math.exp(s0) + 1) / 3
    s1 = math.log(b_avg) / math.cos(PI / 6)
    assert head.scale.item() == pytest.approx(s1, rel=1e-5)
    # step 2: theta_y = (pi/3, pi/3, pi/2), median pi/3 is capped at pi/4; the logits use the new s
    logits = head(at_angles(PI / 3, PI / 3, PI / 2), torch.tensor([0, 0, 0]))
    b_avg = (2 * (math.exp(s1 * SQRT3_2) + math.exp(-s1 / 2)) + math.exp(s1) + 1) / 3
    s2 = math.log(b_avg) / math.cos(PI / 4)
    assert head.scale.item() == pytest.approx(s2, rel=1e-5)
    expected = s2 * torch.tensor([[0.5, SQRT3_2, -0.5], [0.5, SQRT3_2, -0.5], [0.0, 1.0, 0.0]])
    assert torch.allclose(logits, expected, atol=1e-4)


def test_adacos_median_of_even_batch_is_midpoint():
    head = planar_head(AdaCos, scale=2.0).train()
    head(at_angles(PI / 12, PI / 6), torch.tensor([0, 0]))  # theta_y = pi/12, pi/6 -> median pi/8
    rows = [(math.cos(PI / 2 - PI / 12), math.cos(PI - PI / 12)), (0.5, -SQRT3_2)]
    b_avg = sum(math.exp(2.0 * c) for row in rows for c in row) / 2
    assert head.scale.item() == pytest.approx(math.log(b_avg) / math.cos(PI / 8), rel=1e-5)


def test_adacos_scale_is_a_saved_buffer():
    head = planar_head(AdaCos).train()
    head(at_angles(0.0, PI / 6, PI / 2), torch.tensor([0, 0, 1]))
    assert "scale" in head.state_dict() and "scale" in dict(head.named_buffers())
    restored = AdaCos(2, 3)
    restored.load_state_dict(head.state_dict())
    assert restored.scale.item() == head.scale.item() != pytest.approx(math.sqrt(2) * math.log(2))
    model = Classifier(ModelConfig(head="adacos"))
    assert "head.scale" in model.state_dict()


def test_adacos_needs_scale_for_two_classes():
    with pytest.raises(ValueError, match="scale"):
        AdaCos(4, 2)
    assert AdaCos(4, 2, scale=5.0).scale.item() == 5.0


@pytest.mark.parametrize("cls", [CosFace, ArcFace, SphereFace, AdaCos])
def test_test_time_logits_have_no_margin(cls):
    head = planar_head(cls)
    features, labels = at_angles(PI / 3, PI / 12), torch.tensor([0, 2])
    scale = float(head.scale)
    second = [math.cos(PI / 12), math.sin(PI / 12), -math.cos(PI / 12)]
    expected = scale * torch.tensor([[0.5, SQRT3_2, -0.5], second])
    assert torch.allclose(head.eval()(features, labels), expected, atol=1e-4)
    assert torch.allclose(head.train()(features), expected, atol=1e-4)
    assert float(head.scale) == scale  # AdaCos adapts only in training with labels


@pytest.mark.parametrize("cls", [CosFace, ArcFace, SphereFace, AdaCos])
def test_gradients_reach_features_and_weights(cls):
    head = cls(5, 4).train()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, generator=generator)
    features[0] = head.weight[1].detach()  # cos(theta_y) = 1 exactly: the clamp keeps it finite
    features.requires_grad_(True)
    labels = torch.tensor([1, 0, 1, 2, 3, 0, 2, 3])
    F.cross_entropy(head(features, labels), labels).backward()
    for grad in (features.grad, head.weight.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class TinyModel(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head


def test_cosine_detector_is_max_cosine():
    assert DETECTORS.get("cosine") is MaxCosine
    head = CosFace(6, 4)
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(10, 6, generator=generator)
    outputs = ModelOutputs(logits=torch.zeros(10, 4), features=features)
    detector = MaxCosine()
    with pytest.raises(NotFittedError):
        detector.score_outputs(outputs)
    scores = detector.fit(outputs, TinyModel(head)).score_outputs(outputs)
    weight = head.weight.detach()
    manual = [
        max(float(f @ w) / (float(f.norm()) * float(w.norm())) for w in weight) for f in features
    ]
    assert scores.shape == (10,)
    assert torch.allclose(scores, torch.tensor(manual), atol=1e-6)


def test_cosine_detector_refuses_a_head_without_cosine():
    outputs = ModelOutputs(logits=torch.zeros(2, 3), features=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="LinearHead"):
        MaxCosine().fit(outputs, TinyModel(LinearHead(4, 3)))
    with pytest.raises(ValueError, match="model"):
        MaxCosine().fit(outputs)
