"""Statistical tests for the exact-count, activation-dependent variants (Gavier):
dropact, dropinv and dropcorr, in torch and ONNX (default onnxruntime session).

Tolerances come from helpers (Z = 6 standard errors): a per-unit drop frequency over n
independent rows is a Bernoulli(P_i) rate, so it gets binom_tol(P_i, n); a torch-vs-ONNX
difference of two such rates has std sqrt(2 P_i (1 - P_i) / n).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dropcli.errors import UsageError
from dropcli.variants import get_variant
from dropcli.variants.ranked import corr_scores, drop_count
from helpers import Z, assert_close_mean, binom_tol, onnx_site, ort_session, run_onnx, torch_site

NAMES = ["dropact", "dropinv", "dropcorr"]
ROWS = 100_000


def exact_inclusion(w: np.ndarray, k: int) -> np.ndarray:
    """P(unit i is among k successive draws without replacement, P(draw j) ∝ w_j), by
    enumerating every ordered k-sequence: P(i1..ik) = prod_t w_it / (W - w_i1 - ... - w_i(t-1))."""
    w = np.asarray(w, dtype=np.float64)
    out = np.zeros(w.size)
    for seq in itertools.permutations(range(w.size), k):
        pr, rem = 1.0, w.sum()
        for i in seq:
            pr *= w[i] / rem
            rem -= w[i]
        out[list(seq)] += pr
    return out


def _torch_mc(name, x, p, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch_site(name, p=p)(torch.as_tensor(x)).numpy()


def _check_structure(x: np.ndarray, y: np.ndarray, p: float, what: str) -> None:
    """Exactly k = floor(p*D) zeros per sample (x has no zeros), kept units = x * D/(D-k)."""
    xf, yf = x.reshape(len(x), -1), y.reshape(len(y), -1)
    d = xf.shape[1]
    k = drop_count(p, d)
    assert k == math.floor(p * d + 1e-9)
    assert not np.isnan(yf).any(), f"{what}: NaN in output"
    assert ((yf == 0).sum(1) == k).all(), f"{what}: zeros per sample {np.unique((yf == 0).sum(1))}, want {k}"
    kept = yf != 0
    np.testing.assert_allclose(yf[kept], xf[kept] * (d / (d - k)), rtol=1e-6, err_msg=what)


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", NAMES)
def test_exact_k_and_scale_torch(name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4, 5)).astype(np.float32)  # D = 20, mixed signs
    for p in (0.1, 0.3, 0.55, 0.95):
        _check_structure(x, _torch_mc(name, x, p), p, f"{name} p={p}")


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_identity_and_k0_keeps_all(name):
    x = torch.randn(64, 3, 7)
    assert torch.equal(torch_site(name, mc=False, p=0.5)(x), x)
    # p*D < 1 -> k = 0: nothing dropped, scale 1
    assert torch.equal(torch_site(name, p=0.04)(x), x)


@pytest.mark.parametrize("name", NAMES)
def test_bad_params(name):
    spec = get_variant(name)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UsageError):
            spec.resolve_params({"p": bad})
    assert spec.resolve_params({"p": 0.3})["p"] == 0.3


# ---------------------------------------------------- inclusion probabilities (dropact/inv)

W = np.array([0.5, 1.0, 2.0, 3.0, 4.5], dtype=np.float32)  # D = 5


def _cases():
    # (variant, p, weights): p = 0.2 -> k = 1 (P_i = w_i / sum w); p = 0.4 -> k = 2
    for name, w in (("dropact", W), ("dropinv", 1.0 / W)):
        for p in (0.2, 0.4):
            yield name, p, w


@pytest.mark.parametrize("name,p,w", list(_cases()))
def test_inclusion_probabilities_torch(name, p, w):
    k = drop_count(p, W.size)
    expected = exact_inclusion(w, k)
    if k == 1:
        w64 = np.asarray(w, dtype=np.float64)
        np.testing.assert_allclose(expected, w64 / w64.sum(), rtol=1e-12)
    x = np.tile(W, (ROWS, 1))
    y = _torch_mc(name, x, p, seed=1)
    _check_structure(x, y, p, name)
    freq = (y == 0).mean(0)
    for i in range(W.size):
        assert abs(freq[i] - expected[i]) <= binom_tol(expected[i], ROWS), (
            f"{name} k={k} unit {i}: dropped {freq[i]:.4f}, exact {expected[i]:.4f}")


def test_exact_inclusion_enumeration_sums_to_k():
    w = np.array([0.5, 1, 2, 3, 4.5])
    for k in range(1, 5):
        assert exact_inclusion(w, k).sum() == pytest.approx(k, abs=1e-12)
    # k = 2 by hand for unit 0: P = p0 + sum_j p_j * p0 / (1 - p_j)
    pr = w / w.sum()
    assert exact_inclusion(w, 2)[0] == pytest.approx(pr[0] + sum(pr[j] * pr[0] / (1 - pr[j]) for j in range(1, 5)))


@pytest.mark.parametrize("name", ["dropact", "dropinv"])
def test_non_positive_units(name):
    # 4 positive units, k = floor(0.25 * 8) = 2: non-positive units are never dropped
    x = np.tile(np.array([3.0, -1.0, 0.5, 0.0, 2.0, -4.0, 1.0, 0.0], dtype=np.float32), (20_000, 1))
    y = _torch_mc(name, x, 0.25, seed=2)
    assert not np.isnan(y).any()
    pos = x[0] > 0
    dropped = (y == 0) & (x != 0)
    assert (dropped[:, pos].sum(1) == 2).all()
    assert not dropped[:, ~pos].any()
    # the positives still follow P ∝ w with k = 2 among themselves
    w = x[0, pos] if name == "dropact" else 1.0 / x[0, pos]
    exp = exact_inclusion(w, 2)
    freq = dropped[:, pos].mean(0)
    assert np.all(np.abs(freq - exp) <= [binom_tol(e, len(x)) for e in exp])

    # 2 positive units, k = 3: both positives always go, the third is uniform over the 4 others
    x2 = np.tile(np.array([2.0, 1.0, 0.0, -1.0, -3.0, -0.5], dtype=np.float32), (40_000, 1))
    y2 = _torch_mc(name, x2, 0.5, seed=3)
    assert not np.isnan(y2).any()
    assert (y2[:, :2] == 0).all()
    # non-positive units that were dropped: exactly one per row; unit 2 is 0 anyway, so
    # count drops of 3..5 and infer unit 2 from the total
    drops_rest = (y2[:, 3:] == 0)
    assert (drops_rest.sum(1) <= 1).all()
    freq = np.concatenate([[1.0 - drops_rest.sum(1).mean()], drops_rest.mean(0)])
    assert np.all(np.abs(freq - 0.25) <= binom_tol(0.25, len(x2))), freq
    # kept non-positive units are scaled by D/(D-k) = 2
    kept = (y2[:, 3:] != 0)
    np.testing.assert_array_equal(y2[:, 3:][kept], (x2[:, 3:] * 2.0)[kept])


# ---------------------------------------------------------------------------- dropcorr

A, B_, C = 3.0, 1.0, -2.0  # feature 0 = A*r, feature 1 = B*t + C*r (correlated with 0)
BATCH = 2000


def _corr_batch() -> np.ndarray:
    """[BATCH, 4]: r, t = +-1 patterns with mean 0 and r.t = 0 (all exact in float);
    feature 0 = A*r, feature 1 = B*t + C*r, features 2, 3 constant (zero variance, exact mean)."""
    i = np.arange(BATCH)
    r = np.where(i % 2 == 0, 1.0, -1.0)
    t = np.where((i // 2) % 2 == 0, 1.0, -1.0)
    return np.stack([A * r, B_ * t + C * r, np.full(BATCH, 0.5), np.full(BATCH, -1.5)], 1).astype(np.float32)


# S / BATCH restricted to features 0, 1 (S is 0 elsewhere)
S00, S11, S01 = A * A, B_ * B_ + C * C, A * C


def _orthant(c11: float, c22: float, c12: float) -> float:
    """P(L1 > 0, L2 > 0) for zero-mean jointly normal L1, L2: 1/4 + asin(rho)/(2 pi)."""
    return 0.25 + math.asin(c12 / math.sqrt(c11 * c22)) / (2 * math.pi)


def _corr_expected() -> np.ndarray:
    """Drop probabilities (feature 0, feature 1, either constant feature) with k = 1.

    s = (s0, s1, 0, 0) with (s0, s1) ~ N(0, S) (the constant features centre to exactly 0).
    Feature 0 is the top-1 iff L1 = s0 > 0 and L2 = s0 - s1 > 0, with Var L1 = S00,
    Var L2 = S00 + S11 - 2 S01 and Cov = S00 - S01, so P0 is the orthant probability
    1/4 + asin(rho)/(2 pi) (Sheppard). Feature 1 likewise with the roles swapped. A
    zero-score constant feature wins iff s0 < 0 and s1 < 0: the orthant probability with
    rho = S01 / sqrt(S00 S11). (BATCH scales S and cancels in rho.) A sampler that ignored
    the off-diagonal S01 would give 1/4 for the last one instead of ~0.074.
    """
    d2 = S00 + S11 - 2 * S01
    p0 = _orthant(S00, d2, S00 - S01)
    p1 = _orthant(S11, d2, S11 - S01)
    pz = _orthant(S00, S11, S01)
    assert abs(p0 + p1 + pz - 1) < 1e-12
    return np.array([p0, p1, pz])


def test_corr_scores_covariance():
    torch.manual_seed(4)
    x = torch.from_numpy(_corr_batch())
    s = torch.cat([corr_scores(x) for _ in range(10)]).double().numpy()  # 20k iid rows
    n = len(s)
    # zero-variance features: centred exactly to 0, so s = 0 exactly
    assert (s[:, 2:] == 0).all()
    s00, s11, s01 = BATCH * S00, BATCH * S11, BATCH * S01
    # u = s0/sqrt(s00), v = s1/sqrt(s11) are standard normals with correlation rho:
    # E[u^2] = 1 with std sqrt(2); E[uv] = rho with std sqrt(1 + rho^2); E[u] = 0 with std 1
    rho = s01 / math.sqrt(s00 * s11)
    u, v = s[:, 0] / math.sqrt(s00), s[:, 1] / math.sqrt(s11)
    assert_close_mean((u ** 2).mean(), 1.0, math.sqrt(2), n, "Var s0 / S00")
    assert_close_mean((v ** 2).mean(), 1.0, math.sqrt(2), n, "Var s1 / S11")
    assert_close_mean((u * v).mean(), rho, math.sqrt(1 + rho * rho), n, "Corr s0 s1")
    assert_close_mean(u.mean(), 0.0, 1.0, n, "mean s0")


def _corr_freq(ys: list[np.ndarray]) -> np.ndarray:
    y = np.concatenate(ys)
    dropped = (y == 0)
    assert (dropped.sum(1) == 1).all()
    return np.array([dropped[:, 0].mean(), dropped[:, 1].mean(), dropped[:, 2:].sum(1).mean()])


def test_dropcorr_drop_frequencies_torch():
    x = torch.from_numpy(_corr_batch())
    m = torch_site("dropcorr", p=0.25)  # D = 4 -> k = 1
    torch.manual_seed(5)
    with torch.no_grad():
        ys = [m(x).numpy() for _ in range(40)]  # 80k rows, independent given the batch
    freq = _corr_freq(ys)
    exp = _corr_expected()
    n = BATCH * len(ys)
    for i in range(3):
        assert abs(freq[i] - exp[i]) <= binom_tol(exp[i], n), f"feature group {i}: {freq[i]:.4f} vs {exp[i]:.4f}"
    _check_structure(x.numpy(), ys[0], 0.25, "dropcorr")


def test_dropcorr_degenerate_batches():
    p, d = 0.3, 10
    k = drop_count(p, d)
    m = torch_site("dropcorr", p=p)
    torch.manual_seed(6)
    # batch size 1: S = 0, no NaN, exactly k drops, the subset is uniform (each unit k/D)
    x1 = torch.arange(1, d + 1, dtype=torch.float32).reshape(1, d)
    with torch.no_grad():
        y1 = torch.cat([m(x1) for _ in range(4000)]).numpy()
    _check_structure(np.repeat(x1.numpy(), len(y1), 0), y1, p, "dropcorr batch 1")
    freq = (y1 == 0).mean(0)
    assert np.all(np.abs(freq - k / d) <= binom_tol(k / d, len(y1))), freq
    # identical rows with exactly representable values: the mean is exact, S = 0, uniform
    # (the noise z is [B, B], so use 20 batches of 2000 rather than one of 40k)
    xi = np.tile(np.arange(1, d + 1, dtype=np.float32) * 0.5, (2000, 1))
    torch.manual_seed(7)
    with torch.no_grad():
        yi = np.concatenate([m(torch.from_numpy(xi)).numpy() for _ in range(20)])
    _check_structure(np.tile(xi, (20, 1)), yi, p, "dropcorr identical rows")
    freq = (yi == 0).mean(0)
    assert np.all(np.abs(freq - k / d) <= binom_tol(k / d, len(yi))), freq
    # identical rows of arbitrary floats (the batch mean may round): still no NaN, exact k
    xr = np.tile(np.random.default_rng(8).normal(size=(1, 3, 7)).astype(np.float32), (33, 1, 1))
    _check_structure(xr, _torch_mc("dropcorr", xr, p, seed=9), p, "dropcorr identical random rows")


# ---------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("opset", [13, 18])
def test_onnx_eval_mc_and_structure(name, opset):
    p = 0.3
    x = np.random.default_rng(10).normal(size=(300, 4, 5)).astype(np.float32)
    sess = ort_session(onnx_site(name, [None, 4, 5], opset=opset, p=p))
    det = run_onnx(sess, x, mc=False)
    np.testing.assert_array_equal(det, x)
    np.testing.assert_array_equal(det, torch_site(name, mc=False, p=p)(torch.from_numpy(x)).numpy())
    a, b = run_onnx(sess, x), run_onnx(sess, x)
    assert not np.array_equal(a, b), "MC mode did not vary in a default session"
    _check_structure(x, a, p, f"onnx {name}")
    _check_structure(x, b, p, f"onnx {name}")
    # another batch size through the same graph (dynamic batch)
    _check_structure(x[:7], run_onnx(sess, x[:7]), p, f"onnx {name} batch 7")


@pytest.mark.parametrize("name,p,w", list(_cases()))
def test_onnx_inclusion_matches_exact_and_torch(name, p, w):
    k = drop_count(p, W.size)
    expected = exact_inclusion(w, k)
    x = np.tile(W, (ROWS, 1))
    y_o = run_onnx(ort_session(onnx_site(name, [None, W.size], p=p)), x)
    _check_structure(x, y_o, p, f"onnx {name}")
    y_t = _torch_mc(name, x, p, seed=11)
    f_o, f_t = (y_o == 0).mean(0), (y_t == 0).mean(0)
    for i in range(W.size):
        e = expected[i]
        assert abs(f_o[i] - e) <= binom_tol(e, ROWS), f"onnx {name} unit {i}: {f_o[i]:.4f} vs exact {e:.4f}"
        assert abs(f_o[i] - f_t[i]) <= Z * math.sqrt(2 * e * (1 - e) / ROWS), f"{name} unit {i}: onnx vs torch"


@pytest.mark.parametrize("name", ["dropact", "dropinv"])
def test_onnx_non_positive_units(name):
    x = np.tile(np.array([2.0, 1.0, 0.0, -1.0, -3.0, -0.5], dtype=np.float32), (40_000, 1))
    y = run_onnx(ort_session(onnx_site(name, [None, 6], p=0.5)), x)
    assert not np.isnan(y).any()
    assert (y[:, :2] == 0).all()
    rest = (y[:, 3:] == 0)
    assert (rest.sum(1) <= 1).all()
    freq = np.concatenate([[1.0 - rest.sum(1).mean()], rest.mean(0)])
    assert np.all(np.abs(freq - 0.25) <= binom_tol(0.25, len(x))), freq


def test_onnx_dropcorr_frequencies_and_degenerate():
    x = _corr_batch()
    sess = ort_session(onnx_site("dropcorr", [None, 4], p=0.25))
    ys = [run_onnx(sess, x) for _ in range(40)]
    freq = _corr_freq(ys)
    exp = _corr_expected()
    n = BATCH * len(ys)
    for i in range(3):
        assert abs(freq[i] - exp[i]) <= binom_tol(exp[i], n), f"onnx feature group {i}: {freq[i]:.4f} vs {exp[i]:.4f}"
    # batch of one: no NaN, exactly k, uniform subset
    p, d = 0.3, 10
    k = drop_count(p, d)
    s1 = ort_session(onnx_site("dropcorr", [None, d], p=p))
    x1 = np.arange(1, d + 1, dtype=np.float32).reshape(1, d)
    y1 = np.concatenate([run_onnx(s1, x1) for _ in range(4000)])
    _check_structure(np.repeat(x1, len(y1), 0), y1, p, "onnx dropcorr batch 1")
    f = (y1 == 0).mean(0)
    assert np.all(np.abs(f - k / d) <= binom_tol(k / d, len(y1))), f
    xi = np.tile(x1 * 0.5, (1000, 1))
    _check_structure(xi, run_onnx(s1, xi), p, "onnx dropcorr identical rows")


@pytest.mark.parametrize("name", NAMES)
def test_onnx_needs_static_units(name):
    with pytest.raises(UsageError, match="static"):
        onnx_site(name, [None, None], p=0.3)
