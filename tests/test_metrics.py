import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodforge.evaluation.metrics import accuracy, auroc, fpr_at_tpr, ood_metrics


def _sklearn(id_scores, ood_scores):
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(y, s),
        "aupr_out": average_precision_score(1 - y, -s),
        "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")],
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tied", [False, True])
def test_metrics_match_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    id_scores = rng.normal(1.0, 1.0, 300 + seed)
    ood_scores = rng.normal(0.0, 1.0, 200)
    if tied:  # few distinct values: many ties within and across the two sets
        id_scores, ood_scores = np.round(id_scores), np.round(ood_scores)
    ours, ref = ood_metrics(id_scores, ood_scores), _sklearn(id_scores, ood_scores)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_hand_computed_values():
    # ID {3, 2}, OOD {2, 1}: pairs (3>2, 3>1, 2=2, 2>1) -> AUROC = 3.5 / 4
    assert auroc(np.array([3.0, 2.0]), np.array([2.0, 1.0])) == 0.875
    # 20 ID scores 1..20; keeping 95% of ID (19 of 20) puts the threshold at 2.
    id_scores = np.arange(1, 21, dtype=float)
    ood_scores = np.array([0.0, 1.5, 2.0, 5.0])  # 2.0 and 5.0 are at or above the threshold
    assert fpr_at_tpr(id_scores, ood_scores) == 0.5


def test_perfect_and_nan_scores():
    m = ood_metrics(np.array([2.0, 3.0]), np.array([0.0, 1.0]))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}
    # NaN counts as the least in-distribution score
    assert auroc(np.array([1.0, np.nan]), np.array([0.0])) == 0.5


def test_accuracy():
    assert accuracy(np.array([[0.1, 0.9], [2.0, 1.0], [0.0, 1.0]]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
