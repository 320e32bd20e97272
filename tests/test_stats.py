"""dropcli.analysis.stats against slow reference implementations and hand-made cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dropcli.analysis import stats


def _rand_probs(rng, T, N, K, sharp=3.0):
    z = rng.normal(size=(T, N, K)) * sharp
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_classification_matches_slow_reference():
    rng = np.random.default_rng(0)
    T, N, K = 7, 30, 4
    probs = _rand_probs(rng, T, N, K)
    got = stats.classification(probs)
    for n in range(N):
        mean = [sum(probs[t, n, k] for t in range(T)) / T for k in range(K)]
        H = -sum(m * math.log(m) for m in mean if m > 0)
        EH = sum(-sum(p * math.log(p) for p in probs[t, n] if p > 0) for t in range(T)) / T
        votes = [int(np.argmax(probs[t, n])) for t in range(T)]
        vr = 1 - max(votes.count(k) for k in range(K)) / T
        var = [sum((probs[t, n, k] - mean[k]) ** 2 for t in range(T)) / T for k in range(K)]
        assert got["entropy"][n] == pytest.approx(H, rel=1e-12)
        assert got["expected_entropy"][n] == pytest.approx(EH, rel=1e-12)
        assert got["mutual_info"][n] == pytest.approx(max(H - EH, 0), abs=1e-12)
        assert got["variation_ratio"][n] == pytest.approx(vr)
        assert got["var"][n] == pytest.approx(var, rel=1e-10, abs=1e-15)
        assert got["pred"][n] == int(np.argmax(mean))
        assert got["confidence"][n] == pytest.approx(max(mean))


def test_entropy_ge_mi_ge_zero():
    rng = np.random.default_rng(1)
    for sharp in (0.1, 1.0, 10.0):
        got = stats.classification(_rand_probs(rng, 20, 500, 10, sharp))
        assert np.all(got["mutual_info"] >= 0)
        assert np.all(got["entropy"] + 1e-12 >= got["mutual_info"])
        assert np.all(got["entropy"] <= math.log(10) + 1e-9)


def test_identical_samples_have_zero_mi_and_variance():
    p = np.tile(np.array([[[0.2, 0.3, 0.5]]]), (5, 4, 1))
    got = stats.classification(p)
    assert np.allclose(got["mutual_info"], 0) and np.allclose(got["var"], 0)
    assert np.allclose(got["variation_ratio"], 0)


def test_to_probs_softmax_and_passthrough():
    logits = np.array([[[0.0, math.log(3.0)]]])
    np.testing.assert_allclose(stats.to_probs(logits), [[[0.25, 0.75]]])
    p = np.array([[[0.1, 0.9]]])
    np.testing.assert_allclose(stats.to_probs(p), p)


def test_regression_variance_and_tau():
    s = np.array([[[1.0]], [[3.0]]])  # T=2, N=1, D=1
    r = stats.regression(s)
    assert r["mean"][0, 0] == 2.0 and r["var"][0, 0] == 1.0
    assert stats.regression(s, tau=4.0)["var"][0, 0] == pytest.approx(1.25)


def test_ece_mce_hand_made():
    # two bins used: conf 0.95 (2 examples, 1 correct) and conf 0.55 (2 examples, both correct)
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, False, True, True])
    ece, mce = stats.ece_mce(conf, correct)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.95) + 0.5 * abs(1.0 - 0.55))
    assert mce == pytest.approx(0.45)
    # perfectly calibrated: confidence 1 and always right
    assert stats.ece_mce(np.ones(10), np.ones(10, bool)) == (0.0, 0.0)


def test_nll_brier_hand_made():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    y = np.array([0, 1])
    assert stats.nll(p, y) == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    assert stats.brier(p, y) == pytest.approx(((0.25 + 0.25) + (0.81 + 0.81)) / 2)


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 5, size=60).astype(float)  # many ties
    pos = rng.random(60) < 0.4
    ref = 0.0
    P, Nn = s[pos], s[~pos]
    for a, b in itertools.product(P, Nn):
        ref += 1.0 if a > b else 0.5 if a == b else 0.0
    ref /= len(P) * len(Nn)
    assert stats.auroc(s, pos) == pytest.approx(ref)
    assert stats.auroc(np.array([0.0, 1.0]), np.array([False, True])) == 1.0


def test_risk_coverage_and_accuracy_at_coverage():
    unc = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    correct = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
    at = stats.accuracy_at_coverage(unc, correct)
    assert at["50%"] == 1.0 and at["80%"] == 1.0 and at["90%"] == pytest.approx(8 / 9) and at["95%"] == pytest.approx(0.8)
    rc = stats.risk_coverage(unc, correct)
    assert rc["coverage"][-1] == 1.0 and rc["accuracy"][-1] == pytest.approx(0.8)


def test_fpr95():
    id_u = np.linspace(0, 1, 101)  # 95% quantile ~0.95
    ood_u = np.array([0.5, 0.99, 2.0, 3.0])
    assert stats.fpr_at_95_tpr(id_u, ood_u) == pytest.approx(0.25)


def test_summary_with_labels_eval_and_ood():
    rng = np.random.default_rng(3)
    probs = _rand_probs(rng, 10, 200, 5)
    per = stats.classification(probs)
    y = rng.integers(0, 5, 200)
    ood = stats.classification(_rand_probs(rng, 10, 50, 5, sharp=0.3))
    s = stats.summary(per, y, eval_probs=probs[0], ood_per=ood)
    assert set(s["accuracy_at_coverage"]) == {"50%", "80%", "90%", "95%"}
    assert 0 <= s["mc"]["ece"] <= 1 and s["eval"]["accuracy"] >= 0
    assert s["ood"]["entropy"]["auroc"] > 0.5  # flatter OOD predictions have higher entropy
