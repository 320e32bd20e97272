"""Activations spelled as several ops are one layer, and sites go after the whole of them.

The site-after-pattern check is exact, not statistical: the model is ``x -> W1 -> act -> I``
(an identity last layer), so in MC mode every output unit is either exactly 0 (dropped) or
``act(h) / (1 - p)`` (kept). A site inside the pattern (after GPT-2's inner ``tanh``, say)
gives ``0.5 h`` for a dropped unit, which is neither.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dropcli.api.models import inject_sites
from dropcli.backends.onnx.model import OnnxModel
from dropcli.model.patterns import PATTERNS
from dropcli.model.selection import ACTIVATIONS
from tests.helpers import ort_session, run_onnx
from tests.zoo import VOCAB, RNNClassifier

P = 0.9
RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(8, 16)).astype(np.float32)
X = RNG.normal(size=(64, 8)).astype(np.float32) * 2.0
S2, S2PI = 1.0 / math.sqrt(2.0), math.sqrt(2.0 / math.pi)


def _gelu(h):
    return 0.5 * h * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))


def _gelu_tanh(h):
    return 0.5 * h * (1.0 + np.tanh(S2PI * (h + 0.044715 * h ** 3)))


def _relu6(h):
    return np.clip(h, 0.0, 6.0)


def _hardswish(h):
    return h * np.clip(h + 3.0, 0.0, 6.0) / 6.0


def _silu(h):
    return h / (1.0 + np.exp(-h))


# (label, kind, reference, [(op, inputs, attrs)] making "act" from "h"; "c:<v>" inputs are scalar constants)
ONNX_CASES = [
    ("gelu-div", "gelu", _gelu, [("Div", ["h", "c:1.4142135"], {}), ("Erf", ["t0"], {}), ("Add", ["t1", "c:1"], {}),
                                  ("Mul", ["h", "t2"], {}), ("Mul", ["t3", "c:0.5"], {})]),
    ("gelu-mul", "gelu", _gelu, [("Mul", ["c:0.5", "h"], {}), ("Mul", ["h", f"c:{S2}"], {}), ("Erf", ["t1"], {}),
                                  ("Add", ["c:1", "t2"], {}), ("Mul", ["t0", "t3"], {})]),
    ("gelu-tanh", "gelu", _gelu_tanh, [("Mul", ["h", "c:0.5"], {}), ("Pow", ["h", "c:3"], {}), ("Mul", ["t1", "c:0.044715"], {}),
                                        ("Add", ["h", "t2"], {}), ("Mul", ["t3", f"c:{S2PI}"], {}), ("Tanh", ["t4"], {}),
                                        ("Add", ["t5", "c:1"], {}), ("Mul", ["t0", "t6"], {})]),
    ("relu6", "relu6", _relu6, [("Clip", ["h", "c:0", "c:6"], {})]),
    ("hardswish-clip", "hardswish", _hardswish, [("Add", ["h", "c:3"], {}), ("Clip", ["t0", "c:0", "c:6"], {}),
                                                  ("Mul", ["h", "t1"], {}), ("Div", ["t2", "c:6"], {})]),
    ("hardswish-hs", "hardswish", _hardswish, [("HardSigmoid", ["h"], {"alpha": 1 / 6, "beta": 0.5}), ("Mul", ["h", "t0"], {})]),
    ("silu", "silu", _silu, [("Sigmoid", ["h"], {}), ("Mul", ["t0", "h"], {})]),
]


def _onnx_model(ops) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(np.eye(16, dtype=np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1/MatMul")]
    consts: dict[str, str] = {}
    for k, (op, ins, attrs) in enumerate(ops):
        names = []
        for i in ins:
            if i.startswith("c:"):
                if i not in consts:
                    consts[i] = f"const{len(consts)}"
                    inits.append(numpy_helper.from_array(np.array(float(i[2:]), np.float32), consts[i]))
                names.append(consts[i])
            else:
                names.append(i)
        out = "act" if k == len(ops) - 1 else f"t{k}"
        nodes.append(helper.make_node(op, names, [out], name=f"act/{op}_{k}", **attrs))
    nodes.append(helper.make_node("MatMul", ["act", "w2"], ["y"], name="fc2/MatMul"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _check_after_pattern(y: np.ndarray, act: np.ndarray, what: str) -> None:
    kept = y != 0.0
    assert 0.02 < kept.mean() < 0.3, f"{what}: kept fraction {kept.mean():.3f} for p={P}"
    # dropped units whose activation is not 0: a site inside the pattern would leave them nonzero
    assert ((~kept) & (np.abs(act) > 1e-2)).sum() > 200
    np.testing.assert_allclose(y[kept], act[kept] / (1 - P), rtol=2e-4, atol=2e-4, err_msg=what)


def test_every_pattern_kind_is_an_activation():
    assert {p.kind for p in PATTERNS} <= ACTIVATIONS


@pytest.mark.parametrize("label,kind,ref,ops", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_onnx_pattern_is_one_layer_and_site_goes_after_it(label, kind, ref, ops):
    om = OnnxModel(_onnx_model(ops))
    rows = [r for r in om.layers() if not r.is_input]
    assert [r.kind for r in rows] == ["linear", kind, "linear"], [(r.name, r.kind, r.op) for r in rows]
    assert rows[1].name == "act" and rows[1].op.startswith(kind.split("-")[0])
    h = X @ W1
    sess0 = ort_session(om.model)
    np.testing.assert_allclose(sess0.run(None, {"x": X})[0], ref(h), rtol=1e-4, atol=1e-5)  # the reference is right
    sites = inject_sites(om, "standard", p=P, after=kind)  # --after <kind> works, and the default selection too
    assert len(sites) == 1
    om.finalize()
    sess = ort_session(om.model)
    np.testing.assert_allclose(run_onnx(sess, X, mc=False), ref(h), rtol=1e-4, atol=1e-5)
    _check_after_pattern(run_onnx(sess, X, mc=True), ref(h), label)


def test_onnx_default_selection_finds_pattern():
    om = OnnxModel(_onnx_model(ONNX_CASES[2][3]))
    sites = inject_sites(om, "standard", p=0.5)
    assert len(sites) == 1


def test_onnx_pattern_with_escaping_inner_value_is_not_one_layer():
    """A value inside the chain read from outside (here the Erf output) means the ops are not
    one activation; they are left as they are."""
    ops = ONNX_CASES[0][3]
    m = _onnx_model(ops)
    m.graph.output.append(helper.make_tensor_value_info("t1", TensorProto.FLOAT, ["N", 16]))
    kinds = [r.kind for r in OnnxModel(m).layers()]
    assert "gelu" not in kinds and "erf" in kinds


class _NewGELU(nn.Module):  # transformers' gelu_new, written out as GPT-2 does
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _ErfGELU(nn.Module):
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class _HardSwish(nn.Module):
    def forward(self, x):
        return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


class _SiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _ReLU6(nn.Module):
    def forward(self, x):
        return torch.clamp(x, 0.0, 6.0)


TORCH_CASES = [("gelu-tanh", "gelu", _NewGELU, _gelu_tanh), ("gelu-erf", "gelu", _ErfGELU, _gelu),
               ("hardswish", "hardswish", _HardSwish, _hardswish), ("silu", "silu", _SiLU, _silu),
               ("relu6", "relu6", _ReLU6, _relu6)]


class _Net(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(8, 16, bias=False)
        self.act = act
        self.fc2 = nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.from_numpy(W1.T))
            self.fc2.weight.copy_(torch.eye(16))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("label,kind,act,ref", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_export_pattern_is_one_layer_and_site_goes_after_it(label, kind, act, ref, tmp_path):
    from dropcli.api.models import load

    net = _Net(act()).eval()
    ep = torch.export.export(net, (torch.from_numpy(X[:4]),))
    path = tmp_path / "m.pt2"
    torch.export.save(ep, str(path))
    m = load(path)
    rows = [r for r in m.layers() if not r.is_input]
    assert [r.kind for r in rows] == ["linear", kind, "linear"], [(r.name, r.kind, r.op) for r in rows]
    assert rows[1].name == "act"
    sites = inject_sites(m, "standard", p=P, after=kind)
    assert len(sites) == 1
    h = X @ W1
    with torch.no_grad():
        det = m(torch.from_numpy(X))
        np.testing.assert_allclose(det.numpy(), ref(h), rtol=1e-4, atol=1e-5)
        for mod in m.site_modules().values():
            mod.set_mc(True)
        torch.manual_seed(0)
        y = m(torch.from_numpy(X)).numpy()
    _check_after_pattern(y, ref(h), label)


# ------------------------------------------------------------------ the default selection's choices

class _WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.r1, self.drop = nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2)
        self.fc2, self.r2, self.fc3 = nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc3(self.r2(self.fc2(self.drop(self.r1(self.fc1(x))))))


def test_default_selection_without_activations_goes_after_the_recurrent_layer(tmp_path):
    from dropcli.api.models import load

    torch.manual_seed(0)
    net = RNNClassifier("lstm").eval()  # an embedding + LSTM text classifier: no activation anywhere
    ids = torch.randint(0, VOCAB, (4, 5))
    path = tmp_path / "rnn.onnx"
    torch.onnx.export(net, (ids,), str(path), dynamo=False, opset_version=17, input_names=["ids"],
                      dynamic_axes={"ids": {0: "batch"}})
    m = load(path)
    notes: list[str] = []
    sites = inject_sites(m, "standard", p=0.5, notes=notes)
    assert [s["kind"] for s in sites] == ["lstm"], sites
    assert len(notes) == 1 and "no activation" in notes[0] and "lstm" in notes[0]
    m.finalize()
    sess = ort_session(m.model)
    want = net(ids).detach().numpy()
    got = sess.run(None, {"ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # inference mode: the model as it was


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_default_selection_skips_layers_already_followed_by_dropout(tmp_path, fmt):
    from dropcli.api.models import load

    net = _WithDropout().eval()
    x = torch.randn(2, 8)
    path = tmp_path / f"m.{fmt}"
    if fmt == "onnx":  # exported in training mode, so its Dropout node stays in the graph
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    else:
        torch.export.save(torch.export.export(net.train(), (x,)), str(path))
    m = load(path)
    assert any(r.kind == "dropout" for r in m.layers())
    notes: list[str] = []
    sites = inject_sites(m, "standard", p=0.5, notes=notes)
    assert [s["at"] for s in sites] == ["r2"], sites
    assert len(notes) == 1 and "already followed by dropout" in notes[0] and "r1" in notes[0]
    # an explicit selection is taken as given
    m2 = load(path)
    assert len(inject_sites(m2, "standard", p=0.5, after="relu", notes=[])) == 2
    # when every layer the default selection finds has dropout after it, that dropout is swapped
    # for the variant (keeping its p), as --replace does, and said so
    m3 = load(path)
    notes = []
    sites = inject_sites(m3, "standard", exclude="r2", notes=notes)
    assert len(sites) == 1 and sites[0]["was_p"] == pytest.approx(0.2) and sites[0]["p"] == pytest.approx(0.2), sites
    assert len(notes) == 1 and "swapped for standard" in notes[0]
    assert [r.dropout_variant for r in m3.layers() if r.kind == "dropout"] == ["standard"]
