"""Fast dropout (Wang & Manning 2013) in torch and ONNX (default onnxruntime sessions).

- Inference mode (the "integrated" test rule) against numeric integration of E[a(S)],
  S ~ N(mu, s2), in float64 numpy (a 40001-point trapezoid over +-12 standard deviations):
  exact rules (identity, relu, leaky relu, gelu) to float32 precision; the probit rules (sigmoid,
  tanh) within the approximation's bound, 2 max_x |sigmoid(x) - Phi(sqrt(pi/8) x)| (computed
  here, not assumed), and equal to the probit formula itself to float32 precision.
- torch == onnxruntime in inference mode for Gemm (transB, alpha, beta) and MatMul + Add.
- MC mode (the "sampled" form): many independent rows of the same examples; the mean and
  variance per output agree with the formula (numeric integration of a(S) and a(S)^2) within
  6 standard errors derived from the variance; the pre-activation is N(mu, s2) (its 1-sigma
  rate is 0.6827); rows of a tiled batch are independent.
- Weights, bias settings and dtypes are kept; bad input gets a clear error.
- `dropcli inject` end to end (TorchScript, .pt2, ONNX): the saved model's inference output is
  the fast-dropout rule computed independently here from the original weights.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from typer.testing import CliRunner

from dropcli.cli.main import app
from dropcli.errors import UsageError
from dropcli.variants import get_variant
from helpers import assert_moments_match, binom_tol, onnx_layer_model, onnx_replace, ort_session, repeat_rows, run_onnx, torch_layer_site
from models import MLP, save_as

runner = CliRunner()
ACTS = {"none": None, "relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "leakyrelu": nn.LeakyReLU(0.2),
        "gelu": nn.GELU(), "elu": nn.ELU(0.7), "silu": nn.SiLU()}
# silu has no ONNX op (exporters write Sigmoid and Mul, which a site does not absorb): torch only
ONNX_ACTS = {"none": None, "relu": ("Relu", {}), "sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}),
             "leakyrelu": ("LeakyRelu", {"alpha": 0.2}), "gelu": ("Gelu", {}), "elu": ("Elu", {"alpha": 0.7})}
_ERF = np.vectorize(math.erf)
NP_ACT = {"none": lambda v: v, "relu": lambda v: np.maximum(v, 0.0), "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
          "tanh": np.tanh, "leakyrelu": lambda v: np.where(v > 0, v, 0.2 * v),
          "gelu": lambda v: v * 0.5 * (1 + _ERF(v / math.sqrt(2))),
          "elu": lambda v: np.where(v > 0, v, 0.7 * np.expm1(np.minimum(v, 0.0))),
          "silu": lambda v: v / (1.0 + np.exp(-v))}
T_GRID = np.linspace(-12.0, 12.0, 40001)
PHI_GRID = np.exp(-0.5 * T_GRID ** 2) / math.sqrt(2 * math.pi)


def gauss_integral(f, mu: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """E[f(S)], S ~ N(mu, s2), by the trapezoid rule over t in [-12, 12] (float64)."""
    s = np.sqrt(s2)[..., None]
    vals = f(mu[..., None] + s * T_GRID) * PHI_GRID
    return np.trapezoid(vals, T_GRID, axis=-1)


def moments_ref(lin: nn.Linear, x: np.ndarray, p: float):
    """mu = W x + b and s2 = (p/q) (W∘W)(x∘x), in float64 from the layer's tensors."""
    w = lin.weight.detach().double().numpy()
    b = lin.bias.detach().double().numpy() if lin.bias is not None else 0.0
    x = x.astype(np.float64)
    return x @ w.T + b, (p / (1 - p)) * (x * x) @ (w * w).T


def probit_bound() -> float:
    """2 max_x |sigmoid(x) - Phi(sqrt(pi/8) x)|: the probit rule's error bound (each of its two
    steps replaces a sigmoid by the probit, pointwise within the max)."""
    xs = np.linspace(-20, 20, 400001)
    lam = math.sqrt(math.pi / 8)
    phi = 0.5 * (1 + np.array([math.erf(v * lam / math.sqrt(2)) for v in xs[::50]]))
    return 2 * float(np.max(np.abs(1 / (1 + np.exp(-xs[::50])) - phi)))


def silu_probit_bound() -> float:
    """max_x |x| |sigmoid(x) - Phi(sqrt(pi/8) x)|: silu's probit rule error bound (E|f| <= max|f|)."""
    xs = np.linspace(-40, 40, 800001)[::50]
    lam = math.sqrt(math.pi / 8)
    phi = 0.5 * (1 + np.array([math.erf(v * lam / math.sqrt(2)) for v in xs]))
    return float(np.max(np.abs(xs) * np.abs(1 / (1 + np.exp(-xs)) - phi)))


def _onnx_linear(op: str, act: str, w: np.ndarray, b: np.ndarray | None, alpha=1.0, beta=1.0, trans_b=1):
    inits = {"W": (w if trans_b or op == "MatMul" else w.T).astype(np.float32)}
    if op == "MatMul":
        inits["W"] = w.T.astype(np.float32).copy()
    out = "y" if ONNX_ACTS[act] is None else "h"
    if op == "Gemm":
        ins = ["x", "W"]
        if b is not None:
            inits["B"] = b.astype(np.float32)
            ins.append("B")
        nodes = [helper.make_node("Gemm", ins, [out], name="fc", transB=trans_b, alpha=alpha, beta=beta)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc")]
        inits["B"] = b.astype(np.float32)
        nodes.append(helper.make_node("Add", ["mm", "B"], [out], name="fc_bias"))
    if ONNX_ACTS[act] is not None:
        op_a, attrs = ONNX_ACTS[act]
        nodes.append(helper.make_node(op_a, ["h"], ["y"], name="act", **attrs))
    return onnx_layer_model(nodes, (None, w.shape[1]), (None, w.shape[0]), inits, opset=20 if act == "gelu" else 17)


# ----------------------------------------------------------------------------- test rule
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_inference_rule_against_numeric_integration_torch_and_onnx(act, p):
    torch.manual_seed(0)
    lin = nn.Linear(12, 9)
    x = np.random.default_rng(1).normal(size=(7, 12)).astype(np.float32) * 1.5
    x[0] = 0.0  # an all-zero row: s2 = 0, the output is a(b)
    mu, s2 = moments_ref(lin, x, p)
    exact = gauss_integral(NP_ACT[act], mu, s2)
    exact[0] = NP_ACT[act](mu[0])
    site = torch_layer_site("fastdropout", lin, act=ACTS[act], mc=False, p=p)
    with torch.no_grad():
        yt = site(torch.from_numpy(x)).double().numpy()
    if act == "silu":
        lam = math.sqrt(math.pi / 8)
        r = np.sqrt(1 + lam * lam * s2)
        t = lam * mu / r
        probit = mu * 0.5 * (1 + _ERF(t / math.sqrt(2))) + lam * s2 / r * np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        np.testing.assert_allclose(yt, probit, rtol=1e-5, atol=2e-6)
        err = np.abs(yt - exact).max()
        assert 1e-5 < err <= silu_probit_bound(), (err, silu_probit_bound())
        return  # no ONNX op for silu
    if act in ("sigmoid", "tanh"):
        c = 1.0 if act == "sigmoid" else 2.0
        probit = 1 / (1 + np.exp(-c * mu / np.sqrt(1 + math.pi * c * c * s2 / 8)))
        probit = probit if act == "sigmoid" else 2 * probit - 1
        np.testing.assert_allclose(yt, probit, rtol=1e-5, atol=2e-6)
        bound = probit_bound() * (1.0 if act == "sigmoid" else 2.0)
        err = np.abs(yt - exact).max()
        assert err <= bound, f"{act}: probit rule off by {err:.4f} > bound {bound:.4f}"
        assert err > 1e-5, "the probit rule is an approximation: it can't be exact here"
    else:
        np.testing.assert_allclose(yt, exact, rtol=1e-5, atol=2e-6)
    # onnxruntime, both layer shapes, agrees with torch to float32 precision
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    for op in ("Gemm", "MatMul"):
        sess = ort_session(onnx_replace(_onnx_linear(op, act, w, b), "fastdropout", p=p))
        yo = run_onnx(sess, x, mc=False)
        np.testing.assert_allclose(yo, yt, rtol=1e-5, atol=1e-6, err_msg=f"{op} {act}")


def test_gemm_attributes_and_no_bias_are_kept():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 8)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    p = 0.3
    for trans_b, alpha, beta in ((1, 1.0, 1.0), (0, 0.5, 2.0)):
        m = _onnx_linear("Gemm", "relu", w, b, alpha=alpha, beta=beta, trans_b=trans_b)
        yo = run_onnx(ort_session(onnx_replace(m, "fastdropout", p=p)), x, mc=False)
        lin = nn.Linear(8, 5)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(alpha * w))
            lin.bias.copy_(torch.from_numpy(beta * b))
        mu, s2 = moments_ref(lin, x, p)
        np.testing.assert_allclose(yo, gauss_integral(NP_ACT["relu"], mu, s2), rtol=1e-5, atol=2e-6)
    # no bias, float64: the site keeps the layer's tensors (same values, dtype) and no bias;
    # at p = 0 it IS the layer
    lin = nn.Linear(8, 5, bias=False).double()
    site = torch_layer_site("fastdropout", lin, act=nn.ReLU(), mc=False, p=0.0)
    assert "bias" not in dict(site.named_parameters()) and site.weight.dtype == torch.float64
    assert torch.equal(site.weight, lin.weight)
    xd = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(site(xd), torch.relu(lin(xd)))
        assert site.set_mc(True)(xd).dtype == torch.float64


# ----------------------------------------------------------------------------- MC rule
def _mc_draws(backend: str, lin: nn.Linear, act: str, p: float, xr: np.ndarray, seed: int) -> np.ndarray:
    """MC outputs of a fastdropout site on lin (+ act) for the rows xr: the torch site, or the
    rewritten ONNX Gemm in a default onnxruntime session (which must vary from run to run)."""
    if backend == "torch":
        site = torch_layer_site("fastdropout", lin, act=ACTS[act], p=p)
        torch.manual_seed(seed)
        with torch.no_grad():
            return site(torch.from_numpy(xr)).numpy()
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    sess = ort_session(onnx_replace(_onnx_linear("Gemm", act, w, b), "fastdropout", p=p))
    y = run_onnx(sess, xr)
    assert not np.array_equal(y, run_onnx(sess, xr)), "ONNX MC mode does not vary in a default session"
    return y


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("act", ["none", "relu", "sigmoid"])
def test_mc_moments_match_the_formula(backend, act):
    """Mean and variance of the MC output per (example, unit) over R independent rows,
    against E[a(S)] and Var[a(S)] by numeric integration: 6 standard errors each."""
    p, R = 0.4, 4000
    torch.manual_seed(3)
    lin = nn.Linear(10, 6)
    x = np.random.default_rng(4).normal(size=(3, 10)).astype(np.float32)
    y = _mc_draws(backend, lin, act, p, repeat_rows(x, R), seed=5).reshape(R, 3, 6).astype(np.float64)
    mu, s2 = moments_ref(lin, x, p)
    f = NP_ACT[act]
    mean = gauss_integral(f, mu, s2)
    var = gauss_integral(lambda v: f(v) ** 2, mu, s2) - mean ** 2
    assert_moments_match(y, mean, var, f"{backend}/{act}: E[a(S)], Var[a(S)]", z=6.0)
    if act == "none":
        # Gaussian, not just the right two moments: P(|S - mu| < s) = 0.6827
        inside = float((np.abs(y - mu) < np.sqrt(s2)).mean())
        target = math.erf(1 / math.sqrt(2))
        assert abs(inside - target) <= binom_tol(target, y.size), f"{backend}: 1-sigma rate {inside:.4f}"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_rows_of_a_tiled_batch_are_independent(backend):
    """Identical rows draw their own noise: the standardised pre-activations of neighbouring
    copies are uncorrelated (|r| <= 6/sqrt(n)) and never equal."""
    p, R = 0.5, 3000
    torch.manual_seed(6)
    lin = nn.Linear(8, 16)
    x = np.random.default_rng(7).normal(size=(1, 8)).astype(np.float32)
    y = _mc_draws(backend, lin, "none", p, repeat_rows(x, R), seed=8)
    mu, s2 = moments_ref(lin, x, p)
    zs = (y.astype(np.float64) - mu) / np.sqrt(s2)
    a, b2 = zs[0::2].ravel(), zs[1::2].ravel()
    r = float(np.corrcoef(a, b2)[0, 1])
    assert abs(r) <= 6 / math.sqrt(a.size), f"{backend}: copies of one example are correlated (r = {r:.4f})"
    assert not (y[0::2] == y[1::2]).all(1).any(), f"{backend}: rows share their noise"


# ----------------------------------------------------------------------------- bad input
def test_bad_parameters_and_layers(tmp_path):
    spec = get_variant("fastdropout")
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(UsageError, match="--p"):
            spec.resolve_params({"p": bad})
    with pytest.raises(UsageError, match="Linear"):
        torch_layer_site("fastdropout", nn.Conv2d(1, 2, 3))
    with pytest.raises(UsageError, match="closed-form"):
        torch_layer_site("fastdropout", nn.Linear(3, 2), act=nn.GELU(approximate="tanh"))
    # a model without Linear layers: one line, exit 2
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    src = save_as(conv, torch.rand(2, 1, 6, 6), tmp_path / "conv.pt2", "export")
    res = runner.invoke(app, ["inject", str(src), "--variant", "fastdropout", "--p", "0.2", "-o", str(tmp_path / "o.pt2")])
    assert res.exit_code == 2 and "no Linear layer" in res.output, res.output
    assert not (tmp_path / "o.pt2").exists()
    # --p outside [0, 1) through the CLI
    res = runner.invoke(app, ["inject", str(src), "--variant", "fastdropout", "--p", "1", "-o", str(tmp_path / "o.pt2")])
    assert res.exit_code == 2 and "[0, 1)" in res.output, res.output
    # a Linear followed by gelu's tanh form (no closed form) in ONNX: refused, naming the layer
    w = np.ones((3, 4), np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h"], name="fc", transB=1),
             helper.make_node("Gelu", ["h"], ["y"], name="g", approximate="tanh")]
    m = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                                           initializer=[onnx.numpy_helper.from_array(w, "W")]),
                          opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(UsageError, match="fc.*gelu"):
        onnx_replace(m, "fastdropout", p=0.3)


# ----------------------------------------------------------------------------- end to end
def _mlp_rule(model: MLP, x: np.ndarray, p: float) -> np.ndarray:
    """The MLP with fastdropout on fc1 (+relu) and fc2 (+relu), fc3 (output layer) kept."""
    h = x
    for fc in (model.fc1, model.fc2):
        mu, s2 = moments_ref(fc, h, p)
        s = np.sqrt(s2)
        a = mu / s
        phi = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + np.vectorize(math.erf)(a / math.sqrt(2)))
        h = mu * cdf + s * phi
    w3, b3 = model.fc3.weight.detach().double().numpy(), model.fc3.bias.detach().double().numpy()
    return h @ w3.T + b3


@pytest.mark.parametrize("fmt,ext", [("torchscript", "pt"), ("export", "pt2"), ("onnx", "onnx")])
def test_inject_end_to_end(fmt, ext, tmp_path):
    torch.manual_seed(9)
    model = MLP().eval()
    src = save_as(model, torch.rand(2, 64), tmp_path / f"m.{ext}", fmt)
    out = tmp_path / f"fd.{ext}"
    shape = ["--input-shape", "2x64"] if fmt == "torchscript" else []
    res = runner.invoke(app, ["inject", str(src), "--variant", "fastdropout", "--p", "0.25", "-o", str(out), *shape])
    assert res.exit_code == 0, res.output
    x = np.random.default_rng(10).random((5, 64)).astype(np.float32)
    ref = _mlp_rule(model, x, 0.25)
    if fmt == "onnx":
        sess = ort_session(onnx.load(str(out)))
        y = sess.run(None, {"x": x})[0]
        stock = {s.name for s in onnx.defs.get_all_schemas() if s.domain == ""}
        g = onnx.load(str(out)).graph
        assert all(n.domain in ("", "ai.onnx") and n.op_type in stock for n in g.node), "non-stock ops"
        ys = np.stack([run_onnx(sess, x) for _ in range(50)])
    else:
        m = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
        with torch.no_grad():
            y = m(torch.from_numpy(x)).numpy()
            for name, buf in m.named_buffers():
                if name.endswith("dropcli_mc"):
                    buf.fill_(True)
            ys = np.stack([m(torch.from_numpy(x)).numpy() for _ in range(50)])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert ys.std(0).min() > 0, "MC mode does not vary"


# ----------------------------------------------------------------------------- --method moments
import json  # noqa: E402

from dropcli.backends import load_model  # noqa: E402
from dropcli.engines.runner import TorchRunner, run_mc  # noqa: E402
from dropcli.engines.moments import run_moments  # noqa: E402


class SigmoidNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


class NormNet(nn.Module):
    """A LayerNorm after the first layer: no moment rule."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


def _inject_cli(src, out, *extra):
    res = runner.invoke(app, ["--quiet", "inject", str(src), "--variant", "fastdropout", "--p", "0.3", "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return out


def _mc_samples(path, x, T, seed=0):
    return run_mc(TorchRunner(load_model(str(path))), [x], T, seed).samples.astype(np.float64)  # [T, N, K]


def _assert_moments_match_mc(mean, var, s, what, extra_mean=None, extra_var=None):
    """|analytic - MC| within 6 MC standard errors (+ an approximation allowance where given)."""
    T = s.shape[0]
    mc_mean, mc_var = s.mean(0), s.var(0)
    se_m = np.sqrt(mc_var / T)
    c = s - mc_mean
    se_v = np.sqrt(np.maximum((c ** 4).mean(0) - mc_var ** 2, 0.0) / T)
    dm = np.abs(mean - mc_mean) - (0 if extra_mean is None else extra_mean)
    dv = np.abs(var - mc_var) - (0 if extra_var is None else extra_var)
    assert (dm <= 6 * se_m + 1e-9).all(), f"{what}: mean off by max z {(np.abs(mean - mc_mean) / np.maximum(se_m, 1e-12)).max():.2f}"
    assert (dv <= 6 * se_v + 1e-9).all(), f"{what}: variance off by max z {(np.abs(var - mc_var) / np.maximum(se_v, 1e-12)).max():.2f}"


def test_moments_exact_case_matches_mc(tmp_path):
    """fastdropout on fc2 of the MLP: its input is deterministic, so N(mu, s2), the relu
    moments (closed form) and fc3's variance (independent units) are all exact: the analytic
    mean and variance match MC with T = 20000 within 6 standard errors, nothing is listed as
    approximated, and the CLI writes the same numbers (batch size does not matter)."""
    torch.manual_seed(11)
    src = save_as(MLP().eval(), torch.rand(2, 64), tmp_path / "m.pt2", "export")
    out = _inject_cli(src, tmp_path / "fd.pt2", "--layers", "fc2")
    x = np.random.default_rng(12).random((6, 64)).astype(np.float32)
    mean, var, probs, steps = run_moments(load_model(str(out)), [x], batch_size=4)
    assert not probs and [s["exact"] for s in steps] == [True, True]
    _assert_moments_match_mc(mean, var, _mc_samples(out, x, 20000), "MLP fc2")
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(app, ["--quiet", "uncertainty", str(out), "--input", str(tmp_path / "x.npy"), "--method", "moments",
                              "--task", "regression", "--batch-size", "5", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["summary"]["method"] == "moments" and rep["summary"]["moments"]["approximated"] == []
    cli_mean = np.array([[e[f"mean_{j}"] for j in range(10)] for e in rep["examples"]])
    cli_var = np.array([[e[f"var_{j}"] for j in range(10)] for e in rep["examples"]])
    # batches of 5 against 4: the BLAS may block the float32 products differently (rounding only)
    np.testing.assert_allclose(cli_mean, mean, rtol=1e-5, atol=1e-6 * np.abs(mean).max())
    np.testing.assert_allclose(cli_var, var, rtol=1e-5, atol=1e-6 * np.abs(var).max())


def test_moments_sigmoid_quadrature_matches_mc_and_integration(tmp_path):
    """Linear + sigmoid (Gauss-Legendre + tails) then a Linear head: both exact, the outputs
    agree with a 40001-point trapezoid reference to float32 precision and with MC (6 standard
    errors); a wide S (s up to 1000) is integrated to 1e-9."""
    torch.manual_seed(13)
    model = SigmoidNet().eval()
    src = save_as(model, torch.rand(2, 16), tmp_path / "s.pt", "torchscript")
    out = _inject_cli(src, tmp_path / "fd.pt", "--input-shape", "2x16")
    x = (np.random.default_rng(14).normal(size=(5, 16)) * 2).astype(np.float32)
    mean, var, _, steps = run_moments(load_model(str(out)), [x], batch_size=64)
    assert [s["exact"] for s in steps] == [True, True], steps
    mu, s2 = moments_ref(model.fc1, x, 0.3)
    sig = NP_ACT["sigmoid"]
    m1 = gauss_integral(sig, mu, s2)
    v1 = gauss_integral(lambda v: sig(v) ** 2, mu, s2) - m1 ** 2
    w2, b2 = model.fc2.weight.detach().double().numpy(), model.fc2.bias.detach().double().numpy()
    np.testing.assert_allclose(mean, m1 @ w2.T + b2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, v1 @ (w2 * w2).T, rtol=1e-5, atol=1e-7)
    _assert_moments_match_mc(mean, var, _mc_samples(out, x, 20000), "sigmoid net")
    from dropcli.model.kinds import Activation
    from dropcli.variants.fast import gauss_moments

    mus = np.array([0.0, 0.3, 3.0, -50.0, 45.0] * 3)
    sds = np.repeat([5.0, 100.0, 1000.0], 5)
    t = np.linspace(-14, 14, 800001)
    for kind, f in (("sigmoid", NP_ACT["sigmoid"]), ("tanh", np.tanh)):
        with np.errstate(over="ignore"):
            vals = f(mus[:, None] + sds[:, None] * t)
        w = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
        m_ref = np.trapezoid(vals * w, t, axis=-1)
        v_ref = np.trapezoid(vals ** 2 * w, t, axis=-1) - m_ref ** 2
        gm, gv, exact = gauss_moments(Activation(kind), torch.from_numpy(mus), torch.from_numpy(sds ** 2))
        assert exact
        np.testing.assert_allclose(gm.numpy(), m_ref, atol=1e-9, err_msg=kind)
        np.testing.assert_allclose(gv.numpy(), v_ref, atol=1e-9, err_msg=kind)


def test_moments_full_mlp_classification_lists_its_approximations(tmp_path):
    """Both hidden layers rewritten: the second site sees a random input and fc3 correlated
    units -- both listed as approximated -- and the class probabilities come from the
    mean-field softmax. Against MC (T = 4000): within 6 standard errors plus an allowance of
    0.02 (probabilities) / 50% of the MC variance (measured here: the variance ratio is
    0.74-1.41, mostly fc3's ignored covariances) -- an empirical check of these documented
    approximations, not a proven bound."""
    torch.manual_seed(15)
    src = save_as(MLP().eval(), torch.rand(2, 64), tmp_path / "m.onnx", "onnx")
    src_t = save_as(MLP().eval(), torch.rand(2, 64), tmp_path / "m.pt2", "export")
    out = _inject_cli(src_t, tmp_path / "fd.pt2")
    x = np.random.default_rng(16).random((8, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(app, ["--quiet", "uncertainty", str(out), "--input", str(tmp_path / "x.npy"), "--method", "moments", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    m = rep["summary"]["moments"]
    assert [s.split(":")[1].strip().split(" ")[0] for s in m["approximated"]] == ["fastdropout", "aten.linear"], m["approximated"]
    assert "mutual_info" in m["not_available"] and "mutual_info" not in rep["examples"][0]
    pm = np.array([[e[f"mean_{j}"] for j in range(10)] for e in rep["examples"]])
    ps = np.array([[e[f"std_{j}"] for j in range(10)] for e in rep["examples"]])
    np.testing.assert_allclose(pm.sum(1), 1.0, atol=1e-6)
    s = _mc_samples(out, x, 4000)
    e = np.exp(s - s.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    _assert_moments_match_mc(pm, ps ** 2, probs, "MLP probabilities", extra_mean=0.02, extra_var=0.5 * probs.var(0))
    # a gate on a measure that needs samples is a usage error; one on the variance works (exit 3)
    res = runner.invoke(app, ["uncertainty", str(out), "--input", str(tmp_path / "x.npy"), "--method", "moments",
                              "--fail-above", "mutual_info=0.1"])
    assert res.exit_code == 2 and "needs samples" in res.output, res.output
    res = runner.invoke(app, ["--quiet", "uncertainty", str(out), "--input", str(tmp_path / "x.npy"), "--method", "moments",
                              "--fail-above", f"std={0.5 * ps.mean():.6g}"])
    assert res.exit_code == 3, res.output
    # the ONNX model is refused with a clear error (moments run on torch graphs)
    onnx_out = _inject_cli(src, tmp_path / "fd.onnx")
    res = runner.invoke(app, ["uncertainty", str(onnx_out), "--input", str(tmp_path / "x.npy"), "--method", "moments"])
    assert res.exit_code == 2 and "torch" in res.output and "--method mc" in res.output, res.output


def test_moments_refuses_ops_without_a_rule(tmp_path):
    torch.manual_seed(17)
    src = save_as(NormNet().eval(), torch.rand(2, 8), tmp_path / "n.pt2", "export")
    out = _inject_cli(src, tmp_path / "fd.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(18).random((4, 8)).astype(np.float32))
    res = runner.invoke(app, ["uncertainty", str(out), "--input", str(tmp_path / "x.npy"), "--method", "moments"])
    assert res.exit_code == 2, res.output
    assert "no moment rule for the op aten.layer_norm" in res.output and "--method mc" in res.output, res.output
    assert "Traceback" not in res.output
    # another variant's site has no rule either; an unknown --method is a usage error
    res = runner.invoke(app, ["uncertainty", str(src), "--input", str(tmp_path / "x.npy"), "--method", "moments",
                              "--inject", "gaussian", "--p", "0.2"])
    assert res.exit_code == 2 and "no moment rule for dropcli site" in res.output, res.output
    res = runner.invoke(app, ["uncertainty", str(out), "--input", str(tmp_path / "x.npy"), "--method", "sampling"])
    assert res.exit_code == 2 and "unknown --method" in res.output


def test_elu_rule_is_exact_over_extreme_moments_torch_and_onnx():
    """E[elu(S)] on a (mu, s) grid from -40 to 40 and 1e-3 to 20, against float64 with scipy's
    log_ndtr: both branches of E[e^S; S <= 0] (direct, and the Mills-ratio continued fraction
    where a = -mu/s - s < -2) hold to float32 precision, with no overflow."""
    from scipy.special import log_ndtr, ndtr

    from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
    from dropcli.model.kinds import Activation
    from dropcli.variants.fast import MILLS_FROM, _onnx_expect, gauss_expect

    alpha = 0.7
    mu, s = np.meshgrid(np.linspace(-40, 40, 161), np.geomspace(1e-3, 20, 60), indexing="ij")
    mu, s = mu.ravel(), s.ravel()
    c, a = mu / s, -mu / s - s
    assert (a < MILLS_FROM).sum() > 1000 and (a >= MILLS_FROM).sum() > 1000  # both branches
    tail = np.exp(mu + 0.5 * s * s + log_ndtr(a))
    relu = mu * ndtr(c) + s * np.exp(-0.5 * c * c) / math.sqrt(2 * math.pi)
    want = relu + alpha * (tail - ndtr(-c))
    act = Activation("elu", (("alpha", alpha),))
    mu32, s2_32 = mu.astype(np.float32), (s * s).astype(np.float32)
    got = gauss_expect(act, torch.from_numpy(mu32), torch.from_numpy(s2_32)).double().numpy()
    tol = 2e-6 * (1 + np.abs(mu) + s)  # float32 rounding of mu, s2 and of the terms
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - want) <= tol), float(np.max(np.abs(got - want) / tol))
    # the ONNX mirror, op for op, in onnxruntime
    info = TensorInfo(1, [None])
    b = OnnxBuilder(17, "t", set())
    out = _onnx_expect(b, act, "mu", "s2", info)
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n"]) for n in ("mu", "s2")],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n"])], initializer=b.initializers)
    sess = ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    yo = sess.run(None, {"mu": mu32, "s2": s2_32})[0].astype(np.float64)
    assert np.all(np.abs(yo - want) <= tol), float(np.max(np.abs(yo - want) / tol))
