"""The recurrent family end to end through the CLI: `dropcli inject` replaces LSTM/GRU layers
(torch formats and ONNX), the written model equals the original in inference mode, and
`dropcli uncertainty` samples it reproducibly. The math and statistics are in test_recurrent.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dropcli.cli.main import app
from models import GRUNet, LSTMNet, save_as

runner = CliRunner()


def _invoke(args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, (args, res.output)
    return res


@pytest.fixture(scope="module")
def seqs(tmp_path_factory):
    d = tmp_path_factory.mktemp("rnn_cli")
    torch.manual_seed(0)
    x = torch.randn(6, 5, 8)
    np.save(d / "x.npy", x.numpy())
    return d, x


def _max_std(record: dict) -> float:
    return max(v for k, v in record.items() if k.startswith("std_"))


def _uncertainty(path: Path, x_path: Path) -> dict:
    res = _invoke(["uncertainty", path, "--input", x_path, "-T", "16", "--seed", "3", "--json"])
    return json.loads(res.stdout)


@pytest.mark.parametrize("variant,extra", [("variational", ["--tie", "untied"]), ("recurrent", ["--mask-per", "sequence"]),
                                           ("rnndrop", [])])
def test_inject_lstm_pt2_then_uncertainty(seqs, variant, extra):
    d, x = seqs
    torch.manual_seed(1)
    m = LSTMNet().eval()
    src = save_as(m, x, d / f"lstm_{variant}.pt2", "export")
    out = d / f"lstm_{variant}_mc.pt2"
    res = _invoke(["inject", src, "--variant", variant, "--p", "0.3", *extra, "-o", out, "--json"])
    done = json.loads(res.stdout)
    assert [s["variant"] for s in done["sites"]] == [variant]
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))  # inference mode is the fused layer itself
    rep = _uncertainty(out, d / "x.npy")
    again = _uncertainty(out, d / "x.npy")
    assert rep == again  # --seed: identical
    assert all(_max_std(r) > 0 for r in rep["examples"])  # every example's samples vary
    listed = json.loads(_invoke(["inspect", out, "--json"]).stdout)["layers"]
    assert any(l["kind"] == "dropout" and (l["dropout"] or {}).get("variant") == variant for l in listed), listed


def test_inject_gru_onnx_then_uncertainty(seqs):
    d, x = seqs
    torch.manual_seed(2)
    m = GRUNet().eval()
    src = save_as(m, x, d / "gru.onnx", "onnx")
    out = d / "gru_mc.onnx"
    _invoke(["inject", src, "--variant", "variational", "--p", "0.2", "-o", out])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    want = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    got = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(got, want)
    rep = _uncertainty(out, d / "x.npy")
    assert rep == _uncertainty(out, d / "x.npy")
    assert all(_max_std(r) > 0 for r in rep["examples"])


def test_rnndrop_refuses_gru_and_lists_variants(seqs):
    d, x = seqs
    src = save_as(GRUNet().eval(), x, d / "gru_only.pt2", "export")
    res = _invoke(["inject", src, "--variant", "rnndrop", "-o", d / "never.pt2"], code=2)
    assert "no LSTM layer" in res.output and "Traceback" not in res.output
    assert not (d / "never.pt2").exists()
    names = {v["name"] for v in json.loads(_invoke(["variants", "--json"]).stdout)}
    assert {"rnndrop", "recurrent", "variational"} <= names
    res = _invoke(["inject", src, "--variant", "recurrent", "--mask-per", "token", "-o", d / "never.pt2"], code=2)
    assert "--mask-per" in res.output
