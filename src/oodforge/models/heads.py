"""Classification heads: map penultimate features to logits (``forward(features, labels=None)``).

Besides the linear head, the cosine heads (SphereFace, CosFace, ArcFace, AdaCos) score s * cos(theta_j)
between normalized features and normalized class weights; in training, with labels, the margin heads
replace the true class's cosine by a harder target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodforge.util.errors import ConfigError
from oodforge.util.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


@HEADS.register("linear")
class LinearHead(nn.Linear):
    """The usual softmax classifier: logits = W h + b. ``labels`` are ignored."""

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__(feature_dim, num_classes)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        return super().forward(features)


COSINE_CLAMP = 1e-6  # cosines are clamped to [-1 + COSINE_CLAMP, 1 - COSINE_CLAMP] before acos


def angle(cos: Tensor) -> Tensor:
    """theta = acos(cos), with cos clamped away from +-1 so the gradient stays finite."""
    return torch.acos(cos.clamp(-1.0 + COSINE_CLAMP, 1.0 - COSINE_CLAMP))


class CosineHead(nn.Module):
    """Normalized softmax head: logits s * cos(theta_j), theta_j the angle between h and class weight W_j.

    Training logits (module in training mode and ``labels`` given) replace cos(theta_y) by
    ``target_cosine(cos(theta_y))``; test-time logits are s * cos(theta_j) with no margin.
    """

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ConfigError(f"{type(self).__name__}: scale must be > 0, got scale={scale}")
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim))
        nn.init.xavier_uniform_(self.weight)
        self._init_scale(float(scale))

    def _init_scale(self, scale: float) -> None:
        self.scale = scale

    def cosine(self, features: Tensor) -> Tensor:
        """cos(theta_j) between each feature row and each class weight, shape (N, C)."""
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()

    def target_cosine(self, cos_y: Tensor) -> Tensor:
        """The true class's cosine with the margin applied; no margin here."""
        return cos_y

    def training_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        """s * cos(theta_j), with cos(theta_y) replaced by ``target_cosine(cos(theta_y))``."""
        index = labels.view(-1, 1)
        return self.scale * cos.scatter(1, index, self.target_cosine(cos.gather(1, index)))

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        cos = self.cosine(features)
        if labels is None or not self.training:
            return self.scale * cos
        return self.training_logits(cos, labels)


@HEADS.register("cosface")
class CosFace(CosineHead):
    """CosFace / large-margin cosine loss head: target logit s * (cos(theta_y) - m)."""

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.35) -> None:
        super().__init__(feature_dim, num_classes, scale)
        self.margin = margin

    def target_cosine(self, cos_y: Tensor) -> Tensor:
        return cos_y - self.margin


@HEADS.register("arcface")
class ArcFace(CosineHead):
    """ArcFace / additive angular margin head: target logit s * cos(theta_y + m).

    Where theta_y + m > pi (i.e. cos(theta_y) < cos(pi - m)) cos(theta_y + m) would stop decreasing
    in theta_y, so the target there is the usual fallback cos(theta_y) - m * sin(pi - m)
    (= cos(theta_y) - m * sin(m)). ``easy_margin=True`` (insightface's option) instead applies the margin only
    where cos(theta_y) > 0 and keeps cos(theta_y) elsewhere: from scratch on post-ReLU (non-negative) features the
    default ArcFace here settled with every class weight pointing away from the features (see the results pages:
    CIFAR-10 from scratch, cosine heads).
    """

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.5,
                 easy_margin: bool = False) -> None:
        super().__init__(feature_dim, num_classes, scale)
        if not 0.0 <= margin < math.pi:
            raise ConfigError(f"ArcFace: margin must be in [0, pi), got margin={margin}")
        if not isinstance(easy_margin, bool):
            raise ConfigError(f"ArcFace: easy_margin must be true or false, got easy_margin={easy_margin!r}")
        self.margin = margin
        self.easy_margin = easy_margin

    def in_fallback(self, cos_y: Tensor) -> Tensor:
        """Where the default rule uses its fallback: theta_y + m > pi, i.e. cos(theta_y) < cos(pi - m)."""
        return cos_y < math.cos(math.pi - self.margin)

    def target_cosine(self, cos_y: Tensor) -> Tensor:
        with_margin = torch.cos(angle(cos_y) + self.margin)
        if self.easy_margin:
            return torch.where(cos_y > 0, with_margin, cos_y)
        fallback = cos_y - self.margin * math.sin(math.pi - self.margin)
        return torch.where(self.in_fallback(cos_y), fallback, with_margin)


@HEADS.register("sphereface")
class SphereFace(CosineHead):
    """Normalized SphereFace / angular softmax head: target logit s * psi(theta_y).

    psi is the monotone extension of cos(m * theta) to [0, pi]:
    psi(theta) = (-1)^k * cos(m * theta) - 2k for theta in [k * pi / m, (k + 1) * pi / m],
    k = floor(m * theta / pi); psi is continuous and decreasing.
    """

    def __init__(self, feature_dim: int, num_classes: int, scale: float = 30.0, margin: float = 1.35) -> None:
        super().__init__(feature_dim, num_classes, scale)
        if margin <= 0:
            raise ConfigError(f"SphereFace: margin must be > 0, got margin={margin}")
        self.margin = margin

    def target_cosine(self, cos_y: Tensor) -> Tensor:
        theta = angle(cos_y)
        k = torch.floor(self.margin * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        return sign * torch.cos(self.margin * theta) - 2.0 * k


@HEADS.register("adacos")
class AdaCos(CosineHead):
    """AdaCos head: no margin; the scale adapts during training and is saved as the buffer ``scale``.

    Initial scale sqrt(2) * ln(C - 1) unless ``scale`` is given. Each training forward with labels
    first sets, under no_grad, s <- ln(B_avg) / cos(min(pi/4, theta_med)), where
    B_avg = mean over the batch of sum_{j != y} exp(s_old * cos(theta_j)) and theta_med is the
    median (midpoint of the two middle values for an even batch) of theta_y over the batch; the
    logits of that forward use the new s.
    """

    def __init__(self, feature_dim: int, num_classes: int, scale: float | None = None) -> None:
        if scale is None:
            if num_classes < 3:
                raise ConfigError(
                    f"AdaCos: the default scale sqrt(2) * ln(C - 1) is 0 for num_classes={num_classes}; "
                    "pass scale"
                )
            scale = math.sqrt(2.0) * math.log(num_classes - 1)
        super().__init__(feature_dim, num_classes, scale)

    def _init_scale(self, scale: float) -> None:
        self.register_buffer("scale", torch.tensor(scale))

    @torch.no_grad()
    def update_scale(self, cos: Tensor, labels: Tensor) -> None:
        """One AdaCos scale step from a batch's cosines and labels."""
        cos = cos.detach().float()
        is_label = F.one_hot(labels, self.num_classes).bool()
        others = (self.scale * cos).masked_fill(is_label, -math.inf)
        log_b_avg = torch.logsumexp(others.flatten(), dim=0) - math.log(cos.shape[0])
        theta_med = torch.quantile(angle(cos.gather(1, labels.view(-1, 1))), 0.5)
        self.scale.copy_(log_b_avg / torch.cos(theta_med.clamp(max=math.pi / 4)))

    def training_logits(self, cos: Tensor, labels: Tensor) -> Tensor:
        self.update_scale(cos, labels)
        return self.scale * cos


def create_head(name: str, feature_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """Build the head registered as ``name``."""
    return HEADS.create(name, feature_dim=feature_dim, num_classes=num_classes, **kwargs)
