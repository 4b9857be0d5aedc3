"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histoscope.training import metrics as M

T3 = [0, 1, 2, 2]
P3 = [0, 2, 2, 1]


def test_accuracy_and_confusion_matrix():
    assert M.accuracy(T3, P3) == 0.5
    counts = M.confusion_matrix(T3, P3)
    np.testing.assert_array_equal(counts, [[1, 0, 0], [0, 0, 1], [0, 1, 1]])
    assert counts.dtype == np.int64
    norm = M.confusion_matrix(T3, P3, normalize="true")
    np.testing.assert_allclose(norm, [[1, 0, 0], [0, 0, 1], [0, 0.5, 0.5]])
    # a class absent from both arrays gives an empty row, not NaN
    big = M.confusion_matrix(T3, P3, n_classes=4, normalize="true")
    assert big.shape == (4, 4) and np.all(big[3] == 0)
    np.testing.assert_allclose(M.confusion_matrix(T3, P3, normalize="all").sum(), 1.0)
    np.testing.assert_allclose(M.confusion_matrix(T3, P3, normalize="pred")[:, 2], [0, 0.5, 0.5])


def test_balanced_accuracy_and_weighted_f1_on_imbalanced_labels():
    t, p = [0, 0, 0, 1], [0, 0, 0, 0]
    assert M.accuracy(t, p) == 0.75
    assert M.balanced_accuracy(t, p) == 0.5  # recalls 1 and 0
    # class 0: tp 3, support 3, predicted 4 -> F1 6/7; class 1: F1 0; weights 3/4, 1/4
    assert M.weighted_f1(t, p) == pytest.approx(0.75 * 6 / 7)
    # class 0 F1 1, class 1 F1 0, class 2 F1 2/4; weights 1, 1, 2 of 4
    assert M.weighted_f1(T3, P3) == pytest.approx(0.5)
    # balanced accuracy ignores classes only predicted, never true
    assert M.balanced_accuracy([0, 0], [0, 1]) == 0.5


def test_label_validation():
    with pytest.raises(ValueError, match="labels"):
        M.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="integer"):
        M.accuracy([0.0, 1.0], [0, 1])
    with pytest.raises(ValueError, match="exceed"):
        M.confusion_matrix([0, 3], [0, 1], n_classes=3)


def test_ece_by_hand():
    probs = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]
    labels = [0, 1, 1, 0]
    # four separate bins: |1-.9| + |0-.8| + |1-.7| + |1-.6|, over 4
    assert M.ece(probs, labels) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)
    # one bin: |accuracy 0.75 - mean confidence 0.75|
    assert M.ece(probs, labels, n_bins=1) == pytest.approx(0.0)
    # two bins: (0.5, 1] holds all four as well
    assert M.ece(probs, labels, n_bins=2) == pytest.approx(0.0)
    # 15 bins: 0.8 and 0.79 share bin (11/15, 12/15]; 0.95 alone
    assert M.ece([[0.8, 0.2], [0.21, 0.79], [0.95, 0.05]], [0, 0, 0]) == pytest.approx(
        (2 * abs(0.5 - 0.795) + abs(1 - 0.95)) / 3
    )


def test_roc_auc_with_and_without_ties():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # pos 0.5 beats 0.2 and ties 0.5 (1.5); pos 0.9 beats both (2) -> 3.5 / 4
    assert M.roc_auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert M.roc_auc([1, 1, 0], [3, 2, 1]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([1, 1], [0.2, 0.3])


def test_softmax_and_nll():
    np.testing.assert_allclose(M.softmax([[0.0, 0.0], [1000.0, 0.0]]), [[0.5, 0.5], [1, 0]])
    assert M.nll([[0.0, 0.0]], [0]) == pytest.approx(math.log(2))
    assert M.nll([[2.0, 0.0]], [1], temperature=2.0) == pytest.approx(math.log(1 + math.e))


def test_fit_temperature_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=4.0, size=(20000, 4))
    p = M.softmax(z, temperature=2.5)
    y = (p.cumsum(axis=1) > rng.random((len(z), 1))).argmax(axis=1)
    t = M.fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.06)
    # scaling the logits scales the temperature
    assert M.fit_temperature(3 * z, y) == pytest.approx(3 * t, rel=1e-3)
    # and the fit does lower the NLL
    assert M.nll(z, y, t) < M.nll(z, y, 1.0)


def test_fit_temperature_sharpens_when_everything_is_right():
    z = np.array([[1.0, 0.0], [0.0, 1.0]] * 10)
    y = np.array([0, 1] * 10)
    assert M.fit_temperature(z, y, t_min=0.05) < 0.06


def test_fit_logit_affine_recovers_a_known_platt_scaling():
    rng = np.random.default_rng(0)
    d = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 * d + 1.5)))).astype(int)
    logits = np.stack([-d / 2, d / 2], 1)  # margin d
    scale, shift = M.fit_logit_affine(logits, y)
    assert scale[0] == pytest.approx(scale[1]) and scale[0] == pytest.approx(0.5, abs=0.08)
    assert shift[1] - shift[0] == pytest.approx(1.5, abs=0.2) and shift.sum() == pytest.approx(0)
    assert M.nll(logits * scale + shift, y) < M.nll(logits, y)
    with pytest.raises(ValueError, match="every class"):
        M.fit_logit_affine(logits[y == 1], y[y == 1])


def test_wilson_interval_and_reliability_table():
    lo, hi = M.wilson(50, 50)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.9287, abs=1e-4)
    lo, hi = M.wilson(10, 20)
    assert lo == pytest.approx(0.2993, abs=1e-4) and hi == pytest.approx(0.7007, abs=1e-4)
    with pytest.raises(ValueError):
        M.wilson(3, 2)
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    y = np.array([0, 1, 0, 1])
    rows = M.reliability_table(p, y, n_bins=5)
    assert sum(r["n"] for r in rows) == 4
    ece = sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["n"]) / 4
    assert ece == pytest.approx(M.ece(p, y, n_bins=5))
