"""Statistical and exact tests for dropblock, cutout and maxdrop, in torch and ONNX (default
onnxruntime session).

Tolerances come from helpers (Z = 6 standard errors), always over independent draws:
- dropblock: masks of different (sample, channel) maps are independent, so the mean of the
  per-map dropped fraction over n maps gets tol(sample std, n); units inside one map are
  correlated (blocks), so they are never treated as independent draws;
- cutout: samples are independent; a pixel's zero frequency over N samples is a
  Bernoulli(P_ij) rate (binom_tol), and the per-sample zeroed fraction has an exactly
  enumerable variance for one hole;
- maxdrop is deterministic and is compared exactly with a numpy reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from dropcli.errors import UsageError
from dropcli.variants import get_variant
from dropcli.variants.blocks import dropblock_gamma
from helpers import assert_close_mean, assert_same_distribution, binom_tol, onnx_site, ort_session, run_onnx, torch_site


def _torch_mc(name, x, seed=0, **params):
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch_site(name, **params)(torch.as_tensor(x)).numpy()


def _positive(shape, seed):
    """Strictly positive inputs, so an output zero means a dropped unit."""
    return (np.random.default_rng(seed).random(shape) + 0.5).astype(np.float32)


# =========================================================================== dropblock


def _cover_1d(n: int, b: int) -> np.ndarray:
    """For each index i, how many valid block starts r in [0, n-b] have r <= i <= r+b-1."""
    i = np.arange(n)
    return np.minimum(i, n - b) - np.maximum(0, i - b + 1) + 1


def dropblock_expected_fraction(p: float, b: int, h: int, w: int) -> float:
    """Exact E[dropped fraction]: pixel (i, j) survives iff none of its c(i, j) covering
    seeds fires, so it is dropped with probability 1 - (1 - gamma)^c(i, j)."""
    g = dropblock_gamma(p, b, h, w)
    c = np.outer(_cover_1d(h, b), _cover_1d(w, b))
    return float((1.0 - (1.0 - g) ** c).mean())


def _union_of_full_blocks(dropped: np.ndarray, b: int) -> np.ndarray:
    """Per map ([..., H, W] bool): is the dropped set exactly a union of b x b squares lying
    fully inside the map? (Morphological opening: the union of all fully-dropped valid
    blocks must give back the dropped set.)"""
    lead = dropped.shape[:-2]
    full = sliding_window_view(dropped, (b, b), axis=(-2, -1)).all(axis=(-2, -1))  # [..., H-b+1, W-b+1]
    pad = [(0, 0)] * len(lead) + [(b - 1, b - 1), (b - 1, b - 1)]
    grown = sliding_window_view(np.pad(full, pad), (b, b), axis=(-2, -1)).any(axis=(-2, -1))  # [..., H, W]
    return (grown == dropped).all(axis=(-2, -1))


def _check_dropblock(x: np.ndarray, y: np.ndarray, p: float, b: int, what: str) -> np.ndarray:
    """Structure, per-sample scaling and the exact expected drop fraction; returns per-map fractions."""
    n, c, h, w = x.shape
    assert not np.isnan(y).any(), f"{what}: NaN"
    dropped = y == 0
    assert _union_of_full_blocks(dropped, b).all(), f"{what}: dropped regions are not unions of full {b}x{b} blocks"
    # per-sample scaling: kept units are x * numel/kept, numel and kept counted in that sample only
    kept = (~dropped).reshape(n, -1).sum(1)
    scale = (np.float32(c * h * w) / np.maximum(kept, 1).astype(np.float32)).reshape(n, 1, 1, 1)
    np.testing.assert_allclose(np.where(dropped, 0, y), np.where(dropped, 0, x * scale), rtol=1e-6, err_msg=what)
    live = kept > 0
    np.testing.assert_allclose(((~dropped).reshape(n, -1) * scale.reshape(n, 1)).sum(1)[live], c * h * w, rtol=1e-5)
    frac = dropped.reshape(n * c, h * w).mean(1)
    expected = dropblock_expected_fraction(p, b, h, w)
    assert_close_mean(frac.mean(), expected, frac.std(ddof=1), frac.size, f"{what} drop fraction")
    return frac


@pytest.mark.parametrize("p,b,h,w", [(0.1, 7, 24, 24), (0.3, 4, 16, 20), (0.5, 3, 9, 11), (0.2, 1, 12, 12)])
def test_dropblock_torch_fraction_blocks_and_scaling(p, b, h, w):
    x = _positive((64, 32, h, w), 0)
    y = _torch_mc("dropblock", x, p=p, block_size=b)
    _check_dropblock(x, y, p, b, f"torch dropblock p={p} b={b}")


def test_dropblock_single_seed_maps_are_all_or_nothing():
    """H = W = b: one valid seed position, gamma = p, so each map is dropped whole with prob p;
    with C = 1 a dropped sample outputs zeros (sum(M) = 0), never NaN, and kept ones are x."""
    p, b = 0.4, 5
    assert dropblock_gamma(p, b, b, b) == pytest.approx(p)
    x = _positive((20_000, 1, b, b), 1)
    y = _torch_mc("dropblock", x, p=p, block_size=b)
    z = (y == 0).reshape(len(x), -1)
    whole = z.all(1)
    assert (whole | ~z.any(1)).all(), "a map was partly dropped"
    assert abs(whole.mean() - p) <= binom_tol(p, len(x))
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[~whole], x[~whole])
    # C = 2: a sample with one map dropped scales the other by 2
    x2 = _positive((20_000, 2, b, b), 2)
    y2 = _torch_mc("dropblock", x2, p=p, block_size=b)
    one = (y2 == 0).reshape(len(x2), 2, -1).all(2).sum(1) == 1
    assert abs(one.mean() - 2 * p * (1 - p)) <= binom_tol(2 * p * (1 - p), len(x2))
    kept = y2[one] != 0
    np.testing.assert_allclose(y2[one][kept], 2 * x2[one][kept], rtol=1e-6)


def test_dropblock_eval_identity_and_p0():
    x = torch.randn(8, 4, 12, 12)
    assert torch.equal(torch_site("dropblock", mc=False, p=0.5, block_size=3)(x), x)
    assert torch.equal(torch_site("dropblock", p=0.0, block_size=3)(x), x)


def test_dropblock_block_larger_than_map():
    with pytest.raises(UsageError, match="block-size 5"):
        torch_site("dropblock", p=0.2, block_size=5)(torch.rand(2, 3, 4, 8))
    with pytest.raises(UsageError, match="block-size 9"):
        onnx_site("dropblock", [None, 3, 16, 8], p=0.2, block_size=9)
    # dynamic spatial sizes: the site is built; no block fits a map smaller than it, so nothing is dropped
    sess = ort_session(onnx_site("dropblock", [None, 3, None, None], p=0.2, block_size=5))
    x = np.ones((2, 3, 4, 8), np.float32)
    np.testing.assert_array_equal(run_onnx(sess, x), x)


@pytest.mark.parametrize("opset", [13, 18])
def test_dropblock_onnx_dynamic_spatial_sizes(opset):
    """H and W dynamic in the graph: gamma and the valid seed region come from Shape(x) at run
    time, so one site gives the exact expected drop fraction at every map size."""
    p, b = 0.3, 3
    sess = ort_session(onnx_site("dropblock", [None, 8, None, None], opset=opset, p=p, block_size=b))
    for k, (h, w) in enumerate([(16, 20), (9, 11), (3, 7)]):
        x = _positive((48, 8, h, w), 10 + k)
        np.testing.assert_array_equal(run_onnx(sess, x, mc=False), x)
        _check_dropblock(x, run_onnx(sess, x), p, b, f"onnx dropblock dynamic {h}x{w}")


class _Wrap(torch.nn.Module):
    def __init__(self, site):
        super().__init__()
        self.site = site

    def forward(self, x):
        return self.site(x)


@pytest.mark.parametrize("capture", ["export", "trace"])
def test_dropblock_torch_dynamic_spatial_sizes(capture):
    """The torch site captured with a dynamic H and W (torch.export with symbolic sizes, or a
    TorchScript trace) reads the size when it runs: one captured program gives the exact
    expected drop fraction, full blocks and per-sample scaling at every map size."""
    p, b = 0.3, 3
    torch.manual_seed(0)
    m = _Wrap(torch_site("dropblock", p=p, block_size=b)).eval()
    ex = torch.rand(2, 8, 12, 12) + 0.5
    if capture == "export":
        h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
        prog = torch.export.export(m, (ex,), dynamic_shapes=({0: torch.export.Dim("n"), 2: h, 3: w},)).module()
    else:
        prog = torch.jit.trace(m, (ex,), check_trace=False)
    for k, (h, w) in enumerate([(16, 20), (9, 11), (3, 7)]):
        x = _positive((48, 8, h, w), 20 + k)
        with torch.no_grad():
            y = prog(torch.from_numpy(x)).numpy()
        _check_dropblock(x, y, p, b, f"torch dropblock {capture} dynamic {h}x{w}")
    x = _positive((4, 8, 2, 7), 29)  # no 3x3 block fits: no seed, the map is left as it is
    with torch.no_grad():
        np.testing.assert_array_equal(prog(torch.from_numpy(x)).numpy(), x)


def test_dropblock_written_pt2_keeps_dynamic_sizes(tmp_path):
    """A .pt2 with a dynamic H and W, dropblock injected and written back: the output keeps the
    sizes dynamic (equal to the original in inference mode at a size other than the export's), and
    its MC samples are dropblock at that size."""
    import dropcli
    from dropcli.engines.factory import inject_on_the_fly, make_runner

    p, b = 0.3, 3
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU()).eval()
    with torch.no_grad():  # the identity on positive inputs: the output is the site's
        net[0].weight.copy_(torch.eye(8).reshape(8, 8, 1, 1))
        net[0].bias.zero_()
    d = torch.export.Dim
    ep = torch.export.export(net, (torch.rand(2, 8, 12, 12),),
                             dynamic_shapes=({0: d("n"), 2: d("h", min=b, max=64), 3: d("w", min=b, max=64)},))
    src, out = tmp_path / "net.pt2", tmp_path / "net_db.pt2"
    torch.export.save(ep, str(src))
    m = dropcli.load(str(src))
    inject_on_the_fly(m, "dropblock", p=p, layers=["0"], allow_output=True)
    dropcli.save(m, str(out))
    x = _positive((48, 8, 16, 20), 30)
    got = dropcli.load(str(out))
    runner = make_runner(got, "cpu")
    np.testing.assert_array_equal(runner.run_eval([x]), x)
    y = runner.run([x], list(range(len(x))), seed=0, T=1)[:, 0]
    _check_dropblock(x, y, p, b, "dropblock in a written .pt2 at 16x20")


def test_dropblock_bad_params_and_rank():
    spec = get_variant("dropblock")
    assert spec.resolve_params({})["block_size"] == 7
    for bad in ({"p": 1.0}, {"block_size": 0}, {"block_size": -2}, {"holes": 2}):
        with pytest.raises(UsageError):
            spec.resolve_params(bad)
    spec.check_rank(4, "x")
    for r in (2, 3, 5):
        with pytest.raises(UsageError):
            spec.check_rank(r, "x")


@pytest.mark.parametrize("opset", [13, 18])
def test_dropblock_onnx_matches_torch(opset):
    p, b, c, h, w = 0.25, 4, 32, 16, 20
    x = _positive((64, c, h, w), 3)
    sess = ort_session(onnx_site("dropblock", [None, c, h, w], opset=opset, p=p, block_size=b))
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False), torch_site("dropblock", mc=False, p=p, block_size=b)(torch.from_numpy(x)).numpy())
    a, a2 = run_onnx(sess, x), run_onnx(sess, x)
    assert not np.array_equal(a, a2), "ONNX MC mode does not vary in a default session"
    fo = _check_dropblock(x, a, p, b, "onnx dropblock")
    t = _torch_mc("dropblock", x, p=p, block_size=b)
    ft = _check_dropblock(x, t, p, b, "torch dropblock")
    # per-map drop fractions are independent draws (maps have independent seeds)
    assert_same_distribution(fo, ft, "dropblock per-map drop fraction torch vs onnx")
    # per-sample scale factors numel/sum(M): independent across samples
    big = _positive((400, c, h, w), 4)
    so = (run_onnx(sess, big).reshape(400, -1) / big.reshape(400, -1)).max(1)
    st = (_torch_mc("dropblock", big, p=p, block_size=b).reshape(400, -1) / big.reshape(400, -1)).max(1)
    assert_same_distribution(so, st, "dropblock per-sample scale torch vs onnx")
    # batch size 1 and a different batch size work with the dynamic batch dim
    assert run_onnx(sess, x[:1]).shape == (1, c, h, w)


# =========================================================================== cutout


def _cutout_spans(n: int, size: int) -> list[tuple[int, int]]:
    """(first, last) covered index for each centre 0..n-1, clipped to [0, n-1]."""
    half = size // 2
    return [(max(0, cy - half), min(n - 1, cy - half + size - 1)) for cy in range(n)]


def cutout_pixel_prob(h: int, w: int, size: int, holes: int) -> np.ndarray:
    """Exact P(pixel zeroed), enumerating all centres; the holes' centres are independent."""
    pr = np.zeros(h)
    for lo, hi in _cutout_spans(h, size):
        pr[lo:hi + 1] += 1.0 / h
    pc = np.zeros(w)
    for lo, hi in _cutout_spans(w, size):
        pc[lo:hi + 1] += 1.0 / w
    one = np.outer(pr, pc)
    return 1.0 - (1.0 - one) ** holes


def cutout_one_hole_moments(h: int, w: int, size: int) -> tuple[float, float]:
    """Mean and std of the zeroed fraction with one hole, over all H*W centres."""
    lr = np.array([hi - lo + 1 for lo, hi in _cutout_spans(h, size)], dtype=np.float64)
    lc = np.array([hi - lo + 1 for lo, hi in _cutout_spans(w, size)], dtype=np.float64)
    area = np.outer(lr, lc).ravel() / (h * w)
    return float(area.mean()), float(area.std())


def _check_cutout(x: np.ndarray, y: np.ndarray, size: int, holes: int, what: str) -> np.ndarray:
    """Channels share the hole, other pixels unchanged, per-pixel rates and (1 hole) exact
    rectangles; returns the per-sample zeroed fraction."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    z = y == 0
    if x.ndim == 4:
        assert (z == z[:, :1]).all(), f"{what}: channels do not share the holes"
        z = z[:, 0]
    np.testing.assert_array_equal(y[y != 0], x[y != 0], err_msg=f"{what}: kept pixels changed (no rescaling)")
    prob = cutout_pixel_prob(h, w, size, holes)
    rate = z.mean(0)
    dev = np.abs(rate - prob)
    lim = np.vectorize(lambda r: binom_tol(r, n))(prob)
    assert (dev <= lim).all(), f"{what}: per-pixel zero rate off by {dev.max():.4g} (limit {lim[dev.argmax() // w, dev.argmax() % w]:.3g})"
    frac = z.reshape(n, -1).mean(1)
    if holes == 1:
        rows, cols = z.any(2), z.any(1)
        assert (z == (rows[:, :, None] & cols[:, None, :])).all(), f"{what}: the zero set is not a rectangle"
        for any_, size_n, span_what in ((rows, h, "rows"), (cols, w, "cols")):
            first = any_.argmax(1)
            last = size_n - 1 - any_[:, ::-1].argmax(1)
            assert (any_.sum(1) == last - first + 1).all(), f"{what}: {span_what} not contiguous"
            allowed = np.zeros((size_n, size_n), bool)
            for lo, hi in _cutout_spans(size_n, size):
                allowed[lo, hi] = True
            assert allowed[first, last].all(), f"{what}: a hole's {span_what} are not a clipped L-span of any centre"
            # clipping really happens at both borders (a hole near the edge is cut short)
            assert ((first == 0) & (last - first + 1 < size)).any() and ((last == size_n - 1) & (last - first + 1 < size)).any()
        mean, std = cutout_one_hole_moments(h, w, size)
        assert mean == pytest.approx(prob.mean())
        assert_close_mean(frac.mean(), mean, std, n, f"{what} zeroed fraction")
    else:
        assert_close_mean(frac.mean(), prob.mean(), frac.std(ddof=1), n, f"{what} zeroed fraction")
    return frac


@pytest.mark.parametrize("size,holes,h,w", [(8, 1, 20, 24), (7, 1, 16, 16), (6, 3, 20, 24)])
def test_cutout_torch(size, holes, h, w):
    x = _positive((20_000, 2, h, w), 5)
    y = _torch_mc("cutout", x, hole_size=size, holes=holes)
    _check_cutout(x, y, size, holes, f"torch cutout L={size} holes={holes}")


def test_cutout_torch_rank3_and_eval_identity():
    x = _positive((20_000, 16, 12), 6)
    y = _torch_mc("cutout", x, hole_size=5)
    _check_cutout(x, y, 5, 1, "torch cutout rank 3")
    xt = torch.from_numpy(x)
    assert torch.equal(torch_site("cutout", mc=False, hole_size=5)(xt), xt)
    # a hole larger than the image zeroes everything
    assert (_torch_mc("cutout", x[:10], hole_size=40) == 0).all()


def test_cutout_bad_params_and_rank():
    spec = get_variant("cutout")
    assert spec.attaches == "input"
    assert spec.resolve_params({}) == {"hole_size": 16, "holes": 1}
    for bad in ({"hole_size": 0}, {"holes": 0}, {"p": 0.3}):
        with pytest.raises(UsageError):
            spec.resolve_params(bad)
    spec.check_rank(3, "x")
    spec.check_rank(4, "x")
    for r in (2, 5):
        with pytest.raises(UsageError):
            spec.check_rank(r, "x")


@pytest.mark.parametrize("shape,size,holes", [((2, 20, 24), 8, 1), ((16, 12), 5, 1), ((2, 20, 24), 6, 3)])
def test_cutout_onnx_matches_torch(shape, size, holes):
    n = 20_000
    x = _positive((n,) + shape, 7)
    sess = ort_session(onnx_site("cutout", [None, *shape], hole_size=size, holes=holes))
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False),
                                  torch_site("cutout", mc=False, hole_size=size, holes=holes)(torch.from_numpy(x)).numpy())
    a = run_onnx(sess, x)
    assert not np.array_equal(a, run_onnx(sess, x)), "ONNX MC mode does not vary in a default session"
    fo = _check_cutout(x, a, size, holes, "onnx cutout")
    ft = _check_cutout(x, _torch_mc("cutout", x, hole_size=size, holes=holes), size, holes, "torch cutout")
    assert_same_distribution(fo, ft, "cutout per-sample zeroed fraction torch vs onnx")


def test_cutout_onnx_needs_static_spatial_dims():
    with pytest.raises(UsageError, match="static"):
        onnx_site("cutout", [None, 3, None, 24], hole_size=4)


# =========================================================================== maxdrop


def maxdrop_ref(x: np.ndarray, p: float) -> np.ndarray:
    """Min-max normalise each map in float32, zero z > 1 - p; constant maps unchanged."""
    x = np.asarray(x, dtype=np.float32)
    axes = tuple(range(2, x.ndim)) if x.ndim >= 3 else (1,)
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    rng = hi - lo
    flat = rng == 0
    z = (x - lo) / np.where(flat, np.float32(1), rng)
    drop = (z > np.float32(1.0 - p)) & ~flat
    return np.where(drop, np.float32(0), x)


def _maxdrop_inputs(shape, seed):
    """Random normals, plus maps of small integers (ties at the max and at the threshold)
    and constant maps (max == min)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    n = shape[0]
    x[n // 4: n // 2] = rng.integers(-5, 6, size=(n // 2 - n // 4,) + shape[1:]).astype(np.float32)
    x[n // 2: n // 2 + 8] = 3.25  # whole samples constant
    if len(shape) >= 3:
        x[-8:, 0] = -1.5  # single constant channels
    return x


SHAPES = [(512, 300), (256, 16, 50), (128, 16, 12, 12), (32, 4, 4, 6, 6)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_maxdrop_torch_exact(shape, p):
    x = _maxdrop_inputs(shape, 8)
    y = _torch_mc("maxdrop", x, p=p)
    ref = maxdrop_ref(x, p)
    np.testing.assert_array_equal(y, ref)
    assert not np.isnan(y).any()
    np.testing.assert_array_equal(y[len(x) // 2: len(x) // 2 + 8], x[len(x) // 2: len(x) // 2 + 8])
    assert (y == 0).mean() > 0  # it does drop something
    # deterministic: a second MC pass is identical
    np.testing.assert_array_equal(_torch_mc("maxdrop", x, seed=1, p=p), y)


def test_maxdrop_thresholds_and_ties():
    """Values 0..10 in a map: z = v/10; p = 0.3 drops z > 0.7 only, i.e. 8, 9, 10 (both 10s)."""
    x = np.tile(np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10], np.float32), (4, 1))
    y = _torch_mc("maxdrop", x, p=0.3)
    np.testing.assert_array_equal(y[0], [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0])
    x4 = torch.from_numpy(x.reshape(4, 1, 3, 4))
    np.testing.assert_array_equal(torch_site("maxdrop", p=0.3)(x4).numpy().reshape(4, 12), y)
    xt = torch.from_numpy(x)
    assert torch.equal(torch_site("maxdrop", mc=False, p=0.3)(xt), xt)
    assert torch.equal(torch_site("maxdrop", p=0.0)(xt), xt)


def test_maxdrop_bad_params_and_rank():
    spec = get_variant("maxdrop")
    for bad in ({"p": 1.0}, {"p": -0.1}, {"block_size": 3}):
        with pytest.raises(UsageError):
            spec.resolve_params(bad)
    for r in (2, 3, 4, 5):
        spec.check_rank(r, "x")
    with pytest.raises(UsageError):
        spec.check_rank(1, "x")
    assert "weak MC signal" in spec.notes


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("shape", SHAPES)
def test_maxdrop_onnx_exact(shape, opset):
    p = 0.3
    x = _maxdrop_inputs(shape, 9)
    sess = ort_session(onnx_site("maxdrop", [None, *shape[1:]], opset=opset, p=p))
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False), x)
    a = run_onnx(sess, x)
    np.testing.assert_array_equal(a, maxdrop_ref(x, p))
    np.testing.assert_array_equal(a, _torch_mc("maxdrop", x, p=p))
    np.testing.assert_array_equal(run_onnx(sess, x), a)  # deterministic given x
