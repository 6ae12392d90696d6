"""GROOD with a generic representation (Vojir et al. 2023): per-class Neyman-Pearson likelihood ratio in a 2-D
(logit, prototype similarity) space, calibrated to the probability of ID acceptance."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from oodforge.detectors.base import DETECTORS, Detector, ModelOutputs
from oodforge.detectors.chunks import row_slices
from oodforge.detectors.mahalanobis import squared_distances
from oodforge.util.errors import ConfigError

QUANTILE, LOGIT_DIVISOR, SIMILARITY_DIVISOR = 0.9, 4.0, 8.0  # the generic OOD Gaussian of the official code


@DETECTORS.register("grood_generic")
class GROODGeneric(Detector):
    """Score = max_c F_c(log r_c(x_c)), the calibrated Neyman-Pearson statistic of the best class.

    For class c, a sample lives in the 2-D space x_c = (f_c, 1 / (1 + ||h - mu_c||)): its logit for c
    (the linear classifier) and its similarity to the class prototype mu_c, the mean training feature of
    class c (the nearest-mean classifier). In this space class c is a Gaussian N(m_c, S_c), fitted to the
    training samples labelled c (``np.cov``, divided by n - 1), and OOD data a generic Gaussian N(0, S_0)
    with S_0 = diag((q_f / 4)^2, (q_s / 8)^2), q_f and q_s the 90th percentiles of all training logits and
    all training similarities. r_c = N(x_c; m_c, S_c) / N(x_c; 0, S_0) is the likelihood ratio of the
    Neyman-Pearson test for class c, and F_c(t) = P(r_c(y) <= t), y ~ N(m_c, S_c), its distribution under
    the class: the fraction of class-c data a threshold at t would reject, a calibrated score in [0, 1].
    F_c is estimated from ``samples`` scrambled Sobol draws of N(m_c, S_c) (seeded), linearly interpolated
    between them; below the smallest draw s_1 the score is (1 / samples) / (1 + s_1 - log r_c), which keeps
    the order of the likelihood ratio. Source: Vojir et al., "Calibrated
    Out-of-Distribution Detection with a Generic Representation" (arXiv:2303.13148) and the official code
    github.com/vojirt/GROOD (``eval/utils.py``, ``eval_test_data_linprobeNMNquadCalib``). Differences: the
    paper fits a logistic-regression probe on a generic (CLIP) representation, here the classifier's own
    logits serve as the linear probe; the official code estimates S_0 from 10,000 random draws and F_c on
    a 2000 x 2000 grid, here S_0 is the exact diagonal and F_c comes from quasi-random draws. (``grood``, like
    OpenOOD's ``grood`` postprocessor, is a different method: the gradient-aware GROOD of ElAraby et al.) The fit
    needs labelled training outputs, each class with at least three samples, and runs in float64.
    """

    needs_fit = True
    needs_labels = True
    requires: ClassVar[tuple[str, ...]] = ("logits", "features", "train")
    search_space: ClassVar[dict[str, list]] = {}

    def __init__(self, samples: int = 4096, seed: int = 0, chunk_rows: int = 16384) -> None:
        self.samples = samples
        self.seed = seed
        self.chunk_rows = chunk_rows

    def _check(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise ConfigError(f"grood_generic: samples must be an integer >= 2, got {self.samples!r}")
        if not self.chunk_rows >= 1:
            raise ConfigError(f"grood_generic: chunk_rows must be >= 1, got {self.chunk_rows}")

    def _fit(self, train: ModelOutputs) -> None:
        self._check()
        features, logits = train.features.detach(), train.logits.detach()
        labels = train.labels.detach().to(features.device)
        if features.ndim != 2 or len(features) == 0 or logits.shape[0] != len(features) or \
                labels.shape != (len(features),):
            raise ConfigError(f"grood_generic: train features (N, D), logits (N, C) and labels (N,) must match, got "
                              f"{tuple(features.shape)}, {tuple(logits.shape)} and {tuple(labels.shape)}")
        self.classes_, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        if self.classes_.min() < 0 or self.classes_.max() >= logits.shape[1]:
            raise ConfigError(f"grood_generic: training labels must index the {logits.shape[1]} logits, got labels "
                              f"{self.classes_.min().item()}..{self.classes_.max().item()}")
        if counts.min() < 3:
            raise ConfigError(f"grood_generic: class {self.classes_[counts.argmin()].item()} has {counts.min().item()} "
                              "training sample(s); each class needs at least 3")
        sums = torch.zeros(len(self.classes_), features.shape[1], dtype=torch.float64, device=features.device)
        self.prototypes_ = sums.index_add_(0, inverse, features.to(torch.float64)) / counts[:, None]
        points = self._plane(features, logits)  # (N, K, 2)
        covariances = self._fit_gaussians(points, inverse)
        self.knots_ = self._calibration_knots(torch.linalg.cholesky(covariances))

    def _plane(self, features: Tensor, logits: Tensor) -> Tensor:
        """(logit, prototype similarity) of every row for every class, float64, shape (N, K, 2)."""
        parts = []
        prototypes, classes = self.prototypes_.to(features.device), self.classes_.to(features.device)
        for rows in row_slices(features.shape[0], features.shape[1], self.chunk_rows):
            chunk = features[rows].to(torch.float64)
            similarity = 1.0 / (1.0 + squared_distances(chunk, prototypes).sqrt())
            parts.append(torch.stack([logits[rows].to(torch.float64)[:, classes], similarity], dim=2))
        return torch.cat(parts) if parts else features.new_zeros(0, len(classes), 2, dtype=torch.float64)

    def _fit_gaussians(self, points: Tensor, inverse: Tensor) -> Tensor:
        """Each class's Gaussian over its own samples, and the generic OOD Gaussian; returns the class
        covariances (K, 2, 2)."""
        own = points[torch.arange(len(points), device=points.device), inverse]  # (N, 2): each row at its class
        means, covariances = [], []
        for k in range(len(self.classes_)):
            members = own[inverse == k]
            centred = members - members.mean(dim=0)
            means.append(members.mean(dim=0))
            covariances.append(centred.T @ centred / (len(members) - 1))
        self.gauss_means_, covariances = torch.stack(means), torch.stack(covariances)
        if not (torch.linalg.eigvalsh(covariances)[:, 0] > 0).all():
            raise ConfigError("grood_generic: a class's (logit, similarity) samples lie on a line "
                              "(singular covariance)")
        self.gauss_precisions_ = torch.linalg.inv(covariances)
        self.gauss_logdets_ = torch.logdet(covariances)
        scales = torch.stack([_quantile(points[..., 0], QUANTILE) / LOGIT_DIVISOR,
                              _quantile(points[..., 1], QUANTILE) / SIMILARITY_DIVISOR])
        if not (scales > 0).all():
            raise ConfigError(f"grood_generic: the 90th percentile of the training logits must be > 0 to scale the OOD "
                              f"Gaussian, got {(scales[0] * LOGIT_DIVISOR).item():.4g}")
        self.ood_precision_ = scales.pow(-2)
        self.ood_logdet_ = 2.0 * scales.log().sum()
        return covariances

    def _log_ratio(self, points: Tensor) -> Tensor:
        """log N(x; m_c, S_c) - log N(x; 0, S_0) for points (N, K, 2), shape (N, K)."""
        centred = points - self.gauss_means_.to(points.device)
        own = torch.einsum("nki,kij,nkj->nk", centred, self.gauss_precisions_.to(points.device), centred)
        ood = (points.square() * self.ood_precision_.to(points.device)).sum(dim=2)
        return 0.5 * (ood - own) + 0.5 * (self.ood_logdet_.to(points.device) - self.gauss_logdets_.to(points.device))

    def _calibration_knots(self, roots: Tensor) -> Tensor:
        """Sorted log ratios of ``samples`` quasi-random draws from each class's Gaussian (``roots``: Cholesky
        factors of the covariances, (K, 2, 2)), shape (K, samples)."""
        engine = torch.quasirandom.SobolEngine(dimension=2, scramble=True, seed=self.seed)
        uniform = engine.draw(self.samples, dtype=torch.float64).clamp(1e-12, 1.0 - 1e-12)
        normal = torch.special.ndtri(uniform).to(roots.device)  # (M, 2)
        draws = self.gauss_means_[:, None, :] + torch.einsum("kij,mj->kmi", roots, normal)  # (K, M, 2)
        return self._log_ratio(draws.transpose(0, 1)).T.sort(dim=1).values.contiguous()

    def _score(self, outputs: ModelOutputs) -> Tensor:
        features, logits = outputs.features.detach(), outputs.logits.detach()
        dim = self.prototypes_.shape[1]
        if features.ndim != 2 or features.shape[1] != dim or logits.ndim != 2 or logits.shape[0] != features.shape[0]:
            raise ConfigError(f"grood_generic: features must be (N, {dim}) with logits (N, C), got "
                              f"{tuple(features.shape)} and {tuple(logits.shape)}")
        if logits.shape[1] <= int(self.classes_.max()):
            raise ConfigError(f"grood_generic: logits have {logits.shape[1]} classes, the fit saw class "
                              f"{int(self.classes_.max())}")
        log_ratio = self._log_ratio(self._plane(features, logits))  # (N, K)
        return _interpolated_cdf(self.knots_.to(log_ratio.device), log_ratio.T).max(dim=0).values.float()


def _interpolated_cdf(knots: Tensor, values: Tensor) -> Tensor:
    """Per row k, the empirical CDF of the sorted ``knots[k]`` (K, M) at ``values[k]`` (K, N), linearly
    interpolated between knots, 1 above the last one and (1 / M) / (1 + s_1 - v) below the first one, s_1."""
    count = knots.shape[1]
    index = torch.searchsorted(knots, values.contiguous())  # knots[index - 1] < v <= knots[index]
    safe = index.clamp(1, count - 1)
    low, high = knots.gather(1, safe - 1), knots.gather(1, safe)
    inside = (safe + (values - low) / (high - low).clamp(min=1e-300)) / count
    below = (1.0 / count) / (1.0 + knots[:, :1] - values)
    return torch.where(index == 0, below, torch.where(index >= count, torch.ones_like(values), inside))


def _quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile (0..1) of all entries, linearly interpolated (``numpy.quantile``), float64 scalar."""
    flat = values.reshape(-1).to(torch.float64)
    position = q * (len(flat) - 1)
    lower = int(position)
    upper = min(lower + 1, len(flat) - 1)
    low = torch.kthvalue(flat, lower + 1).values
    high = torch.kthvalue(flat, upper + 1).values if upper != lower else low
    return low + (position - lower) * (high - low)
