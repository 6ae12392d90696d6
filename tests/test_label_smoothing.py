"""LS and ALS losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oodforge.losses.base import LOSSES, LossInputs, create_loss
from oodforge.losses.label_smoothing import AdaptiveLabelSmoothing, LabelSmoothing


def inputs(logits: torch.Tensor, labels: list[int]) -> LossInputs:
    labels_t = torch.tensor(labels)
    return LossInputs(logits=logits, labels=labels_t, features=logits, id_logits=logits)


def logits_of(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log()


def test_registered_with_defaults():
    assert "ls" in LOSSES and "als" in LOSSES
    assert create_loss("ls").eps == 0.1
    als = create_loss("als")
    assert (als.weight, als.target) == (1.0, "pred")


def test_ls_matches_hand_built_targets():
    probs = [0.1, 0.2, 0.3, 0.4]
    loss = LabelSmoothing(eps=0.3)(inputs(logits_of(probs), [2]))
    # target: 1 - 0.3 = 0.7 on class 2, 0.3 / (4 - 1) = 0.1 on the others
    expected = -(0.1 * math.log(0.1) + 0.1 * math.log(0.2) + 0.7 * math.log(0.3) + 0.1 * math.log(0.4))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # PyTorch's eps / C convention gives a different number
    torch_convention = F.cross_entropy(logits_of(probs), torch.tensor([2]), label_smoothing=0.3)
    assert abs(torch_convention.item() - expected) > 1e-3


def test_ls_batch_mean_and_default_eps():
    rows = [[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
    loss = LabelSmoothing()(inputs(logits_of(*rows), [0, 1]))
    first = -(0.9 * math.log(0.5) + 0.05 * math.log(0.25) + 0.05 * math.log(0.25))
    second = -(0.05 * math.log(0.2) + 0.9 * math.log(0.2) + 0.05 * math.log(0.6))
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_ls_with_zero_eps_is_cross_entropy():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = [0, 3, 1, 1, 2]
    loss = LabelSmoothing(eps=0.0)(inputs(logits, labels))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.tensor(labels)).item(), rel=1e-6)


def test_als_value_by_hand():
    # p = (0.5, 0.3, 0.2), label 1, k = argmax = 0: non-k probs (0.3, 0.2), pbar = 0.25,
    # spread = sqrt(((0.05)^2 + (0.05)^2) / 2 + eps) = sqrt(0.0025 + eps)
    loss = AdaptiveLabelSmoothing(eps=1e-8)(inputs(logits_of([0.5, 0.3, 0.2]), [1]))
    assert loss.item() == pytest.approx(-math.log(0.3) + math.sqrt(0.0025 + 1e-8), rel=1e-7)


def test_als_weight_and_batch_mean():
    rows = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]
    loss = AdaptiveLabelSmoothing(weight=2.0, eps=1e-8)(inputs(logits_of(*rows), [1, 2]))
    # second row: k = 2, non-k probs (0.1, 0.1) -> zero spread, sqrt(eps)
    ce = (-math.log(0.3) - math.log(0.8)) / 2
    spread = (math.sqrt(0.0025 + 1e-8) + math.sqrt(1e-8)) / 2
    assert loss.item() == pytest.approx(ce + 2.0 * spread, rel=1e-7)


def test_als_label_target():
    # k = label = 1: non-k probs (0.5, 0.2), pbar = 0.35, spread = sqrt((0.15^2 + 0.15^2) / 2) = 0.15
    loss = AdaptiveLabelSmoothing(target="label", eps=1e-8)(inputs(logits_of([0.5, 0.3, 0.2]), [1]))
    assert loss.item() == pytest.approx(-math.log(0.3) + math.sqrt(0.0225 + 1e-8), rel=1e-7)


def test_als_gradient_finite_at_zero_spread():
    # non-max probabilities all equal: the spread term is at its minimum, its gradient is zero
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]], requires_grad=True)
    AdaptiveLabelSmoothing()(inputs(logits, [0])).backward()
    assert torch.isfinite(logits.grad).all()
    # so the gradient is CE's: softmax - onehot
    e = math.exp(2.0)
    z = e + 3.0
    expected = torch.tensor([[e / z - 1.0, 1 / z, 1 / z, 1 / z]])
    assert torch.allclose(logits.grad, expected, atol=1e-6)


@pytest.mark.parametrize(
    "loss", [LabelSmoothing(), AdaptiveLabelSmoothing(), AdaptiveLabelSmoothing(target="label")]
)
def test_gradients_flow_to_logits(loss):
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss(inputs(logits, [0, 1, 2, 3, 4, 0])).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_als_spread_term_has_gradient():
    logits = logits_of([0.5, 0.3, 0.2]).float().requires_grad_(True)
    ce_only = logits.detach().clone().requires_grad_(True)
    AdaptiveLabelSmoothing()(inputs(logits, [1])).backward()
    F.cross_entropy(ce_only, torch.tensor([1])).backward()
    assert not torch.allclose(logits.grad, ce_only.grad)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("ls", {"eps": 1.0}, "eps"),
        ("als", {"target": "mode"}, "target"),
        ("als", {"weight": -1.0}, "weight"),
        ("als", {"eps": 0.0}, "eps"),
    ],
)
def test_bad_options_are_named(name, options, match):
    with pytest.raises(ValueError, match=match):
        create_loss(name, **options)
