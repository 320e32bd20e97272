"""Statistical tests for gaussian, alpha, spatial and droppath, in torch and ONNX (default
onnxruntime session).

Tolerances come from helpers (Z = 6 standard errors, derived from the variance of what is
averaged): a mean of n draws with std sigma gets tol(sigma, n); a rate over n Bernoulli
trials gets binom_tol(rate, n). For a sample variance the per-draw quantity is the squared
deviation, whose std is sqrt(m4 - sigma^4) (sqrt(2)*sigma^2 for a normal).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dropcli.backends.onnx.model import MC_INPUT, OnnxModel
from dropcli.errors import UsageError
from dropcli.engines.noise import KeyedNoise
from dropcli.backends.plan import candidates
from dropcli.variants import get_variant
from dropcli.variants.base import noise_source
from dropcli.variants.noise import ALPHA_PRIME, alpha_affine
from helpers import assert_close_mean, assert_same_distribution, binom_tol, onnx_site, ort_session, run_onnx, torch_site

N = 1_000_000
NAMES = ["gaussian", "alpha", "spatial", "droppath"]


def _torch_mc(name, x, seed=0, **params):
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch_site(name, **params)(torch.as_tensor(x)).numpy()


def _var_se_normal(sigma: float) -> float:
    """Per-draw std of (z*sigma)^2 for z ~ N(0, 1): sqrt(E[z^4] - 1) * sigma^2 = sqrt(2) sigma^2."""
    return math.sqrt(2.0) * sigma * sigma


def _check_sample_var(v: np.ndarray, expected: float, what: str) -> None:
    """The sample variance of v against ``expected``, tolerance from v's own 4th moment."""
    v = np.asarray(v, dtype=np.float64).ravel()
    c = v - v.mean()
    sd_sq = math.sqrt(max((c ** 4).mean() - c.var() ** 2, 1e-24))
    assert_close_mean(c.var(), expected, sd_sq, v.size, what)


# ------------------------------------------------------------------------------ params


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "half"])
def test_bad_p_is_a_usage_error(name, bad):
    with pytest.raises(UsageError):
        get_variant(name).resolve_params({"p": bad})


@pytest.mark.parametrize("name", NAMES)
def test_unknown_param_and_defaults(name):
    spec = get_variant(name)
    assert spec.resolve_params({}) == {"p": 0.5}
    with pytest.raises(UsageError):
        spec.resolve_params({"block_size": 3})


@pytest.mark.parametrize("name", NAMES)
def test_eval_is_identity_and_p0_keeps_all(name):
    torch.manual_seed(3)
    x = torch.randn(64, 8, 5, 5)
    assert torch.equal(torch_site(name, mc=False, p=0.5)(x), x)
    assert torch.equal(torch_site(name, p=0.0)(x), x)


# ------------------------------------------------------------------------------ gaussian


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_gaussian_torch_moments(p):
    """n = y/x ~ N(1, p/q): mean 1 (not 0), variance p/q (not p(1-p)), normal shape."""
    q = 1 - p
    s = math.sqrt(p / q)
    x = torch.full((N,), 2.0)
    n = _torch_mc("gaussian", x, p=p) / 2.0
    assert_close_mean(n.astype(np.float64).mean(), 1.0, s, N, "mean of the noise")
    _check_sample_var(n, p / q, "variance of the noise")
    # the trap value p(1-p) is many tolerances away (for these p)
    assert abs(n.var() - p * q) > 10 * _var_se_normal(s) / math.sqrt(N)
    # normal, not some other law with the same moments: P(n < 1 - s) = Phi(-1)
    phi_m1 = 0.5 * math.erfc(1 / math.sqrt(2))
    rate = (n < 1 - s).mean()
    assert abs(rate - phi_m1) <= binom_tol(phi_m1, N)


def test_gaussian_matches_bernoulli_moments():
    """Per element: E[y] = x and Var[y] = x^2 p/q, the same as inverted Bernoulli dropout."""
    p, q = 0.3, 0.7
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 2.0, size=N).astype(np.float32)
    y = _torch_mc("gaussian", x, p=p).astype(np.float64)
    yb = _torch_mc("standard", x, seed=1, p=p).astype(np.float64)
    # (y - x)/x ~ N(0, p/q) for every element
    r = (y - x) / x
    assert_close_mean(r.mean(), 0.0, math.sqrt(p / q), N, "mean of (y-x)/x")
    _check_sample_var(r, p / q, "var of (y-x)/x")
    rb = (yb - x) / x
    assert_close_mean(rb.mean(), 0.0, math.sqrt(p / q), N, "bernoulli mean of (y-x)/x")
    _check_sample_var(rb, p / q, "bernoulli var of (y-x)/x")


def test_gaussian_onnx():
    p = 0.4
    s = math.sqrt(p / (1 - p))
    x = np.random.default_rng(0).uniform(0.5, 2.0, size=(2000, 500)).astype(np.float32)
    sess = ort_session(onnx_site("gaussian", [None, 500], p=p))
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False), torch_site("gaussian", mc=False, p=p)(torch.from_numpy(x)).numpy())
    a, b = run_onnx(sess, x), run_onnx(sess, x)
    assert not np.array_equal(a, b)
    n = a.astype(np.float64) / x
    assert_close_mean(n.mean(), 1.0, s, n.size, "onnx noise mean")
    _check_sample_var(n, p / (1 - p), "onnx noise variance")
    assert_same_distribution(a, _torch_mc("gaussian", x, p=p), "gaussian torch vs onnx")


# ------------------------------------------------------------------------------ alpha


def test_alpha_constants_match_torch():
    """a = (q + a'^2 q p)^-1/2, b = -a a' p; torch writes a = ((alpha^2 p + 1) q)^-1/2 with
    alpha = -a' = 1.7580993408473766, which differs from the catalogue's 4-digit a' by 1e-6."""
    for p in (0.05, 0.1, 0.5, 0.9):
        q = 1 - p
        a, b = alpha_affine(p)
        ta = 1.0 / math.sqrt((1.7580993408473766 ** 2 * p + 1) * q)
        assert a == pytest.approx(ta, rel=1e-5)
        assert b == pytest.approx(1.7580993408473766 * ta * p, rel=1e-5)
        # self-normalising: E = a(a' p) + b = 0; Var = a^2 (q + a'^2 p q) = 1
        assert a * ALPHA_PRIME * p + b == pytest.approx(0.0, abs=1e-12)
        assert a * a * (q + ALPHA_PRIME ** 2 * p * q) == pytest.approx(1.0, rel=1e-12)


def _alpha_dropped(x: np.ndarray, y: np.ndarray, p: float) -> np.ndarray:
    """Units that were dropped: y == a*a' + b; kept units are a*x + b (x never equals a')."""
    a, b = alpha_affine(p)
    a32, b32 = np.float32(a), np.float32(b)
    kept_val = x * a32 + b32
    drop_val = np.float32(ALPHA_PRIME) * a32 + b32
    dropped = y == drop_val
    np.testing.assert_allclose(y[~dropped], kept_val[~dropped], rtol=1e-6, atol=1e-7)
    return dropped


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_alpha_torch_self_normalising_and_matches_torch(p):
    rng = np.random.default_rng(2)
    # x ~ N(0, 1), nudged off a' so that dropped and kept values can't collide
    x = rng.standard_normal(N).astype(np.float32)
    x[np.isclose(x, ALPHA_PRIME, atol=1e-4)] += 1e-3
    y = _torch_mc("alpha", x, p=p)
    dropped = _alpha_dropped(x, y, p)
    assert abs(dropped.mean() - p) <= binom_tol(p, N)
    # output mean 0 (std 1 per draw) and variance 1 (per-draw std from y's 4th moment)
    assert_close_mean(y.astype(np.float64).mean(), 0.0, 1.0, N, "alpha output mean")
    _check_sample_var(y, 1.0, "alpha output variance")
    # same law as torch's own alpha_dropout
    torch.manual_seed(5)
    ref = torch.nn.functional.alpha_dropout(torch.from_numpy(x), p=p, training=True).numpy()
    assert_same_distribution(y, ref, f"alpha vs torch.alpha_dropout p={p}")


def test_alpha_onnx():
    p = 0.1
    x = np.random.default_rng(4).standard_normal((2000, 500)).astype(np.float32)
    x[np.isclose(x, ALPHA_PRIME, atol=1e-4)] += 1e-3
    sess = ort_session(onnx_site("alpha", [None, 500], p=p))
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False), torch_site("alpha", mc=False, p=p)(torch.from_numpy(x)).numpy())
    a, b = run_onnx(sess, x), run_onnx(sess, x)
    assert not np.array_equal(a, b)
    dropped = _alpha_dropped(x, a, p)
    assert abs(dropped.mean() - p) <= binom_tol(p, a.size)
    assert_close_mean(a.astype(np.float64).mean(), 0.0, 1.0, a.size, "onnx alpha mean")
    _check_sample_var(a, 1.0, "onnx alpha variance")
    assert_same_distribution(a, _torch_mc("alpha", x, p=p), "alpha torch vs onnx")


# ------------------------------------------------------------------------------ spatial


SPATIAL_SHAPES = {3: (4000, 32, 16), 4: (2000, 16, 8, 8), 5: (500, 16, 4, 4, 4)}


def _map_sums(y: np.ndarray, keep_dims: int) -> np.ndarray:
    """One value per mask (per map or per sample): the draws within a map share one mask, so
    only these sums are independent draws for assert_same_distribution (it assumes iid)."""
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(int(np.prod(y.shape[:keep_dims])), -1).sum(1)


def _check_per_map(x: np.ndarray, y: np.ndarray, p: float, keep_dims: int, what: str) -> None:
    """Every map over dims >= keep_dims is all-dropped (0) or all-kept (x/q); the dropped
    fraction of maps is p. x must have no zeros."""
    q = 1 - p
    lead = int(np.prod(x.shape[:keep_dims]))
    xf, yf = x.reshape(lead, -1), y.reshape(lead, -1)
    zero = yf == 0
    map_dropped = zero.all(1)
    assert (zero.any(1) == map_dropped).all(), f"{what}: a map is partly dropped"
    np.testing.assert_allclose(yf[~map_dropped], xf[~map_dropped] * np.float32(1 / q), rtol=1e-6, err_msg=what)
    rate = map_dropped.mean()
    assert abs(rate - p) <= binom_tol(p, lead), f"{what}: dropped maps {rate:.4f}, want {p} +- {binom_tol(p, lead):.4f}"


@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_spatial_torch_per_channel_masks(rank, p):
    x = np.random.default_rng(rank).uniform(0.5, 2.0, size=SPATIAL_SHAPES[rank]).astype(np.float32)
    y = _torch_mc("spatial", x, p=p)
    _check_per_map(x, y, p, 2, f"spatial rank {rank}")
    # masks are independent across channels of one sample: the per-sample count of dropped
    # channels is Binomial(C, p), so its mean is C*p with per-sample std sqrt(C p q)
    n, c = x.shape[:2]
    per_sample = (y.reshape(n, c, -1)[:, :, 0] == 0).sum(1).astype(np.float64)
    assert_close_mean(per_sample.mean(), c * p, math.sqrt(c * p * (1 - p)), n, "dropped channels per sample")
    _check_sample_var(per_sample, c * p * (1 - p), "var of dropped channels per sample")


def test_spatial_wrong_rank():
    spec = get_variant("spatial")
    for rank in (1, 2, 6):
        with pytest.raises(UsageError):
            spec.check_rank(rank, "layer x")
    with pytest.raises(UsageError):
        torch_site("spatial", p=0.5)(torch.randn(8, 16))
    with pytest.raises(UsageError):
        onnx_site("spatial", [None, 16], p=0.5)


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_spatial_onnx_dynamic_batch(opset):
    p = 0.3
    shape = (2000, 16, 8, 8)
    x = np.random.default_rng(7).uniform(0.5, 2.0, size=shape).astype(np.float32)
    sess = ort_session(onnx_site("spatial", [None, 16, 8, 8], opset=opset, p=p))
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False), torch_site("spatial", mc=False, p=p)(torch.from_numpy(x)).numpy())
    a, b = run_onnx(sess, x), run_onnx(sess, x)
    assert not np.array_equal(a, b)
    _check_per_map(x, a, p, 2, "onnx spatial")
    # another batch size through the same session (dynamic N)
    _check_per_map(x[:777], run_onnx(sess, x[:777]), p, 2, "onnx spatial, batch 777")
    assert_same_distribution(_map_sums(a, 2), _map_sums(_torch_mc("spatial", x, p=p), 2), "spatial torch vs onnx")


@pytest.mark.parametrize("rank", [3, 5])
def test_spatial_onnx_other_ranks(rank):
    p = 0.5
    shape = SPATIAL_SHAPES[rank]
    x = np.random.default_rng(8).uniform(0.5, 2.0, size=shape).astype(np.float32)
    sess = ort_session(onnx_site("spatial", [None, *shape[1:]], p=p))
    _check_per_map(x, run_onnx(sess, x), p, 2, f"onnx spatial rank {rank}")


# ------------------------------------------------------------------------------ droppath


@pytest.mark.parametrize("shape", [(200_000, 8), (50_000, 4, 3, 3), (200_000,)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_droppath_torch_one_mask_per_sample(shape, p):
    x = np.random.default_rng(9).uniform(0.5, 2.0, size=shape).astype(np.float32)
    y = _torch_mc("droppath", x, p=p)
    _check_per_map(x, y, p, 1, f"droppath {shape}")
    # E[f(x) m / q] = f(x): the per-sample sum of y/x is D*m/q, mean D, std D*sqrt(p/q)
    d = int(np.prod(shape[1:]))
    r = (y.astype(np.float64) / x).reshape(shape[0], -1).sum(1)
    assert_close_mean(r.mean(), d, d * math.sqrt(p / (1 - p)), shape[0], "droppath branch mean")


def _residual_graph_unknown_rank() -> onnx.ModelProto:
    """y = a + Reshape(a, s) with a = Identity(x) and the target shape s a graph input of
    dynamic length: shape inference cannot know the rank of the residual branch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h"])
    shp = helper.make_tensor_value_info("s", TensorProto.INT64, ["k"])
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="stem"),
        helper.make_node("Reshape", ["a", "s"], ["b"], name="branch"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h"])
    g = helper.make_graph(nodes, "res", [x, shp], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _inject_droppath(model: onnx.ModelProto, p: float) -> onnx.ModelProto:
    spec = get_variant("droppath")
    om = OnnxModel(model, "test")
    layer = next(l for l in candidates(om.layers(), spec) if l.name == "add")
    om.insert(layer, spec, spec.resolve_params({"p": p}))
    om.finalize()
    return om.model


def _check_droppath_onnx(sess, x: np.ndarray, p: float, what: str) -> np.ndarray:
    """The graph is y = x + droppath(x): each sample is x (dropped) or x + x/q (kept)."""
    a = run_onnx(sess, x)
    _check_per_map(x, a - x, p, 1, what)
    return a


def test_droppath_onnx():
    p = 0.3
    q = 1 - p
    x = np.random.default_rng(10).uniform(0.5, 2.0, size=(100_000, 4, 3, 3)).astype(np.float32)
    model = onnx_site("droppath", [None, 4, 3, 3], p=p)
    # the site is on the branch operand of the add, not on its output
    add = next(n for n in model.graph.node if n.name == "add")
    assert add.input[0] == "a" and add.input[1] != "b"
    sess = ort_session(model)
    np.testing.assert_array_equal(run_onnx(sess, x, mc=False), x + x)
    a = _check_droppath_onnx(sess, x, p, "onnx droppath")
    assert not np.array_equal(a, run_onnx(sess, x))
    _check_droppath_onnx(sess, x[:333], p, "onnx droppath, batch 333")
    t = x + _torch_mc("droppath", x, p=p)
    assert_same_distribution(_map_sums(a, 1), _map_sums(t, 1), "droppath torch vs onnx")
    # kept samples are x + x/q exactly as torch computes it (float32 x * (1/q))
    kept = (a != x).reshape(len(x), -1).all(1)
    np.testing.assert_allclose(a[kept], (x + x * np.float32(1 / q))[kept], rtol=1e-6)


def test_droppath_onnx_unknown_rank():
    """Without the branch's rank the per-sample mask shape [N, 1, ...] is built at run time."""
    p = 0.5
    model = _residual_graph_unknown_rank()
    assert OnnxModel(model, "test").tensor_info("b").rank is None
    sess = ort_session(_inject_droppath(model, p))
    x = np.random.default_rng(11).uniform(0.5, 2.0, size=(50_000, 6, 5)).astype(np.float32)

    def run(mc):
        return sess.run(None, {"x": x, "s": np.array(x.shape, dtype=np.int64), MC_INPUT: np.array(mc)})[0]

    np.testing.assert_array_equal(run(False), x + x)
    a = run(True)
    _check_per_map(x, a - x, p, 1, "onnx droppath, unknown rank")
    assert not np.array_equal(a, run(True))


def test_droppath_needs_a_residual_add():
    spec = get_variant("droppath")
    assert spec.attaches == "residual"
    with pytest.raises(UsageError):
        torch_site("droppath", p=0.5)(torch.tensor(1.0))


# ------------------------------------------------------------------------------ capture


@pytest.mark.parametrize("name,shape", [("spatial", (6, 16, 4, 4)), ("droppath", (6, 16, 4, 4)),
                                        ("gaussian", (6, 16)), ("alpha", (6, 16))])
def test_traceable_with_dynamic_batch(name, shape):
    """torch.export (dynamic batch) and torch.jit.trace keep the site stochastic and switchable."""
    site = torch_site(name, mc=False, p=0.5)
    ex = torch.rand(shape) + 0.5
    ep = torch.export.export(site, (ex,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False)
    mod = ep.module()
    big = torch.rand((300,) + shape[1:]) + 0.5
    assert torch.equal(mod(big), big)
    for buf_name, buf in mod.named_buffers():
        if buf_name.endswith("dropcli_mc"):
            buf.fill_(True)
    y1, y2 = mod(big), mod(big)
    assert y1.shape == big.shape and not torch.equal(y1, y2)
    if name in ("spatial", "droppath"):
        _check_per_map(big.numpy(), y1.numpy(), 0.5, 2 if name == "spatial" else 1, f"exported {name}")
    ts = torch.jit.trace(torch_site(name, mc=True, p=0.5), (ex,), check_trace=False)
    y = ts(big)
    assert y.shape == big.shape and not torch.equal(y, ts(big))


@pytest.mark.parametrize("name,shape", [("spatial", (2, 16, 4, 4)), ("droppath", (2, 16, 4, 4)),
                                        ("gaussian", (2, 16)), ("alpha", (2, 16))])
def test_keyed_noise_engine(name, shape):
    """Under the MC engine's keyed noise the draws depend only on (seed, example, sample)."""
    x = torch.rand((2 * 64,) + shape[1:]) + 0.5  # 2 examples x 64 samples, i-major
    site = torch_site(name, p=0.5)
    with torch.no_grad():
        with noise_source(KeyedNoise(7, [0, 1], 0, 64)):
            y = site(x)
        with noise_source(KeyedNoise(7, [1], 0, 64)):
            y1 = site(x[64:])
    assert torch.equal(y[64:], y1)  # example 1's samples don't depend on its batch
    assert not torch.equal(y[:64], y[64:])
    if name in ("spatial", "droppath"):
        _check_per_map(x.numpy(), y.numpy(), 0.5, 2 if name == "spatial" else 1, f"keyed {name}")


@pytest.mark.parametrize("name", NAMES)
def test_mc_engines_draw_the_same_samples(name, tmp_path):
    """With keyed noise, `dropcli uncertainty`'s torch and ONNX engines give the same samples
    for the same seed (up to float rounding), so the ONNX graph reads its noise exactly as
    the torch module does (mask shapes, which draw is the keep test, normal vs uniform)."""
    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, run_mc
    from dropcli.engines.onnx_mc import OnnxRunner
    from dropcli.backends.plan import apply_inject, plan_inject
    from dropcli.model.selection import Selection
    from models import CNN, MLP, ResBlock, randomise_bn, save_as

    torch.manual_seed(0)
    mod, shape = {"gaussian": (MLP(), (64,)), "alpha": (MLP(), (64,)),
                  "spatial": (randomise_bn(CNN()), (1, 8, 8)), "droppath": (randomise_bn(ResBlock()), (1, 8, 8))}[name]
    ex = torch.randn((2,) + shape)
    spec = get_variant(name)
    params = spec.resolve_params({"p": 0.3})

    def inject(model):
        apply_inject(model, spec, params, plan_inject(model, spec, Selection(layers=[])))
        return model

    o = OnnxRunner(inject(OnnxModel.load(save_as(mod, ex, tmp_path / "m.onnx", "onnx"))), "cpu")
    t = TorchRunner(inject(load_model(save_as(mod, ex, tmp_path / "m.pt2", "export"))), "cpu")
    x = np.random.default_rng(0).normal(size=(10,) + shape).astype(np.float32)
    a = run_mc(o, [x], 40, seed=3).samples
    b = run_mc(t, [x], 40, seed=3).samples
    assert a.std(0).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
