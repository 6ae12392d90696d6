"""OOD metrics with ID as the positive class and higher score = more in-distribution (design.md §2)."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _clean(scores: np.ndarray) -> np.ndarray:
    """Float64 1-D copy with NaN mapped to -inf (a NaN score is the least in-distribution)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.where(np.isnan(scores), -np.inf, scores)


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve = P(ID score > OOD score) + 0.5 P(tie) (Mann-Whitney U)."""
    pos, neg = _clean(id_scores), _clean(ood_scores)
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, highest threshold first."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]
    tp = np.cumsum(is_pos)[last_of_tie]
    fp = np.cumsum(1 - is_pos)[last_of_tie]
    return tp, fp


def average_precision(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Average precision sum_n (R_n - R_{n-1}) P_n, treating ``pos_scores`` as the positive class."""
    tp, fp = _curve(_clean(pos_scores), _clean(neg_scores))
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD samples at or above the highest threshold that keeps ``tpr`` of ID samples."""
    tp, fp = _curve(_clean(id_scores), _clean(ood_scores))
    index = np.searchsorted(tp / tp[-1], tpr - 1e-12, side="left")
    return float(fp[index] / fp[-1])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive, negated scores) and FPR at 95% TPR."""
    id_scores, ood_scores = _clean(id_scores), _clean(ood_scores)
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError("OOD metrics need at least one ID and one OOD score")
    return {
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": average_precision(id_scores, ood_scores),
        "aupr_out": average_precision(-ood_scores, -id_scores),
        "fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95),
    }


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())
