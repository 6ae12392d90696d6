"""Energy-bounded loss, cluster focal loss, outlier repulsion and the ``sde`` loss on hand-checked tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oodforge.losses.base import LossInputs, create_loss
from oodforge.losses.energy import (
    ClusterFocalLoss,
    EnergyBoundedLoss,
    SemanticEnergyLoss,
    cluster_focal_loss,
    energy_bounded_term,
    outlier_repulsion,
)

# E = -logsumexp(f): rows [0, 0] and [2, 2] have E = -ln 2 and -(2 + ln 2).
ID_LOGITS = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
OUTLIER_LOGITS = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
# Training logits: CE of [1, 0] with label 0 (and [0, 1] with label 1) is ln(1 + e^-1).
TRAIN_LOGITS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
LABELS = torch.tensor([0, 1])
CE_VALUE = math.log(1 + math.exp(-1))  # 0.3132617
CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
FEATURES = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cosines to CENTRES: [1, 0], [1/sqrt2, 1/sqrt2]
OUTLIER_FEATURES = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])  # max cosines 1, 1/sqrt2, 0


def test_energy_bounded_term_both_hinges_active():
    # ID hinge (m_in = -1): relu(-ln2 + 1)^2 = 0.0941586 and relu(-2 - ln2 + 1) = 0 -> mean 0.0470793
    # outlier hinge (m_out = 0): relu(0 + ln2)^2 = 0.4804530 on every row -> mean 0.4804530
    expected_in = ((1 - math.log(2)) ** 2 + 0.0) / 2
    expected_out = math.log(2) ** 2
    assert expected_in + expected_out == pytest.approx(0.5275323, abs=1e-6)
    value = energy_bounded_term(ID_LOGITS, OUTLIER_LOGITS, m_in=-1.0, m_out=0.0)
    assert value.item() == pytest.approx(0.5275323, abs=1e-6)


def test_energy_bounded_term_hinges_inactive():
    # every E_in <= 0 = m_in and every E_out = -ln2 >= -5 = m_out
    assert energy_bounded_term(ID_LOGITS, OUTLIER_LOGITS, m_in=0.0, m_out=-5.0).item() == 0.0


def test_energy_bounded_term_without_outliers_is_id_hinge_only():
    expected = (1 - math.log(2)) ** 2 / 2  # 0.0470793
    assert energy_bounded_term(ID_LOGITS, None, -1.0, 0.0).item() == pytest.approx(expected, abs=1e-6)
    empty = torch.empty(0, 2)
    assert energy_bounded_term(ID_LOGITS, empty, -1.0, 0.0).item() == pytest.approx(expected, abs=1e-6)


def test_energy_loss_uses_training_logits_for_ce_and_test_logits_for_energy():
    loss = EnergyBoundedLoss(weight=0.1, m_in=-1.0, m_out=0.0)
    batch = LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS, OUTLIER_LOGITS, OUTLIER_FEATURES)
    assert loss(batch).item() == pytest.approx(0.3132617 + 0.1 * 0.5275323, abs=1e-6)


def test_energy_loss_with_inactive_hinges_is_plain_ce():
    loss = EnergyBoundedLoss(m_in=0.0, m_out=-5.0)
    batch = LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS, OUTLIER_LOGITS)
    assert loss(batch).item() == pytest.approx(CE_VALUE, abs=1e-6)


def test_energy_loss_without_outliers():
    loss = EnergyBoundedLoss(weight=0.5, m_in=-1.0, m_out=0.0)
    batch = LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS)
    assert loss(batch).item() == pytest.approx(CE_VALUE + 0.5 * 0.0470793, abs=1e-6)


def test_energy_loss_defaults_and_registry():
    loss = create_loss("energy")
    assert isinstance(loss, EnergyBoundedLoss)
    assert (loss.weight, loss.m_in, loss.m_out) == (0.1, -23.0, -5.0)
    assert loss.uses_outliers is True
    with pytest.raises(ValueError, match="weight"):
        EnergyBoundedLoss(weight=-1.0)


def test_cluster_focal_loss_hand_computed():
    # scale 1: q_y = softmax([1, 0])_0 = e/(e+1) for row 0; softmax([c, c])_1 = 1/2 for row 1
    q0 = math.e / (math.e + 1)
    row0 = (1 - q0) ** 2 * -math.log(q0)  # 0.0226581
    row1 = (1 - 0.5) ** 2 * -math.log(0.5)  # 0.1732868
    assert (row0 + row1) / 2 == pytest.approx(0.0979724, abs=1e-6)
    value = cluster_focal_loss(FEATURES, LABELS, CENTRES, gamma=2.0, scale=1.0)
    assert value.item() == pytest.approx(0.0979724, abs=1e-6)


def test_cluster_focal_loss_at_gamma_zero_is_ce_over_scaled_cosines():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(8, 5, generator=generator)
    centres = torch.randn(3, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cosines = F.normalize(features, dim=1) @ F.normalize(centres, dim=1).T
    expected = F.cross_entropy(16.0 * cosines, labels)
    value = cluster_focal_loss(features, labels, centres, gamma=0.0, scale=16.0)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cluster_focal_module_owns_seeded_centres_that_get_gradients():
    torch.manual_seed(3)
    first = ClusterFocalLoss(num_classes=3, feature_dim=4)
    torch.manual_seed(3)
    second = ClusterFocalLoss(num_classes=3, feature_dim=4)
    assert torch.equal(first.centres, second.centres)
    assert (first.gamma, first.scale) == (2.0, 16.0)
    assert [p is first.centres for p in first.parameters()] == [True]
    first(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert first.centres.grad is not None and first.centres.grad.abs().sum() > 0


def test_outlier_repulsion_active_and_inactive():
    # max cosines 1, 1/sqrt2, 0
    assert outlier_repulsion(OUTLIER_FEATURES, CENTRES).item() == pytest.approx(
        (1 + 1 / math.sqrt(2) + 0) / 3, abs=1e-6
    )  # 0.5690356
    assert outlier_repulsion(OUTLIER_FEATURES, CENTRES, margin=0.8).item() == pytest.approx(0.2 / 3, abs=1e-6)
    assert outlier_repulsion(OUTLIER_FEATURES, CENTRES, margin=1.0).item() == 0.0
    assert outlier_repulsion(torch.tensor([[-1.0, -1.0]]), CENTRES).item() == 0.0


def _sde(**options) -> SemanticEnergyLoss:
    loss = SemanticEnergyLoss(num_classes=2, feature_dim=2, m_in=-1.0, m_out=0.0, scale=1.0, **options)
    with torch.no_grad():
        loss.centres.copy_(CENTRES)
    return loss


def test_sde_loss_sums_its_four_terms():
    loss = _sde(cfl_weight=0.5, repel_weight=2.0)
    batch = LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS, OUTLIER_LOGITS, OUTLIER_FEATURES)
    # CE + 0.1 * energy term + 0.5 * CFL + 2 * repulsion
    expected = 0.3132617 + 0.1 * 0.5275323 + 0.5 * 0.0979724 + 2.0 * 0.5690356
    assert loss(batch).item() == pytest.approx(expected, abs=1e-5)


def test_sde_loss_without_outliers_skips_outlier_terms():
    loss = _sde()
    batch = LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS)
    expected = 0.3132617 + 0.1 * 0.0470793 + 1.0 * 0.0979724
    assert loss(batch).item() == pytest.approx(expected, abs=1e-5)


def test_sde_centres_get_gradients_from_cfl_and_repulsion():
    loss = _sde(cfl_weight=0.0)
    batch = LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS, OUTLIER_LOGITS, OUTLIER_FEATURES)
    loss(batch).backward()
    assert loss.centres.grad.abs().sum() > 0  # repulsion alone
    loss = _sde(repel_weight=0.0)
    loss(LossInputs(TRAIN_LOGITS, LABELS, FEATURES, ID_LOGITS)).backward()
    assert loss.centres.grad.abs().sum() > 0  # CFL alone


def test_sde_registry_defaults_and_centres():
    torch.manual_seed(0)
    loss = create_loss("sde", num_classes=3, feature_dim=4)
    assert isinstance(loss, SemanticEnergyLoss)
    assert loss.uses_outliers is True
    assert isinstance(loss.centres, torch.nn.Parameter) and loss.centres.shape == (3, 4)
    assert [p is loss.centres for p in loss.parameters()] == [True]
    assert (loss.cfl_weight, loss.repel_weight, loss.margin) == (1.0, 1.0, 0.0)
    assert (loss.energy.weight, loss.energy.m_in, loss.energy.m_out) == (0.1, -23.0, -5.0)
    assert (loss.cluster_focal.gamma, loss.cluster_focal.scale) == (2.0, 16.0)
    with pytest.raises(ValueError, match="dimension"):
        loss(LossInputs(torch.zeros(2, 3), LABELS, torch.zeros(2, 5), torch.zeros(2, 3)))


def test_sde_centres_start_at_hand_computed_class_means():
    loss = create_loss("sde", num_classes=2, feature_dim=2, centre_init="class_means")
    features = torch.tensor([[3.0, 0.0], [0.0, 2.0], [0.0, -5.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    loss.init_centres_from(features, labels)
    # class 0: mean of (1, 0) and (0, 1) = (0.5, 0.5), scaled to unit norm; class 1: mean of (0, -1) twice
    half = 0.5 ** 0.5
    assert torch.allclose(loss.centres.data, torch.tensor([[half, half], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="all 2 classes"):
        loss.init_centres_from(features[:2], labels[:2])
    with pytest.raises(ValueError, match="centre_init"):
        create_loss("sde", num_classes=2, feature_dim=2, centre_init="zeros")


def test_sde_random_centres_start_unit_norm_and_seeded():
    torch.manual_seed(3)
    first = create_loss("sde", num_classes=10, feature_dim=64).centres.detach().clone()
    torch.manual_seed(3)
    again = create_loss("sde", num_classes=10, feature_dim=64).centres.detach()
    assert torch.allclose(first.norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.equal(first, again)
    assert create_loss("sde", num_classes=10, feature_dim=64).centre_init == "auto"
