"""`dropcli prune`: sparse-VD / SBP math, the exact shrink, and the command end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

from dropcli.cli.main import app
from dropcli.prune.core import attach_sparse_vd, distill_loss, finalize_sparse_vd, teacher_outputs
from dropcli.prune.layers import (
    LinearSVD, ConvSVD, kl_sparse_vd, sample_truncated_log, sbp_kl, truncated_lognormal_moments,
)
from dropcli.prune.shrink import shrink
from helpers import interrupt_training
from models import CNN, MLP, ResBlock, randomise_bn, save_as

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ------------------------------------------------------------------------------ the math

@pytest.mark.parametrize("log_alpha", [-4.0, -2.0, 0.0, 2.0, 4.0])
def test_sparse_vd_kl_matches_numeric_integration(log_alpha):
    """KL(N(theta, alpha theta^2) || log-uniform) = -0.5 log alpha + E log|1 + sqrt(alpha) z| + C,
    C = (euler_gamma + log 2) / 2 making it vanish as alpha -> inf (the constant Molchanov et al.
    fix with -k1). Their approximation is within 0.01 of it."""
    from scipy import integrate

    s = math.sqrt(math.exp(log_alpha))
    f = lambda z: math.log(abs(1 + s * z)) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    zc = -1 / s  # the log singularity
    e_log = integrate.quad(f, -np.inf, zc, limit=400)[0] + integrate.quad(f, zc, np.inf, limit=400)[0]
    exact = -0.5 * log_alpha + e_log + (np.euler_gamma + math.log(2)) / 2
    approx = float(kl_sparse_vd(torch.tensor(log_alpha, dtype=torch.float64)))
    assert abs(approx - exact) < 0.01


def _se_check(samples: torch.Tensor, mean: float, var: float, k: float = 5.0) -> None:
    """Sample mean and variance within k standard errors of the formulas."""
    n = samples.numel()
    s = samples.double()
    se_mean = math.sqrt(var / n)
    assert abs(float(s.mean()) - mean) < k * se_mean + 1e-12, (float(s.mean()), mean, se_mean)
    m4 = float(((s - mean) ** 4).mean())
    se_var = math.sqrt(max(m4 - var * var, 0.0) / n)
    assert abs(float(s.var()) - var) < k * se_var + 1e-12, (float(s.var()), var, se_var)


@pytest.mark.parametrize("mu,log_sigma", [(0.0, -5.0), (-1.0, 0.0), (-3.0, 0.5), (0.5, -1.0), (-15.0, 1.5)])
def test_sbp_truncated_lognormal_moments_match_sampling(mu, log_sigma):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    mu_t = torch.full((n,), mu, dtype=torch.float64)
    sigma_t = torch.full((n,), math.exp(log_sigma), dtype=torch.float64)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    theta = torch.exp(sample_truncated_log(mu_t, sigma_t, u))
    m, v = truncated_lognormal_moments(torch.tensor([mu], dtype=torch.float64), torch.tensor([math.exp(log_sigma)], dtype=torch.float64))
    assert 0 < float(m) <= 1
    _se_check(theta, float(m), float(v))


def test_sbp_kl_matches_numeric_integration():
    """KL(q || log-uniform on [a, b]) = E_q[log q(log theta)] + log(b - a), integrated numerically."""
    from scipy import integrate, stats

    for mu, ls in [(0.0, -1.0), (-2.0, 0.0), (-5.0, 1.0)]:
        sigma = math.exp(ls)
        a, b = (-20 - mu) / sigma, (0 - mu) / sigma
        dist = stats.truncnorm(a, b, loc=mu, scale=sigma)
        exact = integrate.quad(lambda t: dist.pdf(t) * dist.logpdf(t), -20, 0, limit=400, points=[mu])[0] + math.log(20)
        got = float(sbp_kl(torch.tensor(mu, dtype=torch.float64), torch.tensor(ls, dtype=torch.float64)))
        assert abs(got - exact) < 1e-6, (mu, ls, got, exact)


def test_local_reparameterisation_moments():
    """Training-mode LinearSVD: b ~ N(x theta^T + bias, (x*x) sigma^2^T), checked on many draws."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    svd = LinearSVD.from_layer(lin)
    with torch.no_grad():
        svd.log_sigma2.copy_(torch.randn(4, 6) - 2.0)
    svd.train()
    x = torch.randn(1, 6)
    n = 200_000
    with torch.no_grad():
        out = svd(x.expand(n, 6))
        mean = (x @ svd.weight.T + svd.bias)[0]
        var = ((x * x) @ torch.exp(svd.log_sigma2).T)[0] + 1e-8
    for j in range(4):
        _se_check(out[:, j], float(mean[j]), float(var[j]))


def test_conv_svd_moments():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    svd = ConvSVD.from_layer(conv)
    with torch.no_grad():
        svd.log_sigma2.copy_(torch.randn_like(svd.log_sigma2) - 3.0)
    svd.train()
    x = torch.randn(1, 2, 4, 4)
    n = 50_000
    with torch.no_grad():
        out = svd(x.expand(n, 2, 4, 4))
        mean = torch.nn.functional.conv2d(x, svd.weight, svd.bias, padding=1)[0]
        var = torch.nn.functional.conv2d(x * x, torch.exp(svd.log_sigma2), None, padding=1)[0] + 1e-8
    for idx in [(0, 0, 0), (1, 2, 3), (2, 1, 1)]:
        _se_check(out[(slice(None),) + idx], float(mean[idx]), float(var[idx]))


def test_log_alpha_threshold_is_applied():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(MLP().eval())
    mods = attach_sparse_vd(gm, threshold=1.5)
    with torch.no_grad():
        for m in mods.values():
            m.log_sigma2.copy_(torch.randn_like(m.log_sigma2) * 4 - 4)
    la = {k: m.log_alpha().detach().clone() for k, m in mods.items()}
    theta = {k: m.weight.detach().clone() for k, m in mods.items()}
    finalize_sparse_vd(gm, mods)
    for name, a in la.items():
        w = gm.get_submodule(name).weight
        assert isinstance(gm.get_submodule(name), nn.Linear)
        assert torch.equal(w == 0, (a >= 1.5) | (theta[name] == 0))
        assert torch.equal(w[a < 1.5], theta[name][a < 1.5])
        assert 0 < int((a >= 1.5).sum()) < a.numel()  # the case is not trivial


def test_distill_loss_is_the_weighted_mix_of_labels_and_teacher():
    """Hinton et al. 2015: (1 - w) CE(out, y) + w T^2 KL(softmax(t / T) || softmax(out / T)),
    written out by hand; regression mixes the two squared errors."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(20, 5, generator=g) * 3
    idx = torch.tensor([3, 0, 17, 9])
    out, y = torch.randn(4, 5, generator=g), torch.tensor([1, 4, 0, 2])
    w, temp = 0.3, 2.0
    p = torch.softmax(teacher[idx] / temp, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(out / temp, -1))).sum(-1).mean()
    want = (1 - w) * torch.nn.functional.cross_entropy(out, y) + w * temp ** 2 * kl
    assert torch.allclose(distill_loss(teacher, "classification", w, temp)(out, y, idx), want, atol=1e-6)
    # the teacher's own outputs cost nothing on the teacher's side
    assert float(distill_loss(teacher, "classification", 1.0, temp)(teacher[idx], y, idx)) == pytest.approx(0.0, abs=1e-6)
    yr, outr, tr = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(20, 3, generator=g)
    want_r = (1 - w) * ((outr - yr) ** 2).mean() + w * ((outr - tr[idx]) ** 2).mean()
    assert torch.allclose(distill_loss(tr, "regression", w)(outr, yr, idx), want_r, atol=1e-6)


def test_distiller_mixes_rows_and_matches_the_teacher_on_them():
    """With mix > 0, about that share of a batch's rows become lam * x_i + (1 - lam) * x_j of two of
    its rows (lam uniform), labelled by the dense model's output on the mixture, with no label term;
    the other rows keep the plain distillation loss. One-hot rows make lam readable: a mixed row
    holds lam at its own position."""
    from dropcli.prune.core import Distiller

    n, mix = 1000, 0.5
    x = torch.eye(n)
    teacher_model = nn.Linear(n, 5).eval().requires_grad_(False)
    teacher = teacher_model(x)
    d = Distiller(teacher, "classification", 0.3, 2.0, teacher_model, mix=mix, seed=0)
    idx = torch.arange(n)
    xm, labelled = d.transform(x, idx)
    rows, tm = d._mixed
    assert torch.equal(labelled, ~rows)
    k = int(rows.sum())
    sd = math.sqrt(n * mix * (1 - mix))
    assert abs(k - n * mix) < 5 * sd
    assert torch.equal(xm[~rows], x[~rows])  # the other rows are untouched
    assert torch.allclose(xm[rows].sum(1), torch.ones(k))  # convex: lam + (1 - lam)
    assert int((xm[rows] > 0).sum(1).max()) <= 2  # of two rows
    own = xm[rows][torch.arange(k), torch.nonzero(rows).flatten()]
    own = own[own < 1]  # a row mixed with itself holds 1
    lam_se = math.sqrt(1 / 12 / len(own))
    assert abs(float(own.mean()) - 0.5) < 5 * lam_se  # lam ~ U(0, 1)
    assert torch.allclose(tm, teacher_model(xm[rows]))  # the dense model's output on the mixture
    # the loss: the plain distillation term on the clean rows, the teacher term alone on the mixed ones
    g = torch.Generator().manual_seed(1)
    out, y = torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)
    t = teacher.clone()
    t[rows] = tm
    p = torch.softmax(t / 2.0, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(out / 2.0, -1))).sum(-1) * 4.0
    ce = torch.nn.functional.cross_entropy(out, y, reduction="none")
    want = torch.where(rows, kl, 0.7 * ce + 0.3 * kl).mean()
    assert torch.allclose(d(out, y, idx), want, atol=1e-5)
    y2 = y.clone()
    y2[rows] = (y2[rows] + 1) % 5  # the labels of mixed rows are not read
    assert torch.equal(d(out, y2, idx), d(out, y, idx))
    # reset: the same draws again; mix 0 leaves the batch alone
    d.reset(0)
    assert torch.equal(d.transform(x, idx)[0], xm)
    unmixed, labelled = Distiller(teacher, "classification", 0.3, 2.0, teacher_model, mix=0.0).transform(x, idx)
    assert unmixed is x and labelled is None
    # regression, a model whose output has shape (n,): squared errors, the label term on clean rows only
    head = nn.Sequential(nn.Linear(n, 1), nn.Flatten(0)).eval().requires_grad_(False)
    dr = Distiller(head(x), "regression", 0.3, 2.0, head, mix=mix, seed=0)
    xr = dr.transform(x, idx)[0]
    rows_r, tr = dr._mixed
    outr, yr = torch.randn(n, generator=g), torch.randn(n, generator=g)
    t_r = head(x).clone()
    t_r[rows_r] = tr
    want_r = torch.where(rows_r, (outr - t_r) ** 2, 0.7 * (outr - yr) ** 2 + 0.3 * (outr - t_r) ** 2).mean()
    assert torch.allclose(xr[rows_r].sum(1), torch.ones(int(rows_r.sum())))
    assert torch.allclose(dr(outr, yr, idx), want_r, atol=1e-5)


def test_fit_hands_loss_fn_the_batch_rows_and_teacher_outputs_are_eval_mode():
    """fit's loss_fn gets the rows of the batch (to look up teacher outputs) with their labels;
    teacher_outputs runs the model in eval mode (dropout off) and restores its mode."""
    from dropcli.training.loop import Split, fit

    torch.manual_seed(0)
    x, y = torch.randn(37, 4), torch.arange(37) % 3
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    t = teacher_outputs(model, Split(x, y, "x"), batch_size=10)
    # batches of 10 against one of 37: equal up to float32 rounding (the BLAS may block them differently)
    assert model.training and torch.allclose(t, model.eval()(x).detach(), rtol=1e-5, atol=1e-6)
    seen = []

    def loss_fn(out, yb, idx):
        assert torch.equal(yb, y[idx])
        seen.append(idx.clone())
        return torch.nn.functional.cross_entropy(out, yb)

    fit(model, Split(x, y, "x"), "classification", params=[{"params": model.parameters(), "lr": 1e-3}], epochs=2,
        batch_size=8, seed=0, quiet=True, loss_fn=loss_fn)
    assert sorted(torch.cat(seen).tolist()) == sorted(list(range(37)) * 2)

    # fit's transform: the model is fed what it returns, and the training accuracy counts only the
    # rows it marks as labelled (a mixture has no label of its own). A model (learning rate 0) that predicts
    # every row's label right; the transform marks odd rows unlabelled and sets them to predict 0.
    w = torch.eye(3) * 10
    frozen = nn.Linear(3, 3, bias=False)
    frozen.weight.data.copy_(w)
    xs, ys = torch.eye(3)[torch.arange(40) % 3], torch.arange(40) % 3
    fed = []

    def transform(xb, idx):
        labelled = idx % 2 == 0
        xb = xb.clone()
        xb[~labelled] = torch.tensor([1.0, 0.0, 0.0])
        fed.append(xb)
        return xb, labelled

    hist = fit(frozen, Split(xs, ys, "x"), "classification", params=[{"params": [frozen.weight], "lr": 0.0}],
               epochs=1, batch_size=8, seed=0, quiet=True, transform=transform)
    assert hist[0]["accuracy"] == 1.0  # with the unlabelled rows counted it would be 27/40
    assert sum(int((f == torch.tensor([1.0, 0.0, 0.0])).all(1).sum()) for f in fed) >= 20


# ------------------------------------------------------------------------------ the shrink

def _mlp_with_dead_units():
    torch.manual_seed(0)
    m = MLP(d_in=12, hidden=16, d_out=5).eval()
    with torch.no_grad():
        m.fc1.weight[[1, 4, 7]] = 0  # no live inputs: constant relu(bias), folded into fc2's bias
        m.fc1.bias[1] = 0.7
        m.fc1.bias[4] = -0.3  # relu -> 0
        m.fc2.weight[:, [2, 9]] = 0  # no live outputs
        m.fc2.weight[[0, 5]] = 0  # fc2 units without inputs: their constant goes into fc3's bias
        m.fc3.weight[:, 3] = 0
        m.fc1.weight[:, 0] = 0  # an input feature: the model's input stays as it is
    return m


@pytest.mark.parametrize("case", ["mlp", "cnn", "resblock"])
def test_shrink_is_exact_and_removes_the_dead_units(case):
    torch.manual_seed(0)
    if case == "mlp":
        model, x = _mlp_with_dead_units(), torch.randn(64, 12)
        expect = {"fc1": 5, "fc2": 3}  # fc1: 1, 4, 7 dead in + 2, 9 dead out; fc2: 0, 5 dead in + 3 dead out
    elif case == "cnn":
        model, x = randomise_bn(CNN()), torch.randn(32, 1, 8, 8)
        with torch.no_grad():
            f = model.features
            f[0].weight[[2, 5]] = 0  # constant channels; conv 3 pads with zeros, so only exact if the constant is 0
            f[0].bias[2] = 0.0
            f[1].bias[2] = -5.0  # BN shift, relu -> exactly 0: removable
            f[1].bias[5] = 3.0  # relu(positive) seen through a padded conv: must stay
            f[3].weight[:, 6] = 0  # no live outputs
            f[3].weight[[1, 11]] = 0  # constant channels into the linear head: folded
        expect = {"features.0": 2, "features.3": 2}
    else:
        model, x = randomise_bn(ResBlock()), torch.randn(16, 1, 8, 8)
        with torch.no_grad():
            model.conv1.weight[[0, 3]] = 0
            model.bn1.bias[0] = -9.0  # relu -> 0: removable
            model.bn1.bias[3] = 2.0  # constant into padded conv2: must stay
            model.conv2.weight[:, 5] = 0  # conv1 unit 5: no live outputs
        expect = {"conv1": 2}
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        want = gm(x)
    res = shrink(gm, (x[:2],))
    with torch.no_grad():
        got = gm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert res.removed == expect
    # the units are really gone from the layers' shapes
    fresh = {"mlp": _mlp_with_dead_units, "cnn": lambda: CNN(), "resblock": lambda: ResBlock()}[case]()
    for name, k in expect.items():
        assert gm.get_submodule(name).weight.shape[0] == fresh.get_submodule(name).weight.shape[0] - k


def test_shrink_refuses_to_empty_a_layer():
    from dropcli.errors import DropcliError

    m = MLP(d_in=8, hidden=6, d_out=3).eval()
    with torch.no_grad():
        m.fc2.weight.zero_()
    with pytest.raises(DropcliError, match="removes every unit"):
        shrink(fx.symbolic_trace(m), (torch.randn(2, 8),))


# ------------------------------------------------------------------------------ the command

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = np.load(EXAMPLES / "digits_test.npz")
    root = tmp_path_factory.mktemp("digits")
    np.savez(root / "train.npz", x=d["x"][:280], y=d["y"][:280])
    np.savez(root / "val.npz", x=d["x"][280:], y=d["y"][280:])
    np.savez(root / "img.npz", x=d["x_img"], y=d["y"])
    return root


def _run(*args):
    return runner.invoke(app, ["-q", *map(str, args)])


def test_end_to_end_onnx_in_and_out(tmp_path, digits):
    out = tmp_path / "small.onnx"
    r = _run("prune", EXAMPLES / "digits_mlp.onnx", "--data", digits / "train.npz", "--val", digits / "val.npz",
             "--epochs", 12, "--kl-weight", 0.05, "--threshold", 1.0, "--seed", 1, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    s = rep["summary"]
    assert s["format"] == "onnx" and s["weights_after"] < s["weights_before"]
    assert s["val_accuracy_after"] >= s["val_accuracy_before"] - 0.1  # not destroyed
    # a default onnxruntime session runs it, with the shrunk shapes
    import onnx

    m = onnx.load(str(out))
    assert not any(i.name == "dropcli_mc" for i in m.graph.input)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    d = np.load(digits / "val.npz")
    y = sess.run(None, {sess.get_inputs()[0].name: d["x"].astype(np.float32)})[0]
    assert y.shape == (len(d["x"]), 10)
    acc = float((y.argmax(1) == d["y"]).mean())
    assert abs(acc - s["val_accuracy_after"]) < 1e-9
    inits = {t.name: t for t in m.graph.initializer}
    dims = sorted(tuple(t.dims) for t in inits.values() if len(t.dims) == 2)
    shapes_after = sorted(tuple(r_["shape_after"]) for r_ in rep["layers"])
    assert all(any(d_ in (sa, sa[::-1]) for d_ in dims) for sa in shapes_after)
    assert sum(r_["units_removed"] for r_ in rep["layers"]) > 0


def test_end_to_end_torchscript_cnn_units_gone(tmp_path, digits):
    out = tmp_path / "cnn.pt2"
    r = _run("prune", EXAMPLES / "digits_cnn.pt2", "--data", digits / "img.npz", "--epochs", 6, "--kl-weight", 0.05,
             "--threshold", 0.0, "--allow-larger", "-o", out, "--json", "--plot", tmp_path / "la.png", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == rep
    assert (tmp_path / "la.png").stat().st_size > 1000
    loaded = torch.export.load(str(out)).module()
    shapes = {tuple(v.shape) for k, v in loaded.state_dict().items() if k.endswith("weight") and v.dim() >= 2}
    for row in rep["layers"]:
        assert tuple(row["shape_after"]) in shapes
        assert row["shape_after"][0] == row["shape_before"][0] - row["units_removed"]
    # held-out split used as validation, with accuracy before and after
    assert "held-out" in rep["summary"]["validation"]


def test_sbp_end_to_end(tmp_path, digits):
    out = tmp_path / "sbp.pt"
    r = _run("prune", EXAMPLES / "digits_mlp.pt", "--data", digits / "train.npz", "--val", digits / "val.npz",
             "--method", "sbp", "--epochs", 30, "--kl-weight", 0.3, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    removed = sum(r_["units_removed"] for r_ in rep["layers"])
    assert removed > 0
    ts = torch.jit.load(str(out))
    d = np.load(digits / "val.npz")
    y = ts(torch.from_numpy(d["x"]).float())
    acc = float((y.argmax(1).numpy() == d["y"]).mean())
    assert abs(acc - rep["summary"]["val_accuracy_after"]) < 1e-9
    assert acc >= rep["summary"]["val_accuracy_before"] - 0.15


def test_seed_gives_identical_results(tmp_path, digits):
    outs = []
    for k in range(2):
        out = tmp_path / f"s{k}.pt"
        r = _run("prune", EXAMPLES / "digits_mlp.pt", "--data", digits / "train.npz", "--epochs", 3, "--seed", 7,
                 "--kl-weight", 0.05, "--allow-larger", "-o", out, "--json")
        assert r.exit_code == 0, r.output
        rep = json.loads(r.stdout)
        outs.append((rep["layers"], torch.jit.load(str(out)).state_dict()))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1].keys() == outs[1][1].keys()
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


def test_ctrl_c_writes_nothing(tmp_path, digits, monkeypatch):
    interrupt_training(monkeypatch)
    out = tmp_path / "x.pt"
    r = _run("prune", EXAMPLES / "digits_mlp.pt", "--data", digits / "train.npz", "--epochs", 5, "-o", out,
             "--report", tmp_path / "r.json", "--plot", tmp_path / "p.png")
    assert r.exit_code == 130
    assert "interrupted" in r.output
    assert sorted(os.listdir(tmp_path)) == []


def _bad(tmp_path, *args):
    out = tmp_path / "bad_out.pt"
    r = _run("prune", *args, "-o", out)
    assert r.exit_code == 1, r.output
    assert not out.exists()
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    return " ".join(lines)


def test_bad_inputs(tmp_path, digits):
    mlp = EXAMPLES / "digits_mlp.pt"
    np.savez(tmp_path / "wide.npz", x=np.zeros((20, 65), np.float32), y=np.zeros(20, np.int64))
    assert "the model expects [N, 64]" in _bad(tmp_path, mlp, "--data", tmp_path / "wide.npz")
    d = np.load(digits / "train.npz")
    np.savez(tmp_path / "labels.npz", x=d["x"], y=d["y"] + 5)
    assert "labels out of range" in _bad(tmp_path, mlp, "--data", tmp_path / "labels.npz")
    relu = tmp_path / "relu.pt"
    torch.jit.save(torch.jit.trace(nn.Sequential(nn.ReLU()), torch.zeros(2, 64)), str(relu))
    assert "no prunable layers" in _bad(tmp_path, relu, "--data", digits / "train.npz", "--input-shape", "2x64")
    msg = _bad(tmp_path, mlp, "--data", digits / "train.npz", "--epochs", 1, "--threshold", -100)
    assert "removes every" in msg
    np.savez(tmp_path / "nolabels.npz", x=d["x"])
    assert "has no labels" in _bad(tmp_path, mlp, "--data", tmp_path / "nolabels.npz")
    r = _run("prune", mlp, "-o", tmp_path / "o.pt")
    assert r.exit_code == 2 and "--data is required" in r.output
    r = _run("prune", mlp, "--data", digits / "train.npz", "--method", "magic", "-o", tmp_path / "o.pt")
    assert r.exit_code == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["wide.npz", "labels.npz", "relu.pt", "nolabels.npz"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_training(tmp_path, digits):
    r = _run("prune", EXAMPLES / "digits_mlp.pt", "--data", digits / "train.npz", "--epochs", 2, "--device", "cuda",
             "-o", tmp_path / "g.pt", "--json", "--kl-weight", 0.05)
    assert r.exit_code == 0, r.output


def test_cuda_unavailable_is_a_clear_error(tmp_path, digits):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = _run("prune", EXAMPLES / "digits_mlp.pt", "--data", digits / "train.npz", "--device", "cuda", "-o", tmp_path / "g.pt")
    assert r.exit_code == 1 and "no CUDA GPU" in r.output


def test_regression_from_csv_and_classification_from_pt(tmp_path):
    torch.manual_seed(0)
    reg = MLP(d_in=8, hidden=16, d_out=1).eval()
    path = save_as(reg, torch.zeros(2, 8), tmp_path / "reg.pt", "torchscript")
    x = np.random.default_rng(0).standard_normal((120, 8)).astype(np.float32)
    with torch.no_grad():
        y = reg(torch.from_numpy(x))[:, 0].numpy() + 0.01
    rows = "\n".join(",".join(f"{v:.6f}" for v in list(xi) + [yi]) for xi, yi in zip(x, y))
    (tmp_path / "reg.csv").write_text("a,b,c,d,e,f,g,h,target\n" + rows + "\n")
    r = _run("prune", path, "--data", tmp_path / "reg.csv", "--epochs", 3, "--kl-weight", 0.01, "--allow-larger", "-o", tmp_path / "r_out.pt", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)["summary"]
    assert s["task"] == "regression" and "val_rmse_before" in s and "val_rmse_after" in s
    assert s["val_rmse_before"] < 0.05  # the targets are the model's own outputs (+0.01)

    cls = MLP(d_in=8, hidden=16, d_out=3).eval()
    path = save_as(cls, torch.zeros(2, 8), tmp_path / "cls.pt2", "export")
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy((x[:, 0] > 0).astype(np.int64))}, tmp_path / "d.pt")
    r = _run("prune", path, "--data", tmp_path / "d.pt", "--epochs", 2, "--kl-weight", 0.01, "--allow-larger", "-o", tmp_path / "c_out.pt2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["task"] == "classification"


def test_model_with_sparse_vd_layers_is_pruned_by_its_own_scores(tmp_path):
    """A (pickled) model whose layers are already dropcli sparse-VD layers, trained by the user:
    no --data needed; the output is plain and computes what the model computes in eval mode."""
    import models as models_mod

    torch.manual_seed(0)
    m = MLP(d_in=12, hidden=16, d_out=5).eval()
    m.fc1, m.fc2, m.fc3 = (LinearSVD.from_layer(l) for l in (m.fc1, m.fc2, m.fc3))
    with torch.no_grad():
        for l in (m.fc1, m.fc2, m.fc3):
            l.log_sigma2.copy_(torch.randn_like(l.log_sigma2) * 3 - 2)  # as if trained
        m.fc1.log_sigma2[3] = 20.0  # a whole unit above the threshold
    m.eval()
    path = tmp_path / "svd.pkl"
    torch.save(m, path)
    out = tmp_path / "out.pkl"
    r = _run("prune", path, "--trust-pickle", "--import", models_mod.__file__, "--input-shape", "2x12", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["layers"][0]["units_removed"] >= 1
    pruned = torch.load(out, weights_only=False)
    assert all(type(mod).__module__.startswith("torch.") for name, mod in pruned.named_modules() if name)
    x = torch.randn(50, 12)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), m(x), atol=1e-5, rtol=1e-5)
    kept = sum(int(l.keep_mask().sum()) for l in (m.fc1, m.fc2, m.fc3))
    assert rep["summary"]["weights_after"] <= kept


def test_retrain_is_no_longer_than_the_fine_tune_by_default():
    """--retrain-epochs defaults to 10, or to --epochs where that is fewer; given, it is kept."""
    from dropcli.api.prune import check_prune_args

    assert check_prune_args()["retrain_epochs"] == 10
    assert check_prune_args(epochs=3)["retrain_epochs"] == 3
    assert check_prune_args(epochs=3, retrain_epochs=5)["retrain_epochs"] == 5
    assert check_prune_args(epochs=30, retrain_epochs=0)["retrain_epochs"] == 0
