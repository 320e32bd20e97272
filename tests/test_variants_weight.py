"""DropConnect (Wan et al. 2013) on Linear and Conv layers, torch and ONNX, checked statistically.

With inverted masks (W~ = M*W/q, b~ = m*b/q, M, m ~ Bernoulli(q) per example) a unit's
pre-activation u has mean mu = W x + b and variance s2 = (p/q)((W*W)(x*x) + b*b) exactly
(docs/variants.md's vanilla form, mu = q W v and s2 = q(1-q)(W*W)(v*v), with W -> W/q). Both MC forms
(`gaussian`: u ~ N(mu, s2); `mask`: the Bernoulli masks themselves) must give these moments, per
row of a tiled batch with no mask shared between rows; the test rule is Algorithm 2,
mean_z a(mu + sqrt(s2) eps_z). Tolerances: K standard errors from the formulas.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dropcli.backends.onnx.model import MC_INPUT
from dropcli.cli.main import app
from dropcli.variants.weight import DropConnect, fixed_normal_draws
from helpers import assert_same_moments
from models import save_as

K = 5.0
N = 20000
P = 0.3
runner = CliRunner()


def _moments(x: np.ndarray, w: np.ndarray, b: np.ndarray, conv: bool = False):
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    r = P / (1 - P)
    if conv:
        xt = torch.from_numpy(x64)
        mu = torch.nn.functional.conv2d(xt, torch.from_numpy(w64), torch.from_numpy(b64), padding=1).numpy()
        v = torch.nn.functional.conv2d(xt * xt, torch.from_numpy(w64 ** 2), torch.from_numpy(b64 ** 2), padding=1).numpy()
        return mu[0], r * v[0]
    return x64 @ w64.T + b64, r * ((x64 ** 2) @ (w64 ** 2).T + b64 ** 2)


def _check(y: np.ndarray, mu: np.ndarray, var: np.ndarray, gaussian: bool) -> None:
    """y: [N, ...] draws of one example. Mean within K SE; variance within K SE of a sample
    variance (Gaussian: v*sqrt(2/(n-1)); masks: from the sample fourth moment)."""
    n = y.shape[0]
    m, v = y.mean(0), y.var(0, ddof=1)
    assert np.all(np.abs(m - mu) <= K * np.sqrt(var / n) + 1e-6), np.max(np.abs(m - mu) / np.sqrt(var / n))
    if gaussian:
        se_v = var * math.sqrt(2.0 / (n - 1))
    else:
        c = y - y.mean(0)
        se_v = np.sqrt(np.maximum((c ** 4).mean(0) - v ** 2, 0) / n)
    assert np.all(np.abs(v - var) <= K * se_v + 1e-9), np.max(np.abs(v - var) / se_v)


@pytest.mark.parametrize("form", ["gaussian", "mask"])
def test_linear_mc_moments_and_no_shared_mask(form):
    torch.manual_seed(0)
    lin = nn.Linear(24, 6)
    site = DropConnect.from_module(lin, p=P, mc_form=form).set_mc(True)
    x = torch.rand(1, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.manual_seed(2)
        y = site(x.repeat(N, 1)).double().numpy()
    mu, var = _moments(x.numpy(), lin.weight.detach().numpy(), lin.bias.detach().numpy())
    _check(y, mu[0], var[0], gaussian=form == "gaussian")
    # one mask per row, not per batch: rows of one input differ, and two units are uncorrelated
    # (a mask shared by the batch gives identical rows: variance 0)
    c = np.corrcoef(y[:, 0], y[:, 1])[0, 1]
    assert abs(c) <= K / math.sqrt(N)
    assert np.unique(y[:, 0]).size > N // 2


@pytest.mark.parametrize("form", ["gaussian", "mask"])
def test_conv_mc_moments(form):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    site = DropConnect.from_module(conv, p=P, mc_form=form).set_mc(True)
    x = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    n = 6000
    with torch.no_grad():
        torch.manual_seed(3)
        y = site(x.repeat(n, 1, 1, 1)).double().numpy()
    mu, var = _moments(x.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy(), conv=True)
    _check(y, mu, var, gaussian=form == "gaussian")


def test_test_rule_is_algorithm_2():
    """Inference = mean_z relu(mu + sqrt(s2) eps_z) over the stored draws; with many draws it
    converges to the exact Gaussian expectation E[relu(u)] = mu Phi(mu/s) + s phi(mu/s)."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    mu, var = _moments(x.numpy(), lin.weight.detach().numpy(), lin.bias.detach().numpy())
    s = np.sqrt(var)
    for z in (64, 4096):
        site = DropConnect.from_module(lin, act=nn.ReLU(), p=P, samples_z=z)
        with torch.no_grad():
            got = site(x).double().numpy()
        eps = fixed_normal_draws(z, 8)
        ref = np.maximum(mu[None] + s[None] * eps[:, None, :], 0).mean(0)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        t = mu / s
        cdf = 0.5 * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))
        exact = mu * cdf + s * np.exp(-t * t / 2) / math.sqrt(2 * math.pi)
        # antithetic fixed draws: the error of a Z-sample mean of relu(u) is below s / sqrt(Z)
        assert np.all(np.abs(got - exact) <= K * s / math.sqrt(z))
    # no activation after the layer: the test rule is mu itself (the original layer)
    with torch.no_grad():
        np.testing.assert_allclose(DropConnect.from_module(lin, p=P)(x).numpy(), lin(x).numpy(), rtol=1e-6, atol=1e-6)


def _onnx_matches_site(sess, model: nn.Sequential, site, x: np.ndarray, atol: float, seed: int) -> np.ndarray:
    """An ONNX model head(site(x)) against the torch site on the same weights: exactly in inference
    mode, and in distribution (mean and variance, K standard errors) over N MC rows. The ONNX rows."""
    with torch.no_grad():
        ref = model[2](site(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-5, atol=atol)
    yo = sess.run(None, {"x": np.repeat(x, N, 0), MC_INPUT: np.array(True)})[0].astype(np.float64)
    site.set_mc(True)
    with torch.no_grad():
        torch.manual_seed(seed)
        yt = model[2](site(torch.from_numpy(np.repeat(x, N, 0)))).double().numpy()
    assert_same_moments(yo, yt, "ONNX vs torch MC", z=K)
    return yo


@pytest.mark.parametrize("form", ["gaussian", "mask"])
def test_onnx_mc_moments_and_test_rule(form, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 6), nn.ReLU(), nn.Linear(6, 2))
    src = save_as(model, torch.rand(2, 24), tmp_path / "m.onnx", "onnx")
    out = tmp_path / "dc.onnx"
    r = runner.invoke(app, ["inject", str(src), "--variant", "dropconnect", "--p", str(P), "--mc-form", form, "-o", str(out)])
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(1).random((1, 24), dtype=np.float32)
    sess = ort.InferenceSession(str(out))
    # the ONNX output is fc2(site(x)): compare it with torch's own site on the same weights
    site = DropConnect.from_module(model[0], act=nn.ReLU(), p=P, mc_form=form)
    yo = _onnx_matches_site(sess, model, site, x, atol=1e-5, seed=5)
    assert np.unique(yo[:, 0]).size > N // 2  # per-row draws in ONNX too


def test_cli_options_and_errors(tmp_path):
    torch.manual_seed(0)
    src = save_as(nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)), torch.rand(2, 8), tmp_path / "m.pt2", "export")
    for args, flag in ((["--samples-z", "0"], "--samples-z"), (["--mc-form", "exact"], "--mc-form"), (["--p", "1.0"], "--p")):
        r = runner.invoke(app, ["inject", str(src), "--variant", "dropconnect", *args, "-o", str(tmp_path / "o.pt2")])
        assert r.exit_code == 2 and flag in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "o.pt2").exists()
    pool = save_as(nn.MaxPool2d(2), torch.rand(2, 1, 4, 4), tmp_path / "p.pt2", "export")
    r = runner.invoke(app, ["inject", str(pool), "--variant", "dropconnect", "-o", str(tmp_path / "o.pt2")])
    assert r.exit_code == 2 and "Linear or Conv" in r.output
    # tanh after the layer is absorbed: the site replaces both (the test rule averages tanh(u))
    r = runner.invoke(app, ["inject", str(src), "--variant", "dropconnect", "--samples-z", "8", "-o", str(tmp_path / "o.pt2"), "--json"])
    assert r.exit_code == 0, r.output
    m = torch.export.load(str(tmp_path / "o.pt2")).module()
    x = torch.rand(3, 8)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a, b)  # inference is deterministic (fixed draws)


# ----------------------------------------------------------------------------- Standout
def _belief(x, w, b, alpha, beta, conv=False):
    """g(pi x), pi = alpha*W + beta with the bias as the weight of a constant input 1."""
    xt, wt, bt = (torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (x, w, b))
    if conv:
        u = torch.nn.functional.conv2d(xt, wt, bt, padding=1)
        field = torch.nn.functional.conv2d(xt, torch.ones_like(wt), None, padding=1)
    else:
        u = xt @ wt.T + bt
        field = xt.sum(-1, keepdim=True).expand_as(u)
    return u.numpy(), torch.sigmoid(alpha * u + beta * (field + 1)).numpy()


@pytest.mark.parametrize("conv", [False, True])
def test_standout_test_rule_and_keep_rates(conv):
    from dropcli.variants.weight import Standout

    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, padding=1) if conv else nn.Linear(12, 5)
    x = torch.rand((1, 2, 4, 4) if conv else (1, 12), generator=torch.Generator().manual_seed(1))
    alpha, beta = 2.0, -0.3
    site = Standout.from_module(layer, act=nn.ReLU(), alpha=alpha, beta=beta)
    u, g = _belief(x.numpy(), layer.weight.detach().numpy(), layer.bias.detach().numpy(), alpha, beta, conv)
    f = np.maximum(u, 0)
    with torch.no_grad():
        np.testing.assert_allclose(site(x).double().numpy(), g * f, rtol=1e-5, atol=1e-6)  # g * f, not (1 - g) * f
        site.set_mc(True)
        torch.manual_seed(2)
        n = 8000
        y = site(x.repeat((n,) + (1,) * (x.dim() - 1))).double().numpy()
    live = f[0] > 1e-6  # where f(u) = 0 a drop is invisible
    kept = (y != 0).mean(0)
    gl = g[0][live]
    assert np.all(np.abs(kept[live] - gl) <= K * np.sqrt(gl * (1 - gl) / n) + 1e-9)
    seen = live & (kept > 0)
    np.testing.assert_allclose(np.where(y != 0, y, -np.inf).max(0)[seen], f[0][seen], rtol=1e-5)  # a kept unit is f(u) itself
    if not conv:  # alpha > 0 (and one input sum for all units): a larger pre-activation is kept more often
        order = np.argsort(u[0][live])
        assert np.all(np.diff(gl[order]) >= 0) and kept[live][order][-1] > kept[live][order][0]


def test_standout_onnx_matches_torch(tmp_path):
    from dropcli.variants.weight import Standout

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6), nn.Sigmoid(), nn.Linear(6, 2))
    src = save_as(model, torch.rand(2, 10), tmp_path / "m.onnx", "onnx")
    out = tmp_path / "so.onnx"
    r = runner.invoke(app, ["inject", str(src), "--variant", "standout", "--alpha", "1.5", "--beta", "0.2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inject", str(src), "--variant", "standout", "--p", "0.3", "-o", str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "--p" in r.output  # standout has no fixed drop probability
    x = np.random.default_rng(1).random((1, 10), dtype=np.float32)
    site = Standout.from_module(model[0], act=nn.Sigmoid(), alpha=1.5, beta=0.2)
    _onnx_matches_site(ort.InferenceSession(str(out)), model, site, x, atol=1e-6, seed=3)
