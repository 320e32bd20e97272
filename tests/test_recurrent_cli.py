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

from helpers import cli
from models import GRUNet, LSTMNet, save_as



def _max_std(record: dict) -> float:
    return max(v for k, v in record.items() if k.startswith("std_"))


def _uncertainty(path: Path, x_path: Path) -> dict:
    res = cli("uncertainty", path, "--input", x_path, "-T", "16", "--seed", "3", "--json")
    return json.loads(res.stdout)


@pytest.mark.parametrize("variant,extra", [("variational", ["--tie", "untied"]), ("recurrent", ["--mask-per", "sequence"]),
                                           ("rnndrop", [])])
def test_inject_lstm_pt2_then_uncertainty(seqs, variant, extra):
    d, x = seqs
    torch.manual_seed(1)
    m = LSTMNet().eval()
    src = save_as(m, x, d / f"lstm_{variant}.pt2", "export")
    out = d / f"lstm_{variant}_mc.pt2"
    res = cli("inject", src, "--variant", variant, "--p", "0.3", *extra, "-o", out, "--json")
    done = json.loads(res.stdout)
    assert [s["variant"] for s in done["sites"]] == [variant]
    loaded = torch.export.load(str(out)).module()
    with torch.no_grad():
        assert torch.equal(loaded(x), m(x))  # inference mode is the fused layer itself
    rep = _uncertainty(out, d / "x.npy")
    again = _uncertainty(out, d / "x.npy")
    assert rep == again  # --seed: identical
    assert rep["summary"]["sites"] == 1
    assert all(_max_std(r) > 0 for r in rep["examples"])  # every example's samples vary
    listed = json.loads(cli("inspect", out, "--json").stdout)["layers"]
    assert any(l["kind"] == "dropout" and (l["dropout"] or {}).get("variant") == variant for l in listed), listed


def test_inject_gru_onnx_then_uncertainty(seqs):
    d, x = seqs
    torch.manual_seed(2)
    m = GRUNet().eval()
    src = save_as(m, x, d / "gru.onnx", "onnx")
    out = d / "gru_mc.onnx"
    cli("inject", src, "--variant", "variational", "--p", "0.2", "-o", out)
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
    res = cli("inject", src, "--variant", "rnndrop", "-o", d / "never.pt2", code=2)
    assert "no LSTM layer" in res.output and "Traceback" not in res.output
    assert not (d / "never.pt2").exists()
    names = {v["name"] for v in json.loads(cli("variants", "--json").stdout)}
    assert {"rnndrop", "recurrent", "variational"} <= names
    res = cli("inject", src, "--variant", "recurrent", "--mask-per", "token", "-o", d / "never.pt2", code=2)
    assert "--mask-per" in res.output


@pytest.mark.parametrize("variant", ["variational", "weightdrop"])
def test_torchscript_output_reloads(seqs, variant):
    """A recurrent site traces to prim::Loop, which TorchScript -> torch.export conversion can't read;
    dropcli keeps the torch.export program inside the TorchScript archive it writes, so its own
    output re-loads (inspect, uncertainty), and refuses the program once the archive was edited."""
    d, x = seqs
    torch.manual_seed(4)
    m = LSTMNet().eval()
    src = save_as(m, x, d / f"lstm_ts_{variant}.pt", "torchscript")
    out = d / f"lstm_ts_{variant}_mc.pt"
    cli("inject", src, "--input-shape", "2x5x8", "--variant", variant, "--p", "0.3", "-o", out)
    ts = torch.jit.load(str(out))
    with torch.no_grad():
        assert torch.allclose(ts(x), m(x), atol=1e-6)  # plain TorchScript, inference mode = the original
    listed = json.loads(cli("inspect", out, "--json").stdout)["layers"]
    assert [l["dropout"]["variant"] for l in listed if l["dropout"]] == [variant]
    rep = _uncertainty(out, d / "x.npy")
    assert rep == _uncertainty(out, d / "x.npy")
    assert all(_max_std(r) > 0 for r in rep["examples"])
    # the archive edited after dropcli wrote it (a weight changed, the extra files carried over)
    extra = {"dropcli_example_inputs.json": "", "dropcli_sites.json": "", "dropcli_program.pt2": ""}
    ts = torch.jit.load(str(out), _extra_files=extra)
    with torch.no_grad():
        ts.head.weight.add_(0.5)
    edited = d / f"lstm_ts_{variant}_edited.pt"
    torch.jit.save(ts, str(edited), _extra_files=extra)
    res = cli("inspect", edited, code=1)
    assert "no longer matches" in res.output and "Traceback" not in res.output


def test_gru_site_counts_once(seqs):
    """A GRU site has two outputs (sequence and state), each behind its own MC switch node: one site."""
    d, x = seqs
    src = save_as(GRUNet().eval(), x, d / "gru_count.pt2", "export")
    out = d / "gru_count_mc.pt2"
    cli("inject", src, "--variant", "variational", "-o", out)
    rep = _uncertainty(out, d / "x.npy")
    assert rep["summary"]["sites"] == 1
