"""Temperature scaling, ECE and the OOS scores/threshold/metrics, against hand-worked cases and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp, softmax

from lorafit import calibration, ood


def _sampled(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z / temperature): the calibrating temperature is known."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, classes))
    p = softmax(z / temperature, axis=-1)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with(true_t):
    z, y = _sampled(true_t)
    assert calibration.fit_temperature(z, y) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_lowers_ece_and_keeps_predictions():
    z, y = _sampled(2.5)  # logits 2.5x too confident
    t = calibration.fit_temperature(z, y)
    record = calibration.calibration_record(z, y, t)
    assert record["ece_after"] < 0.02 < record["ece_before"]
    assert record["nll_after"] < record["nll_before"]
    assert (softmax(z / t, -1).argmax(-1) == z.argmax(-1)).all()


def test_ece_by_hand():
    # Two bins used: 0.95 (right), 0.95 (wrong) -> bin (14/15, 1]: conf .95, acc .5; 0.55 right -> bin (8/15, 9/15]: conf .55, acc 1
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55]])
    y = np.array([0, 1, 1])
    expected = 2 / 3 * abs(0.5 - 0.95) + 1 / 3 * abs(1.0 - 0.55)
    assert calibration.expected_calibration_error(p, y) == pytest.approx(expected)
    rows = calibration.reliability_bins(p, y)
    assert sum(r["examples"] for r in rows) == 3 and len(rows) == 15


def test_energy_and_msp_scores():
    z = np.random.default_rng(1).normal(size=(7, 4))
    assert ood.logit_score("energy", z, 2.0) == pytest.approx(2.0 * logsumexp(z / 2.0, axis=-1))
    assert ood.logit_score("msp", z, 2.0) == pytest.approx(softmax(z / 2.0, axis=-1).max(-1))


def test_mahalanobis_matches_scipy_with_a_shared_covariance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 3)) @ np.array([[2, 0.3, 0], [0, 1, 0.5], [0, 0, 0.7]])
    y = rng.integers(0, 3, size=300)
    x[y == 1] += 4
    scorer = ood.fit_feature_scorer("mahalanobis", x, y)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    cov = sum((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(3)) / len(x)
    inv = np.linalg.inv(cov)
    q = rng.normal(size=(5, 3))
    expected = [-min(mahalanobis(v, means[c], inv) ** 2 for c in range(3)) for v in q]
    assert scorer.score(q) == pytest.approx(expected, rel=1e-4)


def test_knn_is_the_kth_nearest_cosine_similarity():
    rng = np.random.default_rng(3)
    bank, q = rng.normal(size=(50, 6)), rng.normal(size=(4, 6))
    scorer = ood.fit_feature_scorer("knn", bank, np.zeros(50, int), k=3)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    expected = [sorted(unit(bank) @ unit(v), reverse=True)[2] for v in q]
    assert scorer.score(q) == pytest.approx(expected)


def test_threshold_by_in_scope_recall_keeps_that_share():
    scores = np.arange(100, dtype=float)  # 0..99
    chosen = ood.choose_threshold(scores, target_recall=0.95)
    assert chosen["threshold"] == 5.0 and chosen["validation_recall"] == 0.95


def test_threshold_by_accuracy_when_validation_has_oos():
    in_scope = np.array([0.9, 0.8, 0.7, 0.3])
    oos = np.array([0.2, 0.4, 0.6])
    # t in (0.6, 0.7]: keeps 3 in-scope, rejects 3 OOS, loses one in-scope (0.3): 6/7 -- the best
    chosen = ood.choose_threshold(in_scope, oos)
    assert 0.6 < chosen["threshold"] <= 0.7
    assert chosen["validation_accuracy"] == pytest.approx(6 / 7)
    # an in-scope example classified wrong is wrong whether kept or rejected: it lowers the accuracy reached
    # but cannot move the threshold; of the tied thresholds the lowest wins (it keeps the most queries)
    chosen = ood.choose_threshold(in_scope, oos, correct=np.array([True, True, False, True]))
    assert chosen["threshold"] == 0.7 and chosen["validation_accuracy"] == pytest.approx(5 / 7)


def test_oos_metrics_by_hand():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.85])
    is_oos = np.array([False, False, False, True, True, True])
    predicted = np.array([0, 1, 1, 0, 1, 0])
    targets = np.array([0, 1, 0, -1, -1, -1])
    m = ood.oos_metrics(scores, is_oos, predicted, targets, num_classes=2, threshold=0.5)
    # pairs (in, oos) with in > oos: 0.9>{.7,.2,.85}=3, 0.8>{.7,.2}=2, 0.3>{.2}=1 -> 6 of 9
    assert m["auroc"] == pytest.approx(6 / 9)  # an OOS example ranked below an in-scope one counts
    assert m["oos_recall"] == pytest.approx(1 / 3)  # only 0.2 is rejected
    assert m["oos_precision"] == pytest.approx(1 / 2)  # rejected: 0.3 (in-scope) and 0.2 (OOS)
    assert m["in_scope_accuracy"] == pytest.approx(2 / 3)
    assert m["in_scope_accuracy_thresholded"] == pytest.approx(2 / 3)  # 0.3 was wrong anyway
    from sklearn.metrics import f1_score
    assert m["open_macro_f1"] == pytest.approx(f1_score([0, 1, 0, 2, 2, 2], [0, 1, 2, 0, 2, 0], average="macro"))
    # FPR at 95% in-scope recall: threshold = lowest in-scope score (0.3) -> OOS 0.7 and 0.85 kept: 2/3
    assert m["fpr_at_95_recall"] == pytest.approx(2 / 3)
