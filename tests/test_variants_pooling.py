"""Pooling dropout (Wu & Gu 2015): maxpool-dropout and avgpool-dropout, in torch and ONNX
(default onnxruntime sessions).

- The test rules are compared with an independent numpy reference (explicit loops over the
  windows, padding taps excluded), exactly enough for float32 (1e-6), for 1d/2d/3d pooling
  with padding, ceil mode, dilation and overlapping windows, and torch against ONNX.
- MC mode is checked statistically over many independent rows (tolerances from
  tests/helpers.py, 6 standard errors): the rate at which a window outputs its max (q), at
  which it outputs 0 (p^n), the structure (an output is 0 or one of its window's values),
  and that the mean over draws is the test rule (probabilistic weighted pooling is the exact
  expectation of the MC rule) with the variance the rule implies.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from onnx import helper
from torch import nn

from dropcli.errors import UsageError
from dropcli.model.pooling import pool_windows
from dropcli.variants import get_variant
from helpers import assert_moments_match, binom_tol, onnx_layer_model, onnx_replace, ort_session, repeat_rows, run_onnx, torch_layer_site


# ----------------------------------------------------------------------------- references
def _windows_ref(x: np.ndarray, k, s, pb, pe, d, ceil):
    """For each output position, the list of REAL input values of its window (numpy loops).
    The output size comes from torch's own MaxPool (not from dropcli's window code)."""
    nd = len(k)
    sizes = x.shape[2:]
    if list(pb) == list(pe):
        pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[nd](k, s, pb, d, ceil_mode=ceil)
        out_sizes = pool(torch.zeros((1, 1) + tuple(sizes))).shape[2:]
    else:  # asymmetric (ONNX) pads: floor mode only
        assert not ceil
        out_sizes = [(sizes[i] + pb[i] + pe[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    res = {}
    for o in itertools.product(*[range(n) for n in out_sizes]):
        taps = []
        for j in itertools.product(*[range(kk) for kk in k]):
            c = [o[i] * s[i] - pb[i] + j[i] * d[i] for i in range(nd)]
            if all(0 <= c[i] < sizes[i] for i in range(nd)):
                taps.append(tuple(c))
        res[o] = taps
    return res, tuple(out_sizes)


def weighted_pool_ref(x: np.ndarray, p: float, k, s, pb, pe, d, ceil) -> np.ndarray:
    """Sort each window ascending a_1 <= ... <= a_n and sum q * p^(n-i) * a_i (float64)."""
    q = 1 - p
    wins, out_sizes = _windows_ref(x, k, s, pb, pe, d, ceil)
    y = np.zeros(x.shape[:2] + out_sizes)
    for o, taps in wins.items():
        vals = np.stack([x[(slice(None), slice(None)) + t] for t in taps], -1).astype(np.float64)
        a = np.sort(vals, -1)
        n = a.shape[-1]
        w = np.array([q * p ** (n - i) for i in range(1, n + 1)])
        y[(slice(None), slice(None)) + o] = (a * w).sum(-1)
    return y


CONFIGS = [  # (kernel, stride, padding, dilation, ceil_mode)
    ([2, 2], [2, 2], [0, 0], [1, 1], False),
    ([3, 3], [2, 2], [1, 1], [1, 1], True),
    ([3, 2], [1, 1], [1, 0], [1, 1], False),  # overlapping windows
    ([2, 2], [2, 2], [1, 1], [2, 2], False),  # dilation
    ([3], [2], [1], [1], True),  # 1d
    ([2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1], False),  # 3d
]


def _torch_pool(k, s, pad, d, ceil):
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[len(k)](k, s, pad, d, ceil_mode=ceil)


def _onnx_pool_model(op, k, s, pb, pe, d, ceil, x_shape, extra=None):
    attrs = dict(kernel_shape=k, strides=s, pads=list(pb) + list(pe), ceil_mode=int(ceil))
    if op == "MaxPool":
        attrs["dilations"] = d
    attrs.update(extra or {})
    node = helper.make_node(op, ["x"], ["y"], name="pool", **attrs)
    return onnx_layer_model([node], x_shape, None)


def _spatial(k, n=7):
    return {1: (13,), 2: (9, 11), 3: (6, 5, 7)}[len(k)]


# ----------------------------------------------------------------------------- test rule
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"k{c[0]}s{c[1]}p{c[2]}d{c[3]}{'c' if c[4] else ''}")
@pytest.mark.parametrize("p", [0.3, 0.5])
def test_maxpool_dropout_test_rule_torch_and_onnx(cfg, p):
    k, s, pad, d, ceil = cfg
    sizes = _spatial(k)
    x = np.random.default_rng(0).normal(size=(3, 4) + sizes).astype(np.float32)
    ref = weighted_pool_ref(x, p, k, s, pad, pad, d, ceil)
    site = torch_layer_site("maxpool-dropout", _torch_pool(k, s, pad, d, ceil), mc=False, p=p)
    with torch.no_grad():
        yt = site(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(yt, ref, rtol=1e-5, atol=1e-6)
    sess = ort_session(onnx_replace(_onnx_pool_model("MaxPool", k, s, pad, pad, d, ceil, (None, 4) + sizes),
                                    "maxpool-dropout", p=p))
    yo = run_onnx(sess, x, mc=False)
    np.testing.assert_allclose(yo, yt, rtol=1e-6, atol=1e-6)
    # p = 0 gives back the max pool; q*max is NOT the rule (the weaker baseline)
    site0 = torch_layer_site("maxpool-dropout", _torch_pool(k, s, pad, d, ceil), mc=False, p=0.0)
    with torch.no_grad():
        mx = _torch_pool(k, s, pad, d, ceil)(torch.from_numpy(x))
        assert torch.equal(site0(torch.from_numpy(x)), mx)
    assert np.abs(yt - (1 - p) * mx.numpy()).max() > 1e-2


def test_maxpool_dropout_onnx_asymmetric_and_same_padding():
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 10)).astype(np.float32)
    p = 0.4
    # explicit asymmetric pads
    m = _onnx_pool_model("MaxPool", [3, 3], [2, 2], [0, 1], [2, 1], [1, 1], False, (None, 3, 9, 10))
    yo = run_onnx(ort_session(onnx_replace(m, "maxpool-dropout", p=p)), x, mc=False)
    np.testing.assert_allclose(yo, weighted_pool_ref(x, p, [3, 3], [2, 2], [0, 1], [2, 1], [1, 1], False), rtol=1e-5, atol=1e-6)
    # auto_pad SAME_UPPER: total pad split with the extra at the end
    node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    m2 = onnx_layer_model([node], (None, 3, 9, 10), None)
    orig = ort_session(m2).run(None, {"x": x})[0]
    yo2 = run_onnx(ort_session(onnx_replace(m2, "maxpool-dropout", p=p)), x, mc=False)
    ref2 = weighted_pool_ref(x, p, [2, 3], [2, 2], [0, 0], [1, 1], [1, 1], False)
    assert yo2.shape == orig.shape
    np.testing.assert_allclose(yo2, ref2, rtol=1e-5, atol=1e-6)


def test_pool_windows_match_torch_output_sizes():
    rng = np.random.default_rng(2)
    for _ in range(200):
        nd = int(rng.integers(1, 4))
        k = [int(v) for v in rng.integers(1, 4, nd)]
        s = [int(v) for v in rng.integers(1, 4, nd)]
        pad = [int(rng.integers(0, kk // 2 + 1)) for kk in k]
        d = [int(v) for v in rng.integers(1, 3, nd)]
        sizes = [int(v) for v in rng.integers(max(k) * max(d), 12, nd)]
        ceil = bool(rng.integers(0, 2))
        want = _torch_pool(k, s, pad, d, ceil)(torch.zeros([1, 1] + sizes)).shape[2:]
        win = pool_windows(sizes, k, s, pad, pad, d, ceil)
        assert win.out_sizes == tuple(want), (k, s, pad, d, sizes, ceil)
        assert win.index.max() < np.prod(win.padded_sizes)


# ----------------------------------------------------------------------------- MC rule
def _check_maxpool_mc(x: np.ndarray, y: np.ndarray, p: float, what: str) -> None:
    """x: [B, C, H, W] positive with distinct values, 2x2/stride-2 windows (n = 4)."""
    q = 1 - p
    B, C, H, W = x.shape
    win = x.reshape(B, C, H // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(B, C, H // 2, W // 2, 4)
    is_member = (win == y[..., None]).any(-1)
    assert ((y == 0) | is_member).all(), f"{what}: an output is neither 0 nor a value of its window"
    n = y.size
    rate_max = float((y == win.max(-1)).mean())
    assert abs(rate_max - q) <= binom_tol(q, n), f"{what}: the max survives at {rate_max:.4f}, expected q = {q}"
    rate_zero = float((y == 0).mean())
    assert abs(rate_zero - p ** 4) <= binom_tol(p ** 4, n), f"{what}: all-dropped windows {rate_zero:.4f}, expected p^4 = {p ** 4:.4f}"
    # the k-th largest is the output with probability q p^(k-1)
    ranks = np.argsort(-win, -1)
    for j in range(4):
        kth = np.take_along_axis(win, ranks[..., j:j + 1], -1)[..., 0]
        r = float((y == kth).mean())
        assert abs(r - q * p ** j) <= binom_tol(q * p ** j, n), f"{what}: rank {j + 1} output at {r:.4f}, expected {q * p ** j:.4f}"


def _positive_distinct(shape, seed):
    n = int(np.prod(shape))
    return (np.random.default_rng(seed).permutation(n).reshape(shape).astype(np.float32) / n + 0.5)


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_maxpool_dropout_mc_torch_and_onnx(p):
    x = _positive_distinct((256, 16, 8, 8), 3)
    site = torch_layer_site("maxpool-dropout", nn.MaxPool2d(2), p=p)
    torch.manual_seed(0)
    with torch.no_grad():
        yt = site(torch.from_numpy(x)).numpy()
    _check_maxpool_mc(x, yt, p, "torch")
    sess = ort_session(onnx_replace(_onnx_pool_model("MaxPool", [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False, (None, 16, 8, 8)),
                                    "maxpool-dropout", p=p))
    yo = run_onnx(sess, x)
    assert not np.array_equal(yo, run_onnx(sess, x)), "ONNX MC mode does not vary in a default session"
    _check_maxpool_mc(x, yo, p, "onnx")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_maxpool_dropout_mc_mean_is_the_test_rule(backend):
    """Probabilistic weighted pooling is E[MC output]: the mean over R independent rows of
    each example agrees with the test rule within 6 standard errors per output, and the
    variance with sum_i w_i a_i^2 - E^2, for signed inputs and padded, overlapping windows."""
    p, R = 0.4, 4000
    k, s, pad, d, ceil = [3, 3], [2, 2], [1, 1], [1, 1], True
    x = np.random.default_rng(4).normal(size=(3, 2, 5, 6)).astype(np.float32)
    xr = repeat_rows(x, R)
    if backend == "torch":
        site = torch_layer_site("maxpool-dropout", _torch_pool(k, s, pad, d, ceil), p=p)
        torch.manual_seed(1)
        with torch.no_grad():
            y = site(torch.from_numpy(xr)).numpy()
    else:
        m = _onnx_pool_model("MaxPool", k, s, pad, pad, d, ceil, (None, 2, 5, 6))
        y = run_onnx(ort_session(onnx_replace(m, "maxpool-dropout", p=p)), xr)
    y = y.reshape((R,) + x.shape[:2] + y.shape[2:]).astype(np.float64)
    mean = weighted_pool_ref(x, p, k, s, pad, pad, d, ceil)
    # E[y^2]: the same weights on the squared values of the window sorted by value
    wins, _ = _windows_ref(x, k, s, pad, pad, d, ceil)
    second = np.zeros_like(mean)
    for o, taps in wins.items():
        vals = np.sort(np.stack([x[(slice(None), slice(None)) + t] for t in taps], -1).astype(np.float64), -1)
        n = vals.shape[-1]
        w = np.array([(1 - p) * p ** (n - i) for i in range(1, n + 1)])
        second[(slice(None), slice(None)) + o] = (vals ** 2 * w).sum(-1)
    var = second - mean ** 2
    assert_moments_match(y, mean, var, f"{backend}: the weighted-pooling rule", z=6.0)


def test_maxpool_dropout_masks_are_per_row():
    """Each row (example) draws its own mask: identical rows give independent outputs."""
    x = _positive_distinct((1, 8, 8, 8), 5)
    xr = repeat_rows(x, 2000)
    site = torch_layer_site("maxpool-dropout", nn.MaxPool2d(2), p=0.5)
    torch.manual_seed(2)
    with torch.no_grad():
        y = site(torch.from_numpy(xr)).numpy().reshape(2000, -1)
    same = float((y[::2] == y[1::2]).all(1).mean())
    assert same == 0.0, "rows share their masks"
    # two independent rows agree on an output iff they pick the same rank (or both 0):
    # sum_k P(rank k)^2 + P(0)^2 at p = 1/2; windows do not overlap, so outputs are independent
    agree = float((y[::2] == y[1::2]).mean())
    probs = [0.5 * 0.5 ** j for j in range(4)] + [0.5 ** 4]
    expect = sum(v * v for v in probs)
    assert abs(agree - expect) <= binom_tol(expect, y[::2].size)


# ----------------------------------------------------------------------------- avgpool-dropout
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_avgpool_dropout_moments_and_keep_rate(backend):
    p, R = 0.3, 3000
    q = 1 - p
    x = np.random.default_rng(6).normal(size=(2, 3, 8, 8)).astype(np.float32)
    xr = repeat_rows(x, R)
    if backend == "torch":
        site = torch_layer_site("avgpool-dropout", nn.AvgPool2d(2), p=p)
        torch.manual_seed(3)
        with torch.no_grad():
            y = site(torch.from_numpy(xr)).numpy()
    else:
        m = _onnx_pool_model("AveragePool", [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False, (None, 3, 8, 8))
        sess = ort_session(onnx_replace(m, "avgpool-dropout", p=p))
        y = run_onnx(sess, xr)
        np.testing.assert_array_equal(run_onnx(sess, x, mc=False), ort_session(m).run(None, {"x": x})[0])
    y = y.reshape((R,) + x.shape[:2] + (4, 4)).astype(np.float64)
    win = x.reshape(2, 3, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 4, 4, 4).astype(np.float64)
    mean = win.mean(-1)  # the 1/q scaling makes the average unbiased
    var = (p / q) * (win ** 2).sum(-1) / 16.0
    z = np.abs(y.mean(0) - mean) / np.sqrt(var / R)
    assert z.max() <= 6.0, f"{backend}: E[avgpool-dropout] != avgpool (max z {z.max():.2f})"
    c = y - y.mean(0)
    se_v = np.sqrt(np.maximum((c ** 4).mean(0) - c.var(0) ** 2, 1e-30) / R)
    assert (np.abs(y.var(0) - var) / se_v).max() <= 6.0, f"{backend}: variance is not (p/q) sum a^2 / n^2"
    # keep rate: one-hot windows give 0 or 1/(n q)
    one = np.zeros((400, 3, 8, 8), dtype=np.float32)
    one[:, :, ::2, ::2] = 1.0
    if backend == "torch":
        with torch.no_grad():
            yo = site(torch.from_numpy(one)).numpy()
    else:
        yo = run_onnx(sess, one)
    target = np.float32(1 / (4 * q))
    assert np.all((yo == 0) | np.isclose(yo, target, rtol=1e-6)), np.unique(yo)
    rate = float((yo > 0).mean())
    assert abs(rate - q) <= binom_tol(q, yo.size)


def test_avgpool_dropout_keeps_every_pool_attribute_and_inference_is_the_pool():
    x = torch.randn(4, 3, 9, 11)
    for pool in (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), nn.AvgPool2d((2, 3), (1, 2), (1, 1), divisor_override=5),
                 nn.AdaptiveAvgPool2d((2, 3)), nn.AvgPool1d(3, 2, 1)):
        xin = x[:, :, 0] if isinstance(pool, nn.AvgPool1d) else x
        site = torch_layer_site("avgpool-dropout", pool, mc=False, p=0.4)
        assert torch.equal(site(xin), pool(xin)), pool
        site.set_mc(True)
        assert site(xin).shape == pool(xin).shape


def test_pooling_dropout_bad_params_and_layers():
    with pytest.raises(UsageError, match="--p"):
        get_variant("maxpool-dropout").resolve_params({"p": 1.0})
    with pytest.raises(UsageError, match="max-pooling"):
        torch_layer_site("maxpool-dropout", nn.AvgPool2d(2))
    with pytest.raises(UsageError, match="average-pooling"):
        torch_layer_site("avgpool-dropout", nn.MaxPool2d(2))
    with pytest.raises(UsageError, match="not a layer"):
        torch_layer_site("maxpool-dropout", nn.MaxPool2d(2, return_indices=True))
    # ONNX: the weighted pooling needs static spatial sizes
    m = _onnx_pool_model("MaxPool", [2, 2], [2, 2], [0, 0], [0, 0], [1, 1], False, (None, 3, None, 8))
    with pytest.raises(UsageError, match="static"):
        onnx_replace(m, "maxpool-dropout", p=0.3)
