"""`dropcli convert`: inverted <-> vanilla keeps the eval output (1e-5) and the MC
distribution, on torch (nn.Dropout, dropcli sites, through flatten and max-pool) and ONNX
(Dropout nodes, dropcli sites); refuses across a nonlinearity, naming the op."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dropcli.backends import load_model
from dropcli.engines.runner import run_mc
from dropcli.engines.factory import make_runner
from helpers import cli
from models import MLP, save_as

T = 256




def _mc(path: Path, x: np.ndarray, seed: int, T: int = T):
    m = load_model(str(path))
    r = make_runner(m, "cpu")
    return run_mc(r, [x], T, seed)


def _check_same(a: Path, b: Path, x: np.ndarray):
    ra, rb = _mc(a, x, 0), _mc(b, x, 0)
    # eval output unchanged
    assert np.abs(ra.eval - rb.eval).max() <= 1e-5 * (1 + np.abs(ra.eval).max())
    # MC distribution, statistically across independent seeds (a saved dropcli site draws its
    # mask from other random ops than stock dropout, so samples are not paired): per-output MC
    # means agree within 6 s.e. of the difference
    rc = _mc(b, x, 1)
    sd = np.sqrt(ra.samples.var(0) + rc.samples.var(0))
    bound = 6 * sd / math.sqrt(T) + 1e-6
    assert (np.abs(ra.samples.mean(0) - rc.samples.mean(0)) <= bound).all()
    # variances agree too: the relative s.e. of a sample variance is about sqrt(2/T) for near-normal sums
    va, vc = ra.samples.var(0), rc.samples.var(0)
    big = va > 1e-6
    assert np.median(np.abs(vc[big] / va[big] - 1)) <= 6 * math.sqrt(2 / T)


class Pooled(nn.Module):
    """conv -> relu -> dropout -> maxpool -> flatten -> linear: q moves through max-pool and flatten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.drop(torch.relu(self.conv(x)))), 1))


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_torch_stock_dropout_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    model = MLP(d_in=16, hidden=24, d_out=6, p=0.35)
    x = torch.randn(40, 16)
    src = save_as(model, x[:1], tmp_path / ("m.pt" if fmt == "torchscript" else "m.pt2"), fmt)
    v = tmp_path / ("v" + src.suffix)
    rep = json.loads(cli("--quiet", "convert", src, "--to", "vanilla", "-o", v, "--json").stdout)
    assert [r["weight_factor"] for r in rep["converted"]] == [pytest.approx(1 / 0.65)]
    info = json.loads(cli("inspect", v, "--json").stdout)
    assert [l["convention"] for l in info["layers"] if l["kind"] == "dropout"] == ["vanilla"]
    _check_same(src, v, x.numpy())
    back = tmp_path / ("i" + src.suffix)
    cli("--quiet", "convert", v, "--to", "inverted", "-o", back)
    info = json.loads(cli("inspect", back, "--json").stdout)
    assert [l["convention"] for l in info["layers"] if l["kind"] == "dropout"] == ["inverted"]
    _check_same(src, back, x.numpy())


def test_torch_through_maxpool_and_flatten(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(32, 1, 8, 8)
    src = save_as(Pooled(), x[:1], tmp_path / "p.pt2", "export")
    v = tmp_path / "v.pt2"
    cli("--quiet", "convert", src, "--to", "vanilla", "-o", v)
    _check_same(src, v, x.numpy())


def test_torch_dropcli_sites_and_refusal(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(40, 16)
    plain = save_as(MLP(d_in=16, hidden=24, d_out=6), x[:1], tmp_path / "plain.pt", "torchscript")
    # a dropcli standard site after the hidden ReLU: converts
    inj = tmp_path / "inj.pt"
    cli("--quiet", "inject", plain, "--variant", "standard", "--p", "0.25", "--layers", "relu", "-o", inj)
    v = tmp_path / "v.pt"
    cli("--quiet", "convert", inj, "--to", "vanilla", "-o", v)
    _check_same(inj, v, x.numpy())
    # a site after a Linear is followed by a ReLU: refused, the op named, nothing written
    bad = tmp_path / "bad.pt"
    cli("--quiet", "inject", plain, "--variant", "standard", "--p", "0.25", "--after", "linear", "--layers", "fc2", "-o", bad)
    out = tmp_path / "never.pt"
    r = cli("--quiet", "convert", bad, "--to", "vanilla", "-o", out, code=1)
    assert r.stderr.count("\n") == 1 and "relu" in r.stderr.lower() and "not linear" in r.stderr
    assert not out.exists()
    # no dropout at all
    r = cli("--quiet", "convert", plain, "--to", "vanilla", "-o", out, code=1)
    assert "no dropout sites" in r.stderr and not out.exists()
    cli("--quiet", "convert", inj, "--to", "sideways", "-o", out, code=2)
    # non-Bernoulli variants have no convention
    g = tmp_path / "g.pt"
    cli("--quiet", "inject", plain, "--variant", "gaussian", "--p", "0.25", "--layers", "relu", "-o", g)
    r = cli("--quiet", "convert", g, "--to", "vanilla", "-o", out, code=1)
    assert "gaussian" in r.stderr and not out.exists()


def _onnx_mlp(path: Path, after_dropout: str = "MatMul") -> Path:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 24)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(24, 6)).astype(np.float32), "w2")
    c = numpy_helper.from_array(rng.normal(size=(6,)).astype(np.float32), "c")
    ratio = numpy_helper.from_array(np.array(0.3, np.float32), "ratio")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act1"),
             helper.make_node("Dropout", ["a", "ratio"], ["d"], name="drop")]
    if after_dropout == "MatMul":
        nodes += [helper.make_node("MatMul", ["d", "w2"], ["m"], name="fc2"), helper.make_node("Add", ["m", "c"], ["y"], name="bias")]
    else:
        nodes += [helper.make_node("Tanh", ["d"], ["t"], name="squash"), helper.make_node("MatMul", ["t", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])], [w1, w2, c, ratio])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(path))
    return path


def test_onnx_dropout_nodes_round_trip_and_refusal(tmp_path):
    src = _onnx_mlp(tmp_path / "m.onnx")
    x = np.random.default_rng(3).normal(size=(40, 16)).astype(np.float32)
    v = tmp_path / "v.onnx"
    cli("--quiet", "convert", src, "--to", "vanilla", "-o", v)
    info = json.loads(cli("inspect", v, "--json").stdout)
    assert [l["convention"] for l in info["layers"] if l["kind"] == "dropout"] == ["vanilla"]
    _check_same(src, v, x)
    back = tmp_path / "i.onnx"
    cli("--quiet", "convert", v, "--to", "inverted", "-o", back)
    _check_same(src, back, x)
    bad = _onnx_mlp(tmp_path / "bad.onnx", "Tanh")
    out = tmp_path / "never.onnx"
    r = cli("--quiet", "convert", bad, "--to", "vanilla", "-o", out, code=1)
    assert "Tanh" in r.stderr and r.stderr.count("\n") == 1 and not out.exists()


def test_torch_and_onnx_agree_after_convert(tmp_path):
    """The same converted model in both backends: exact eval, same MC samples for the seed."""
    torch.manual_seed(4)
    model = MLP(d_in=16, hidden=24, d_out=6, p=0.2)
    x = torch.randn(40, 16)
    src = save_as(model, x[:1], tmp_path / "m.pt", "torchscript")
    v = tmp_path / "v.onnx"
    cli("--quiet", "convert", src, "--to", "vanilla", "-o", v, "--format", "onnx")
    vt = tmp_path / "v.pt"
    cli("--quiet", "convert", src, "--to", "vanilla", "-o", vt)
    _check_same(vt, v, x.numpy())
