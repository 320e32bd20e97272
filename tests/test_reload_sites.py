"""dropcli's own outputs, re-loaded: sites are recognised, replaceable and removable."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dropcli.cli.main import app
from models import MLP, save_as

runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.stdout


def _inspect(path):
    return json.loads(_cli("inspect", path, "--json"))["layers"]


def _run(path, fmt, x):
    if fmt == "onnx":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        return ort.InferenceSession(str(path), so).run(None, {"x": x.numpy()})[0]
    m = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        return m(x).numpy()


@pytest.mark.parametrize("fmt,ext", [("export", "pt2"), ("torchscript", "pt"), ("onnx", "onnx")])
def test_reload_replace_remove(fmt, ext, tmp_path):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.rand(5, 64)
    src = save_as(model, torch.rand(2, 64), tmp_path / f"m.{ext}", fmt)
    with torch.no_grad():
        ref = model(x).numpy()

    a = tmp_path / f"a.{ext}"
    _cli("inject", src, "--variant", "standard", "--p", "0.25", "-o", a)
    sites = [l for l in _inspect(a) if l["dropout"]]
    assert [s["dropout"] for s in sites] == [{"variant": "standard", "p": 0.25}] * 2
    assert all(l["kind"] != "randlike" for l in _inspect(a)), "site internals leaked into inspect"

    # replace keeps each site's p; vanilla scales by q = 0.75 at test time
    b = tmp_path / f"b.{ext}"
    _cli("inject", a, "--replace", "--variant", "vanilla", "-o", b)
    sites_b = [l for l in _inspect(b) if l["dropout"]]
    assert [s["dropout"] for s in sites_b] == [{"variant": "vanilla", "p": 0.25}] * 2
    with torch.no_grad():
        h = torch.relu(model.fc1(x)) * 0.75
        want = model.fc3(torch.relu(model.fc2(h)) * 0.75).numpy()
    np.testing.assert_allclose(_run(b, fmt, x), want, rtol=1e-5, atol=1e-6)

    # remove gives back the original function and no dropout rows
    c = tmp_path / f"c.{ext}"
    _cli("inject", b, "--remove", "-o", c)
    assert not any(l["dropout"] for l in _inspect(c))
    np.testing.assert_allclose(_run(c, fmt, x), ref, rtol=1e-6, atol=1e-6)

    # injecting again into an output numbers new sites after the old ones
    d = tmp_path / f"d.{ext}"
    out = json.loads(_cli("inject", a, "--variant", "standard", "--p", "0.1", "--after", "linear", "-o", d, "--json"))
    assert {s["site"] for s in out["sites"]}.isdisjoint({s["name"] for s in sites})
