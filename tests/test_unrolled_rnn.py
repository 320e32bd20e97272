"""The dynamo exporter writes an ``nn.RNN`` out step by step (a Tanh per step and layer, the
weights shared by all steps). The default selection keeps sites off the recurrent connections
(a site there would resample the state at every step) and puts them on the others."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from dropcli.backends.onnx.model import OnnxModel
from dropcli.backends.plan import plan_inject
from dropcli.model.selection import Selection
from dropcli.variants import get_variant

import pytest

from helpers import cli_split


def _unrolled(steps: int = 3) -> OnnxModel:
    """x [N, steps, 4] -> h_t = tanh(x_t Wih + h_{t-1} Whh) (Whh used through one Transpose, as
    the exporter writes it) -> y = h_last Wfc; plus a feed-forward branch tanh(x_0 Wff) -> Wfc2."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("Wih", (4, 5)), ("Whh", (5, 5)), ("Wfc", (5, 3)), ("Wff", (4, 5)), ("Wfc2", (5, 3)))]
    nodes = [helper.make_node("Transpose", ["Whh"], ["WhhT"], name="t_whh")]
    h = None
    for t in range(steps):
        inits.append(numpy_helper.from_array(np.array(t, dtype=np.int64), f"i{t}"))
        nodes += [helper.make_node("Gather", ["x", f"i{t}"], [f"x{t}"], axis=1, name=f"g{t}"),
                  helper.make_node("MatMul", [f"x{t}", "Wih"], [f"a{t}"], name=f"mi{t}")]
        if h is not None:
            nodes += [helper.make_node("MatMul", [h, "WhhT"], [f"r{t}"], name=f"mh{t}"),
                      helper.make_node("Add", [f"a{t}", f"r{t}"], [f"s{t}"], name=f"add{t}")]
        nodes.append(helper.make_node("Tanh", [f"s{t}" if h is not None else f"a{t}"], [f"h{t}"], name=f"tanh{t}"))
        h = f"h{t}"
    nodes += [helper.make_node("MatMul", [h, "Wfc"], ["y1"], name="fc"),
              helper.make_node("MatMul", ["x0", "Wff"], ["f"], name="ff"),
              helper.make_node("Tanh", ["f"], ["ft"], name="tanh_ff"),
              helper.make_node("MatMul", ["ft", "Wfc2"], ["y2"], name="fc2"),
              helper.make_node("Add", ["y1", "y2"], ["y"], name="out")]
    g = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return OnnxModel(m, "unrolled")


def test_default_sites_stay_off_the_recurrent_connections():
    model = _unrolled()
    notes: list[str] = []
    chosen = plan_inject(model, get_variant("standard"), Selection.from_options(None, None, None, False), notes)
    assert sorted(l.name for l in chosen) == ["tanh2", "tanh_ff"]  # the last step, and the feed-forward branch
    assert any("unrolled recurrence" in n and "tanh0" in n and "tanh1" in n for n in notes)
    # an explicit choice is the user's: no filtering
    explicit = plan_inject(model, get_variant("standard"), Selection.from_options(["tanh"], None, None, False), [])
    assert len(explicit) == 4


def test_cli_note(tmp_path):
    import onnx

    src = tmp_path / "rnn.onnx"
    onnx.save(_unrolled().model, str(src))
    res = cli_split("inject", src, "-o", tmp_path / "out.onnx")
    assert "unrolled recurrence" in res.stderr and "2 site(s)" in res.stderr + res.stdout
