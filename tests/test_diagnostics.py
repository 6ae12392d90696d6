"""Uniformity and tolerance against values worked out by hand on a few points."""

import math

import pytest
import torch

from oodforge.evaluation.diagnostics import tolerance, uniformity

# Unnormalized on purpose: they normalize to (1, 0), (0, 1), (-1, 0), whose squared distances are
# 2, 4, 2, so the mean of exp(-t d^2) over the pairs is (2 e^{-2t} + e^{-4t}) / 3.
THREE_POINTS = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-0.5, 0.0]])


def test_uniformity_three_points_by_hand():
    # t = 2: log((2 * 0.018315639 + 0.000335463) / 3) = log(0.012322247) = -4.396349
    assert uniformity(THREE_POINTS) == pytest.approx(-4.396349, abs=1e-6)
    # t = 1: log((2 * 0.135335283 + 0.018315639) / 3) = -2.339989
    assert uniformity(THREE_POINTS, t=1.0) == pytest.approx(-2.339989, abs=1e-6)


def test_uniformity_four_points_on_a_square():
    # (1,0), (0,1), (-1,0), (0,-1): each point has two neighbours at d^2 = 2 and one at d^2 = 4,
    # so over the 12 ordered pairs the mean is again (2 e^{-4} + e^{-8}) / 3 at t = 2.
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert uniformity(square) == pytest.approx(-4.396349, abs=1e-6)


def test_uniformity_identical_points_is_zero():
    assert uniformity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)


def test_uniformity_matches_direct_pairwise_computation_and_subsamples_reproducibly():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    z = torch.nn.functional.normalize(features.double(), dim=1)
    squared = torch.cdist(z, z).square()
    off_diagonal = ~torch.eye(len(z), dtype=torch.bool)
    expected = torch.exp(-2.0 * squared[off_diagonal]).mean().log().item()
    assert uniformity(features, chunk=64) == pytest.approx(expected, abs=1e-9)
    subsampled = uniformity(features, max_samples=50, seed=3)
    assert subsampled == uniformity(features, max_samples=50, seed=3)
    assert subsampled != pytest.approx(expected, abs=1e-9)


def test_tolerance_by_hand():
    features = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0], [0.0, 1.0], [0.0, -3.0], [1.0, 2.0]])
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    # class 0: cosines 0, 1/sqrt(2), 1/sqrt(2) -> mean sqrt(2)/3 = 0.4714045
    # class 1: cosine -1; class 2 has one sample and no pair, so it is left out
    # tolerance = (0.4714045 + (-1)) / 2 = -0.2642977
    assert tolerance(features, labels) == pytest.approx(-0.2642977, abs=1e-6)
    assert tolerance(features[:3], labels[:3]) == pytest.approx(math.sqrt(2) / 3, abs=1e-12)


def test_tolerance_weights_classes_equally():
    # class 0: two identical points (cosine 1); class 1: four points, all pairwise cosines 0 or -1:
    # (1,0), (-1,0), (0,1), (0,-1): 12 ordered pairs, 4 with cosine -1 -> mean -1/3.
    features = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    assert tolerance(features, labels) == pytest.approx((1.0 - 1.0 / 3.0) / 2, abs=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="features"):
        uniformity(torch.ones(3))
    with pytest.raises(ValueError, match="labels"):
        tolerance(torch.ones(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="2 or more"):
        tolerance(torch.eye(3), torch.arange(3))
