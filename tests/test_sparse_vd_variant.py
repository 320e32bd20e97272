"""The `sparse-vd` inject variant (docs/learned.md) and `dropcli prune` on its output.

- MC mode is the local reparameterisation trick: per example and unit, y ~ N(Wx + b, (x*x) s2);
  moments checked in both backends on a large tiled batch, with tolerances from the variance.
- Inference mode is the test rule theta * [log alpha < t], against numpy, in both backends.
- prune without --data takes each site's own scores: exact on TorchScript (also re-saved by the
  user without dropcli's record), .pt2 and ONNX; and the real workflow (inject, train with your
  own loop, prune) compresses the bundled digits MLP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from typer.testing import CliRunner

from dropcli.backends.onnx.model import MC_INPUT
from dropcli.cli.main import app
from dropcli.prune.layers import kl_sparse_vd
from dropcli.variants import load_all
from dropcli.variants.base import set_mc
from models import save_as

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
N = 20000  # tiled rows for the moment checks
K = 5.0  # standard errors: a correct implementation fails one check with probability ~6e-7


def _cli(*args: str) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _linear(tmp_path: Path, fmt: str) -> tuple[nn.Linear, Path]:
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).eval()
    src = save_as(lin, torch.rand(4, 32), tmp_path / f"lin.{'onnx' if fmt == 'onnx' else 'pt2'}", fmt)
    out = tmp_path / f"lin_svd{src.suffix}"
    _cli("inject", src, "--variant", "sparse-vd", "--allow-output", "-o", out)
    return lin, out


def _ls2_like(theta: np.ndarray, seed: int) -> np.ndarray:
    """log sigma^2 = log theta^2 + U(-3, 6): log alpha is spread across the threshold 3."""
    rng = np.random.default_rng(seed)
    return (np.log(theta.astype(np.float64) ** 2 + 1e-8) + rng.uniform(-3, 6, theta.shape)).astype(np.float32)


def _expected_eval(x: np.ndarray, theta: np.ndarray, b: np.ndarray, ls2: np.ndarray, t: float = 3.0) -> np.ndarray:
    la = np.clip(ls2.astype(np.float64) - np.log(theta.astype(np.float64) ** 2 + 1e-8), -8, 8)
    return x.astype(np.float64) @ (theta * (la < t)).T + b


def _check_moments(y: np.ndarray, x: np.ndarray, theta: np.ndarray, b: np.ndarray, ls2: np.ndarray) -> None:
    mu = x.astype(np.float64) @ theta.T.astype(np.float64) + b
    var = (x.astype(np.float64) ** 2) @ np.exp(ls2.astype(np.float64)).T + 1e-8
    n = y.shape[0]
    m, v = y.mean(0), y.var(0, ddof=1)
    assert np.all(np.abs(m - mu) <= K * np.sqrt(var / n)), np.max(np.abs(m - mu) / np.sqrt(var / n))
    # a Gaussian sample variance has standard error v * sqrt(2 / (n - 1))
    assert np.all(np.abs(v - var) <= K * var * np.sqrt(2.0 / (n - 1))), np.max(np.abs(v / var - 1))
    # independent draws per unit (and per row): correlations of two units ~ N(0, 1/n)
    c = np.corrcoef(y[:, 0], y[:, 1])[0, 1]
    assert abs(c) <= K / np.sqrt(n), c


def test_registered_with_its_parameters():
    spec = load_all()["sparse-vd"]
    assert spec.replaces == ("linear", "conv")
    assert [p.name for p in spec.params] == ["threshold", "log_sigma2"]


def test_torch_lrt_moments_and_test_rule(tmp_path):
    lin, out = _linear(tmp_path, "export")
    ep = torch.export.load(str(out))
    theta = ep.state_dict["dropcli_site_0.weight"].detach().numpy()
    b = ep.state_dict["dropcli_site_0.bias"].detach().numpy()
    np.testing.assert_array_equal(theta, lin.weight.detach().numpy())  # trained weights kept exactly
    ls2 = _ls2_like(theta, 1)
    ep.state_dict["dropcli_site_0.log_sigma2"].data.copy_(torch.from_numpy(ls2))
    m = ep.module()
    x = torch.rand(1, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        np.testing.assert_allclose(m(x).numpy(), _expected_eval(x.numpy(), theta, b, ls2), rtol=1e-5, atol=1e-5)
        set_mc(m, True)
        torch.manual_seed(3)
        y = m(x.repeat(N, 1)).numpy()
    _check_moments(y, x.numpy(), theta, b, ls2)


def test_onnx_lrt_moments_and_test_rule(tmp_path):
    lin, out = _linear(tmp_path, "onnx")
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    (ls2_name,) = [n for n in inits if "log_sigma2" in n]
    theta = numpy_helper.to_array(next(t for n, t in inits.items() if "log_sigma2" not in n
                                       and tuple(t.dims) == tuple(inits[ls2_name].dims)))
    if theta.shape != (16, 32):
        theta = theta.T  # MatMul layout
    b = lin.bias.detach().numpy()
    np.testing.assert_array_equal(theta, lin.weight.detach().numpy())
    ls2 = _ls2_like(theta, 1)
    stored = ls2 if tuple(inits[ls2_name].dims) == (16, 32) else ls2.T
    inits[ls2_name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(stored), ls2_name))
    sess = ort.InferenceSession(model.SerializeToString())
    x = np.random.default_rng(2).random((1, 32), dtype=np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], _expected_eval(x, theta, b, ls2), rtol=1e-5, atol=1e-5)
    y = sess.run(None, {"x": np.repeat(x, N, 0), MC_INPUT: np.array(True)})[0]
    _check_moments(y, x, theta, b, ls2)


def test_kl_of_the_site_is_the_shared_formula():
    from dropcli.variants.sparse_vd import SparseVD

    site = SparseVD.from_module(nn.Linear(8, 4), log_sigma2=-4.0)
    w = site._parameters["weight"]
    la = torch.clamp(site.log_sigma2 - torch.log(w * w + 1e-8), -8, 8)
    assert torch.equal(site.log_alpha(), la)
    assert torch.allclose(site.kl(), kl_sparse_vd(la).sum())
    site.kl().backward()  # trainable: gradients reach theta and log sigma^2
    assert w.grad is not None and site.log_sigma2.grad is not None


def _mlp_sites(fmt: str, tmp_path: Path) -> tuple[Path, Path]:
    from models import MLP

    torch.manual_seed(0)
    src = save_as(MLP(), torch.rand(4, 64), tmp_path / f"mlp.{ {'onnx': 'onnx', 'export': 'pt2'}.get(fmt, 'pt') }", fmt)
    out = tmp_path / f"mlp_svd{src.suffix}"
    _cli("inject", src, "--variant", "sparse-vd", "-o", out)
    return src, out


@pytest.mark.parametrize("fmt", ["torchscript", "torchscript-resaved", "export", "onnx"])
def test_prune_without_data_uses_the_sites_scores_exactly(fmt, tmp_path):
    src, out = _mlp_sites(fmt.split("-")[0], tmp_path)
    x = np.random.default_rng(5).random((32, 64), dtype=np.float32)
    kept = 0
    extra: list[str] = []
    if fmt == "onnx":
        model = onnx.load(str(out))
        inits = {t.name: t for t in model.graph.initializer}
        for name in [n for n in inits if "log_sigma2" in n]:
            theta = next(numpy_helper.to_array(t) for n, t in inits.items()
                         if "log_sigma2" not in n and tuple(t.dims) == tuple(inits[name].dims))
            ls2 = _ls2_like(theta, len(name))
            kept += int((np.clip(ls2 - np.log(theta.astype(np.float64) ** 2 + 1e-8), -8, 8) < 3).sum())
            inits[name].CopyFrom(numpy_helper.from_array(ls2, name))
        onnx.save(model, str(out))
        ref = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    else:
        if fmt == "export":
            ep = torch.export.load(str(out))
            params = ep.state_dict
        else:
            files = {"dropcli_sites.json": "", "dropcli_example_inputs.json": ""}  # what dropcli stored beside the graph
            ts = torch.jit.load(str(out), _extra_files=files)
            params = dict(ts.named_parameters())
        for name in [n for n in params if n.endswith("log_sigma2")]:
            theta = params[name.replace("log_sigma2", "weight")].detach().numpy()
            ls2 = _ls2_like(theta, len(name))
            kept += int((np.clip(ls2 - np.log(theta.astype(np.float64) ** 2 + 1e-8), -8, 8) < 3).sum())
            params[name].data.copy_(torch.from_numpy(ls2))
        if fmt == "export":
            torch.export.save(ep, str(out))
            ref = ep.module()(torch.from_numpy(x)).detach().numpy()
        else:
            if fmt == "torchscript-resaved":
                # a plain torch.jit.save drops dropcli's sites record: the sites are still found
                torch.jit.save(ts, str(out))
                extra = ["--input-shape", "1x64"]
            else:
                torch.jit.save(ts, str(out), _extra_files=files)
            ref = ts(torch.from_numpy(x)).detach().numpy()
    small = tmp_path / f"small{out.suffix}"
    rep = json.loads(_cli("prune", out, "-o", small, "--json", *extra))
    rows = {r["layer"]: r for r in rep["layers"]}
    assert sum(r["weights_kept"] for r in rows.values() if r["weights_before"] != 32 * 10) == kept  # the head (fc3) has no site
    if fmt == "onnx":
        got = ort.InferenceSession(str(small)).run(None, {"x": x})[0]
    elif fmt == "export":
        got = torch.export.load(str(small)).module()(torch.from_numpy(x)).detach().numpy()
    else:
        got = torch.jit.load(str(small))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert rep["summary"]["weights_after"] < rep["summary"]["weights_before"]


def test_inject_train_prune_workflow(tmp_path):
    """The workflow the variant exists for, on the bundled digits MLP (TorchScript): inject,
    train with a plain user loop (no dropcli calls), re-save with torch.jit.save, prune."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)  # as train_digits.py
    out = tmp_path / "svd.pt"
    _cli("inject", ROOT / "examples" / "digits_mlp.pt", "--variant", "sparse-vd", "-o", out)
    m = torch.jit.load(str(out))
    for name, buf in m.named_buffers():
        if name.endswith("dropcli_mc"):
            buf.fill_(True)
    params = dict(m.named_parameters())
    sites = sorted({n.rsplit(".", 1)[0] for n in params if n.endswith("log_sigma2")})
    assert len(sites) == 2
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    epochs = 60
    for ep in range(epochs):
        beta = min(1.0, ep / (epochs / 2))
        for idx in torch.randperm(len(xt), generator=g).split(64):
            la = [torch.clamp(params[f"{s}.log_sigma2"] - torch.log(params[f"{s}.weight"] ** 2 + 1e-8), -8, 8) for s in sites]
            kl = sum(kl_sparse_vd(a).sum() for a in la)
            loss = nn.functional.cross_entropy(m(xt[idx]), yt[idx]) + beta * kl / len(xt)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.jit.save(m, str(out))
    small = tmp_path / "small.pt"
    rep = json.loads(_cli("prune", out, "-o", small, "--input-shape", "1x64", "--json"))
    site_rows = [r for r in rep["layers"] if r["weights_before"] in (64 * 128, 128 * 64)]
    before = sum(r["weights_before"] for r in site_rows)
    after = sum(r["weights_kept"] for r in site_rows)
    acc_dense = float((torch.jit.load(str(ROOT / "examples" / "digits_mlp.pt"))(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    acc_small = float((torch.jit.load(str(small))(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    print(f"sparse-vd workflow: {before} -> {after} weights ({before / after:.1f}x), acc {acc_dense:.4f} -> {acc_small:.4f}")
    assert before / after >= 10.0
    assert acc_small >= acc_dense - 0.02


def test_bad_input(tmp_path):
    from models import PoolCNN  # noqa: F401  (a model with Linear/Conv: the positive case is above)

    class Pool(nn.Module):
        def forward(self, x):
            return nn.functional.max_pool2d(x, 2)

    src = save_as(Pool(), torch.rand(2, 1, 8, 8), tmp_path / "pool.pt2", "export")
    r = runner.invoke(app, ["inject", str(src), "--variant", "sparse-vd", "-o", str(tmp_path / "o.pt2")])
    assert r.exit_code == 2 and "no Linear or Conv layer" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o.pt2").exists()
    _, out = _mlp_sites("export", tmp_path)
    for flag, value in (("--threshold", "9"), ("--threshold", "nan"), ("--log-sigma2", "1")):
        r = runner.invoke(app, ["inject", str(out), "--variant", "sparse-vd", flag, value, "-o", str(tmp_path / "o2.pt2")])
        assert r.exit_code == 2 and flag in r.output, r.output
        assert not (tmp_path / "o2.pt2").exists()
