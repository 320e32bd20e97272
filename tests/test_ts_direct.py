"""TorchScript read directly into an aten graph (dropcli/backends/torch/tsgraph.py), issue 17's
fixed cost and issue 14's TorchScript gaps.

The translated graph must give what the TorchScript module gives, at the traced batch and at
others (a trace's size arithmetic stays live); inputs keep the forward's names; what the
translation does not cover goes to torch's converter, and --debug says which route ran; a
TorchScript run never imports the converter (or dynamo) when the direct route reads it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dropcli.backends.torch.load import load_graph
from dropcli.backends.torch.tsgraph import Unsupported, translate, user_name
from tests.helpers import cli_split
from tests.models import CNN, MLP, LSTMNet, ResBlock, randomise_bn

REPO = Path(__file__).resolve().parents[1]


class Heads(nn.Module):
    """Multi-head reshapes as nn.MultiheadAttention writes them: a trace records batch x heads
    through prim::NumToTensor / aten::mul / aten::Int, which must follow the batch."""

    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.proj = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, tokens):
        b, s, d = tokens.shape
        h = self.proj(tokens).reshape(b * self.heads, s, d // self.heads)
        h = torch.softmax(h @ h.transpose(1, 2) / (d // self.heads) ** 0.5, -1) @ h
        return self.out(h.reshape(b, s, d).mean(1))


class Branchy(nn.Module):
    """Control flow: scripted, its graph holds prim::If (the converter's business)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return self.lin(-x)


class WritesWeight(nn.Module):
    """An in-place write into a buffer: translating it as a plain op would change the weight."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x):
        self.count.add_(1)
        return self.lin(x) + self.count


def _trace(model: nn.Module, *example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model.eval(), example)


def _names(ts) -> list[str]:
    return [a.name for a in ts.forward.schema.arguments[1:]]


CASES = {
    "MLP": (lambda: MLP(), lambda n: (torch.randn(n, 64),)),
    "CNN": (lambda: randomise_bn(CNN()), lambda n: (torch.randn(n, 1, 8, 8),)),
    "ResBlock": (lambda: randomise_bn(ResBlock()), lambda n: (torch.randn(n, 1, 8, 8),)),
    "LSTMNet": (lambda: LSTMNet(), lambda n: (torch.randn(n, 5, 8),)),
    "Heads": (lambda: Heads(), lambda n: (torch.randn(n, 6, 8),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_direct_graph_equals_the_torchscript_module_at_other_batch_sizes(name):
    torch.manual_seed(0)
    build, inputs = CASES[name]
    ts = _trace(build(), *inputs(2))
    gm = translate(ts, _names(ts))
    assert not any(n.op == "call_function" and "converter" in str(n.target) for n in gm.graph.nodes)
    for n in (2, 3, 7):
        x = inputs(n)
        with torch.no_grad():
            want, got = ts(*x), gm(*x)
        # the same aten kernels on the same inputs: equal (the TorchScript executor may fuse, so
        # allow float rounding, far below any real difference)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_size_arithmetic_stays_live_not_a_data_dependent_item():
    ts = _trace(Heads(), torch.randn(2, 6, 8))
    kinds = {n.kind() for n in ts.inlined_graph.nodes()}
    assert "prim::NumToTensor" in kinds and "aten::Int" in kinds  # the trace does hold the round trip
    gm = translate(ts, _names(ts))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("_local_scalar_dense" in t or "item" in t for t in targets), targets
    assert any("sym_size" in t for t in targets)


def test_inputs_keep_the_forwards_names():
    class Two(nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).float().sum(1, keepdim=True)

    ts = _trace(Two(), torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
    gm = translate(ts, _names(ts))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    assert user_name("input_ids.1") == "input_ids" and user_name("x.12") == "x" and user_name("a.b") == "a_b"


@pytest.mark.parametrize("model,why", [(Branchy(), "prim::If"), (WritesWeight(), "writes into the weight")])
def test_what_it_does_not_cover_goes_to_the_converter_and_says_so(tmp_path, caplog, model, why):
    ts = torch.jit.script(model.eval()) if isinstance(model, Branchy) else _trace(model, torch.randn(2, 4))
    with pytest.raises(Unsupported, match=why):
        translate(ts, _names(ts))
    path = tmp_path / "m.pt"
    torch.jit.save(ts, str(path))
    with caplog.at_level(logging.DEBUG, logger="dropcli"):
        got = load_graph(path, "torchscript", input_shape="2x4")
    text = caplog.text
    assert "cannot read it directly" in text and why in text and "torch._export.converter" in text
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = got.gm(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    ref = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x))


def test_debug_names_the_route(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.jit.save(_trace(MLP(), torch.randn(2, 64)), str(path))
    res = cli_split("--debug", "inspect", path)
    assert "read directly into an aten graph" in res.stderr
    assert "converter" not in res.stderr


def test_a_torchscript_uncertainty_run_imports_neither_the_converter_nor_dynamo(tmp_path):
    """The fixed cost issue 17 measured: importing torch._export.converter pulls in dynamo
    (about 2.5 s). One whole process, as a user runs it."""
    torch.manual_seed(0)
    path = tmp_path / "mlp.pt"
    torch.jit.save(_trace(MLP(p=0.3), torch.randn(2, 64)), str(path))
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, runpy\n"
        "sys.argv = ['dropcli', '--quiet', 'uncertainty', sys.argv[1], '--input', sys.argv[2], '-T', '4', "
        "'--seed', '0', '--output', sys.argv[3]]\n"
        "try:\n"
        "    runpy.run_module('dropcli.cli.main', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "bad = [m for m in ('torch._export.converter', 'torch._dynamo', 'sympy') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "o.npz")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "IMPORTED []" in r.stdout, r.stdout
    with np.load(tmp_path / "o.npz") as z:
        assert z["entropy"].shape == (5,)


def test_direct_and_converter_routes_give_identical_mc_samples():
    """The same seed gives bitwise the same MC samples whichever route read the file."""
    from dropcli.backends.torch.load import ts_to_fx
    from dropcli.engines.torch_mc import TorchMC

    torch.manual_seed(0)
    ts = _trace(MLP(p=0.3), torch.randn(2, 64))
    x = torch.randn(6, 64)
    direct = translate(ts, _names(ts))
    converted = ts_to_fx(ts, (x[:2],), Path("mlp.pt"))
    a = TorchMC(direct).run([x], list(range(6)), seed=3, T=5)
    b = TorchMC(converted).run([x], list(range(6)), seed=3, T=5)
    assert a.shape == (6, 5, 10)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], a[:, 1])  # it samples


def test_size_arithmetic_survives_pickling():
    """A pickled GraphModule is re-traced symbolically when loaded: the size arithmetic must have
    no Python branch (sizes' rounding-toward-zero division is written as floor division)."""
    import io

    ts = _trace(nn.MultiheadAttention(8, 2, batch_first=True), *(torch.randn(2, 5, 8),) * 3)
    gm = translate(ts, _names(ts))
    assert any(n.target is __import__("operator").floordiv for n in gm.graph.nodes)
    buf = io.BytesIO()
    torch.save(gm, buf)
    back = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # our own object, not a user's file
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x, x, x)[0], ts(x, x, x)[0], rtol=1e-6, atol=1e-6)


def test_parameters_stay_trainable_parameters():
    """Parameters come back as parameters with their requires_grad, buffers as buffers: a model
    written back from the graph (inject) trains like the input did (they had become frozen
    buffers, and a user's training loop after `inject --variant sparse-vd` learned nothing)."""
    torch.manual_seed(0)
    m = randomise_bn(CNN()).eval()
    ts = torch.jit.trace(m, torch.randn(2, 1, 8, 8))
    gm = translate(ts)
    want = {k: p.requires_grad for k, p in ts.named_parameters()}
    got = {k: p.requires_grad for k, p in gm.named_parameters()}
    assert got == want and all(want.values())
    assert {k for k, _ in gm.named_buffers()} >= {k for k, _ in ts.named_buffers() if "running" in k}
