"""Energy-bounded fine-tuning (Liu et al. 2020) and the semantic-driven energy loss with cluster focal loss.

E(x) = -T logsumexp(f(x)/T) with T = 1, taken from ``oodforge.scores.energy_score``.
Both losses read ``LossInputs.id_logits`` / ``outlier_logits`` (test-time logits) for the energy
hinges and ``LossInputs.logits`` (training logits) for cross-entropy. A batch without outliers
skips the outlier hinge (and, for ``sde``, the outlier repulsion); the ID terms still apply.

The cluster-focal and repulsion settings (gamma = 2, s = 16, margin = 0, unit weights) are our
defaults, made options: the paper's values could not be checked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodforge.losses.base import LOSSES, LossInputs
from oodforge.scores import cosine_to_centres, energy_score, normalized_class_means, representation_score
from oodforge.util.errors import ConfigError


def energy_bounded_term(
    id_logits: Tensor, outlier_logits: Tensor | None, m_in: float, m_out: float
) -> Tensor:
    """mean(relu(E_in - m_in)^2) + mean(relu(m_out - E_out)^2); the second term is 0 without outliers."""
    energy_in = -energy_score(id_logits)
    term = F.relu(energy_in - m_in).pow(2).mean()
    if outlier_logits is not None and outlier_logits.shape[0] > 0:
        energy_out = -energy_score(outlier_logits)
        term = term + F.relu(m_out - energy_out).pow(2).mean()
    return term


def cluster_focal_loss(
    features: Tensor, labels: Tensor, centres: Tensor, gamma: float = 2.0, scale: float = 16.0
) -> Tensor:
    """mean of -(1 - q_y)^gamma log q_y with q = softmax(scale * cos(h, mu))."""
    log_q = torch.log_softmax(scale * cosine_to_centres(features, centres), dim=1)
    log_q_y = log_q.gather(1, labels[:, None]).squeeze(1)
    focal = (1.0 - log_q_y.exp()).clamp(min=0.0).pow(gamma)  # clamp: rounding may give q_y > 1
    return (-focal * log_q_y).mean()


def outlier_repulsion(outlier_features: Tensor, centres: Tensor, margin: float = 0.0) -> Tensor:
    """mean relu(max_c cos(h_out, mu_c) - margin): pushes outliers' best cosine below ``margin``."""
    return F.relu(representation_score(outlier_features, centres) - margin).mean()


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{name} must be non-negative, got {value}")


class ClusterFocalLoss(nn.Module):
    """Cluster focal loss over learnable class centres ``centres`` (C, D), drawn from N(0, 1) and scaled to
    unit norm (an unnormalized draw has norm ~sqrt(D) and turns ~D times more slowly under the same lr).

    The centres are drawn from torch's global generator, so the caller's seed fixes them.
    """

    def __init__(self, num_classes: int, feature_dim: int, gamma: float = 2.0, scale: float = 16.0) -> None:
        super().__init__()
        if num_classes < 1 or feature_dim < 1:
            raise ConfigError(
                f"num_classes and feature_dim must be positive, got {num_classes} and {feature_dim}"
            )
        _check_non_negative(gamma=gamma)
        if scale <= 0:
            raise ConfigError(f"scale must be positive, got {scale}")
        self.gamma = gamma
        self.scale = scale
        self.centres = nn.Parameter(F.normalize(torch.randn(num_classes, feature_dim), dim=1))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return cluster_focal_loss(features, labels, self.centres, self.gamma, self.scale)


@LOSSES.register("energy")
class EnergyBoundedLoss(nn.Module):
    """CE + weight * energy-bounded term; defaults are Liu et al.'s CIFAR-10 values.

    For CIFAR-100 the paper uses ``m_in = -27``.
    """

    uses_outliers = True  # the training loop adds no separate outlier-exposure term

    def __init__(self, weight: float = 0.1, m_in: float = -23.0, m_out: float = -5.0) -> None:
        super().__init__()
        _check_non_negative(weight=weight)
        self.weight = weight
        self.m_in = m_in
        self.m_out = m_out

    def forward(self, batch: LossInputs) -> Tensor:
        bounded = energy_bounded_term(batch.id_logits, batch.outlier_logits, self.m_in, self.m_out)
        return F.cross_entropy(batch.logits, batch.labels) + self.weight * bounded


CENTRE_INITS = ("auto", "random", "class_means")  # auto: class means when fine-tuning, else random


@LOSSES.register("sde")
class SemanticEnergyLoss(nn.Module):
    """CE + weight * energy-bounded term + cfl_weight * CFL + repel_weight * outlier repulsion.

    Owns the learnable class centres (``centres``, shape (num_classes, feature_dim)); the
    optimizer must include this module's parameters.
    """

    uses_outliers = True  # the training loop adds no separate outlier-exposure term

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        weight: float = 0.1,
        m_in: float = -23.0,
        m_out: float = -5.0,
        cfl_weight: float = 1.0,
        repel_weight: float = 1.0,
        gamma: float = 2.0,
        scale: float = 16.0,
        margin: float = 0.0,
        centre_init: str = "auto",
    ) -> None:
        super().__init__()
        _check_non_negative(weight=weight, cfl_weight=cfl_weight, repel_weight=repel_weight)
        if centre_init not in CENTRE_INITS:
            raise ConfigError(f"centre_init must be one of {', '.join(CENTRE_INITS)}, got {centre_init!r}")
        # "class_means" (and "auto" when fine-tuning): the training loop calls init_centres_from first
        self.centre_init = centre_init
        self.energy = EnergyBoundedLoss(weight, m_in, m_out)
        self.cluster_focal = ClusterFocalLoss(num_classes, feature_dim, gamma, scale)
        self.cfl_weight = cfl_weight
        self.repel_weight = repel_weight
        self.margin = margin

    @property
    def centres(self) -> nn.Parameter:
        """The learnable class centres mu, shape (num_classes, feature_dim)."""
        return self.cluster_focal.centres

    @torch.no_grad()
    def init_centres_from(self, features: Tensor, labels: Tensor) -> None:
        """Set the centres to the unit-norm means of the L2-normalized ``features`` of each class (all must occur)."""
        classes = torch.unique(labels)
        if len(classes) != self.centres.shape[0]:
            raise ConfigError(f"class-mean centres need all {self.centres.shape[0]} classes, got {len(classes)}")
        self.centres.copy_(F.normalize(normalized_class_means(features, labels), dim=1))

    def forward(self, batch: LossInputs) -> Tensor:
        loss = self.energy(batch) + self.cfl_weight * self.cluster_focal(batch.features, batch.labels)
        outliers = batch.outlier_features
        if outliers is not None and outliers.shape[0] > 0:
            repulsion = outlier_repulsion(outliers, self.centres, self.margin)
            loss = loss + self.repel_weight * repulsion
        return loss
