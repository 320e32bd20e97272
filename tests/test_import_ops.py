"""The ONNX importer's ops for transformer and recurrent graphs (issues 14, 15), each in a tiny
hand-built graph against onnxruntime on random inputs.

Every graph has a dynamic batch (and, where it has one, sequence) axis, and is imported once and
then run at two input sizes: an importer that baked the sizes it saw into the graph (a Reshape
to [2, 8, ...], an arange of length 8) fails the second. Shape arithmetic must stay symbolic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dropcli.backends.torch.importer import ONNX_OPS, from_onnx
from dropcli.errors import DropcliError

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
RNG = np.random.default_rng(7)


def _f(*s: int) -> np.ndarray:
    return RNG.standard_normal(s).astype(np.float32)


def _c(name: str, v: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v), name)


def _i64(v: Any) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


class Case:
    """A graph: ``inputs`` name -> (elem type, symbolic shape, maker(n, s) -> array), outputs
    name -> elem type."""

    def __init__(self, nodes, inputs, outputs, inits=(), sizes=((2, 5), (3, 7))):
        self.nodes, self.inputs, self.outputs, self.inits, self.sizes = nodes, inputs, outputs, list(inits), sizes

    def model(self) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(k, t, shape) for k, (t, shape, _) in self.inputs.items()]
        outs = [helper.make_tensor_value_info(k, t, None) for k, t in self.outputs.items()]
        m = helper.make_model(helper.make_graph(self.nodes, "g", ins, outs, self.inits),
                              opset_imports=[helper.make_opsetid("", 18)])
        return m  # (outputs without a shape, which onnx.checker wants: onnxruntime checks the graph)


def _x(*dims):  # a float input of shape [N, S, dims...]
    return lambda n, s: _f(n, s, *dims)


def _ids(vocab):
    return lambda n, s: RNG.integers(0, vocab, (n, s)).astype(np.int64)


def node(op, ins, outs, **kw):
    return helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], name=f"/m/{op}_{outs if isinstance(outs, str) else outs[0]}", **kw)


X3 = {"x": (F, ["N", "S", 6], _x(6))}  # [N, S, 6]


def _shape_reshape() -> Case:
    # x [N, S, 6] -> [N, S, 2, 3] through Shape/Gather/Unsqueeze/Concat (the exporters' reshape)
    return Case([node("Shape", ["x"], "sh"), node("Gather", ["sh", "i0"], "n", axis=0), node("Gather", ["sh", "i1"], "s", axis=0),
                 node("Unsqueeze", ["n", "ax0"], "n1"), node("Unsqueeze", ["s", "ax0"], "s1"),
                 node("Concat", ["n1", "s1", "tail"], "shape", axis=0), node("Reshape", ["x", "shape"], "y"),
                 node("Shape", ["x"], "y2", start=1, end=-1)],  # a Shape slice, as an output (made a tensor)
                X3, {"y": F, "y2": I64}, [_c("i0", _i64(0)), _c("i1", _i64(1)), _c("ax0", _i64([0])), _c("tail", _i64([2, 3]))])


def _shape_arith() -> Case:
    # [N, S, 6] -> [N * S / 2 (rounded toward zero), -1] with Mul/Div on sizes; 0 keeps a dim
    return Case([node("Shape", ["x"], "sh"), node("Slice", ["sh", "st", "en"], "ns"),
                 node("ReduceProd", ["ns"], "ns_prod", keepdims=1), node("Div", ["ns_prod", "two"], "half"),
                 node("Sub", ["half", "zero"], "half2"), node("Concat", ["half2", "m1"], "shape", axis=0),
                 node("Reshape", ["x", "shape"], "y"), node("Reshape", ["x", "keep"], "y2"),
                 # x[:, 1:S-1] with S read from the input (a causal mask's slice)
                 node("Slice", ["sh", "one", "two"], "s1"), node("Sub", ["s1", "one"], "end"),
                 node("Slice", ["x", "one", "end", "one"], "y3")],
                X3, {"y": F, "y2": F, "y3": F},
                [_c("st", _i64([0])), _c("en", _i64([2])), _c("two", _i64([2])), _c("zero", _i64([0])), _c("m1", _i64([-1])),
                 _c("one", _i64([1])),
                 _c("keep", _i64([0, -1]))], sizes=((2, 4), (3, 6)))


def _flatten() -> Case:
    return Case([node("Flatten", ["x"], "y", axis=2), node("Flatten", ["x"], "y2", axis=0)], X3, {"y": F, "y2": F})


def _gather() -> Case:
    # an embedding lookup (a constant table, computed ids), a take along axis 1 with a negative
    # index, a scalar index, and indices from an input
    return Case([node("Gather", ["table", "ids"], "emb"), node("Gather", ["x", "idx"], "take", axis=1),
                 node("Gather", ["x", "one"], "sel", axis=2), node("Gather", ["x", "ids2"], "dyn", axis=2)],
                {"x": X3["x"], "ids": (I64, ["N", "S"], _ids(10)), "ids2": (I64, ["K"], lambda n, s: _i64([5, -1, 0]))},
                {"emb": F, "take": F, "sel": F, "dyn": F},
                [_c("table", _f(10, 4)), _c("idx", _i64([[0, -1], [1, 0]])), _c("one", _i64(-2))])


def _gather_elements_nd() -> Case:
    idx = lambda n, s: RNG.integers(-6, 6, (n, s, 3)).astype(np.int64)  # noqa: E731
    nd = lambda n, s: np.stack([RNG.integers(0, n, (4,)), RNG.integers(-s, s, (4,))], -1).astype(np.int64)  # noqa: E731
    nd_b = lambda n, s: RNG.integers(0, s, (n, 2, 1)).astype(np.int64)  # noqa: E731
    return Case([node("GatherElements", ["x", "idx"], "ge", axis=2), node("GatherND", ["x", "nd"], "gnd"),
                 node("GatherND", ["x", "ndb"], "gndb", batch_dims=1)],
                {"x": X3["x"], "idx": (I64, ["N", "S", 3], idx), "nd": (I64, [4, 2], nd), "ndb": (I64, ["N", 2, 1], nd_b)},
                {"ge": F, "gnd": F, "gndb": F})


def _expand_constant_of_shape_range() -> Case:
    # the exporters' masks and position ids: Expand to a computed shape (both ways broadcast),
    # ConstantOfShape of a computed shape, Range up to the sequence length (int and float)
    return Case([node("Shape", ["x"], "sh"), node("Gather", ["sh", "i1"], "s"),
                 node("Range", ["zero", "s", "one"], "pos"),
                 node("Slice", ["sh", "st", "en"], "n1"), node("Concat", ["n1", "three", "ones"], "eshape", axis=0),
                 node("Expand", ["row", "eshape"], "exp"),
                 node("ConstantOfShape", ["sh"], "full", value=helper.make_tensor("v", I64, [1], [1])),
                 node("ConstantOfShape", ["n1"], "fullf"),
                 node("Cast", ["s"], "sf", to=F), node("Range", ["half", "sf", "quarter"], "posf")],
                X3, {"pos": I64, "exp": F, "full": I64, "fullf": F, "posf": F},
                [_c("i1", _i64(1)), _c("zero", _i64(0)), _c("one", _i64(1)), _c("st", _i64([0])), _c("en", _i64([1])),
                 _c("three", _i64([3])), _c("ones", _i64([1])), _c("row", _f(1, 4)), _c("half", np.float32(0.5)),
                 _c("quarter", np.float32(0.25))])


def _logic() -> Case:
    def x_nan(n, s):
        v = _f(n, s, 6)
        v[0, 0, :3] = [np.nan, np.inf, -np.inf]
        return v
    return Case([node("Equal", ["ids", "c2"], "eq"), node("Greater", ["x", "c0"], "gt"), node("Less", ["x", "c0"], "lt"),
                 node("GreaterOrEqual", ["ids", "c2"], "ge"), node("LessOrEqual", ["ids", "c2"], "le"),
                 node("And", ["gt", "lt"], "and_"), node("Or", ["gt", "lt"], "or_"), node("Xor", ["gt", "lt"], "xor_"),
                 node("Not", ["gt"], "not_"), node("IsNaN", ["x"], "nan"), node("IsInf", ["x"], "inf"),
                 node("IsInf", ["x"], "pinf", detect_negative=0), node("Where", ["gt", "x", "cm"], "wh"),
                 node("Max", ["x", "c0", "cm"], "mx"), node("Min", ["x", "row"], "mn")],
                {"x": (F, ["N", "S", 6], x_nan), "ids": (I64, ["N", "S"], _ids(4))},
                {"eq": B, "gt": B, "lt": B, "ge": B, "le": B, "and_": B, "or_": B, "xor_": B, "not_": B, "nan": B, "inf": B,
                 "pinf": B, "wh": F, "mx": F, "mn": F},
                [_c("c2", _i64(2)), _c("c0", np.float32(0)), _c("cm", np.float32(-0.5)), _c("row", _f(6))])


def _cumsum_split() -> Case:
    return Case([node("CumSum", ["x", "ax"], "cs"), node("CumSum", ["x", "ax"], "cse", exclusive=1),
                 node("CumSum", ["x", "ax"], "csr", reverse=1), node("CumSum", ["x", "ax"], "csre", exclusive=1, reverse=1),
                 node("Split", ["x", "parts"], ["p0", "p1"], axis=2), node("Split", ["x"], ["q0", "q1", "q2", "q3"], axis=2, num_outputs=4)],
                X3, {k: F for k in ("cs", "cse", "csr", "csre", "p0", "p1", "q0", "q1", "q2", "q3")},
                [_c("ax", _i64(1)), _c("parts", _i64([2, 4]))])


_REDUCE = ("ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceMax", "ReduceMin", "ReduceLogSumExp", "ReduceProd")


def _reduce() -> Case:
    nodes, outs = [], {}
    for op in _REDUCE:
        k = op[6:].lower()
        nodes += [node(op, ["x", "ax"], f"{k}_a", keepdims=0), node(op, ["x", "ax2"], f"{k}_b"), node(op, ["x"], f"{k}_all", keepdims=0)]
        outs.update({f"{k}_a": F, f"{k}_b": F, f"{k}_all": F})
    return Case(nodes, {"x": (F, ["N", "S", 6], lambda n, s: RNG.uniform(0.5, 1.5, (n, s, 6)).astype(np.float32))}, outs,
                [_c("ax", _i64([-1])), _c("ax2", _i64([0, 2]))])


def _matmul_div() -> Case:
    # attention's product of two computed values, batched; integer Div truncates toward zero
    return Case([node("Transpose", ["x"], "xt", perm=[0, 2, 1]), node("MatMul", ["x", "xt"], "att"),
                 node("Div", ["ids", "c3"], "q"), node("Constant", [], "k", value_ints=[1, 2, 3, 4, 5, 6]),
                 node("Cast", ["k"], "kf", to=F), node("Add", ["x", "kf"], "xk")],
                {"x": X3["x"], "ids": (I64, ["N", "S"], lambda n, s: RNG.integers(-9, 9, (n, s)).astype(np.int64))},
                {"att": F, "q": I64, "xk": F}, [_c("c3", _i64(3))])


def _rnn_inits(op: str, ndir: int, d_in: int, h: int, zero_bias: bool = False) -> list:
    g = 4 if op == "LSTM" else 3
    b = np.zeros((ndir, 2 * g * h), np.float32) if zero_bias else _f(ndir, 2 * g * h)
    return [_c(f"{op}_W", _f(ndir, g * h, d_in) * 0.5), _c(f"{op}_R", _f(ndir, g * h, h) * 0.5), _c(f"{op}_B", b)]


def _lstm() -> Case:
    h = 5
    seq = lambda n, s: _f(s, n, 6)  # noqa: E731  [seq, batch, in] (layout 0)
    state = lambda n, s: _f(2, n, h)  # noqa: E731
    return Case([node("LSTM", ["xs", "LSTM_W", "LSTM_R", "LSTM_B", "", "h0", "c0"], ["Y", "Yh", "Yc"], hidden_size=h,
                      direction="bidirectional"),
                 node("LSTM", ["xs", "LSTM_W1", "LSTM_R1", "", "", "h1"], ["Y1", "", "Yc1"], hidden_size=h)],
                {"xs": (F, ["S", "N", 6], seq), "h0": (F, [2, "N", h], state), "c0": (F, [2, "N", h], state),
                 "h1": (F, [1, "N", h], lambda n, s: _f(1, n, h))},
                {"Y": F, "Yh": F, "Yc": F, "Y1": F, "Yc1": F},
                _rnn_inits("LSTM", 2, 6, h) + [_c("LSTM_W1", _f(1, 4 * h, 6)), _c("LSTM_R1", _f(1, 4 * h, h))])


def _gru() -> Case:
    h = 4
    return Case([node("GRU", ["xs", "GRU_W", "GRU_R", "GRU_B"], ["Y", "Yh"], hidden_size=h, direction="bidirectional",
                      linear_before_reset=1),
                 node("GRU", ["xs", "GRU_W1", "GRU_R1", "", "", "hs"], ["Y1", "Yh1"], hidden_size=h, linear_before_reset=1)],
                {"xs": (F, ["S", "N", 6], lambda n, s: _f(s, n, 6)), "hs": (F, [1, "N", h], lambda n, s: _f(1, n, h))},
                {"Y": F, "Yh": F, "Y1": F, "Yh1": F},
                _rnn_inits("GRU", 2, 6, h) + [_c("GRU_W1", _f(1, 3 * h, 6)), _c("GRU_R1", _f(1, 3 * h, h))])


def _rnn() -> Case:
    # plain RNNs: tanh both ways (no bias, no state), and relu forward from a given state
    h = 4
    return Case([node("RNN", ["xs", "RNN_W", "RNN_R"], ["Y", "Yh"], hidden_size=h, direction="bidirectional"),
                 node("RNN", ["xs", "RNN_W1", "RNN_R1", "RNN_B1", "", "hs"], ["Y1", "Yh1"], hidden_size=h, activations=["Relu"])],
                {"xs": (F, ["S", "N", 6], lambda n, s: _f(s, n, 6)), "hs": (F, [1, "N", h], lambda n, s: _f(1, n, h))},
                {"Y": F, "Yh": F, "Y1": F, "Yh1": F},
                [_c("RNN_W", _f(2, h, 6) * 0.5), _c("RNN_R", _f(2, h, h) * 0.5), _c("RNN_W1", _f(1, h, 6) * 0.5),
                 _c("RNN_R1", _f(1, h, h) * 0.5), _c("RNN_B1", _f(1, 2 * h))])


def _instance_norm() -> Case:
    # a GroupNorm(2 groups, 6 channels) as the exporters write it: Reshape [N, 2, -1] ->
    # InstanceNormalization (scale 1, bias 0) -> Reshape back -> Mul gamma -> Add beta; and a
    # plain instance norm over [N, C=S, 6] with its own scale and bias
    return Case([node("Reshape", ["x", "grp"], "xg"), node("InstanceNormalization", ["xg", "one2", "zero2"], "ng", epsilon=1e-5),
                 node("Reshape", ["ng", "back"], "nb"), node("Mul", ["nb", "gamma"], "nm"), node("Add", ["nm", "beta"], "gn"),
                 node("InstanceNormalization", ["x", "sc", "bi"], "inn", epsilon=1e-3)],
                {"x": (F, ["N", 5, 6], lambda n, s: _f(n, 5, 6) * 3 + 1)}, {"gn": F, "inn": F},
                [_c("grp", _i64([0, 2, -1])), _c("one2", np.ones(2, np.float32)), _c("zero2", np.zeros(2, np.float32)),
                 _c("back", _i64([0, 5, 6])), _c("gamma", _f(5, 1)), _c("beta", _f(5, 1)), _c("sc", _f(5)), _c("bi", _f(5))])


# op -> the case that exercises it (the ops of tests/test_importer.py's table test are the others)
CASES = {
    "Shape": _shape_reshape, "Gather": _gather, "GatherElements": _gather_elements_nd, "GatherND": _gather_elements_nd,
    "Expand": _expand_constant_of_shape_range, "ConstantOfShape": _expand_constant_of_shape_range,
    "Range": _expand_constant_of_shape_range, **{op: _logic for op in (
        "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Not", "IsNaN", "IsInf", "Where", "Max", "Min")},
    "CumSum": _cumsum_split, "Split": _cumsum_split, **{op: _reduce for op in _REDUCE}, "LSTM": _lstm, "GRU": _gru,
    "InstanceNormalization": _instance_norm, "RNN": _rnn,
}
EXTRA = {"shape-arith": _shape_arith, "flatten": _flatten, "matmul-div-constant": _matmul_div}
BUILDERS = sorted(set(CASES.values()) | set(EXTRA.values()), key=lambda f: f.__name__)


def _run_both(case: Case, gm, n: int, s: int) -> None:
    m = case.model()
    feed = {k: mk(n, s) for k, (_, _, mk) in case.inputs.items()}
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    with torch.no_grad():
        got = gm(*(torch.from_numpy(v) for v in feed.values()))
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(want)
    for name, g, w in zip(case.outputs, got, want):
        g = g.numpy()
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"output {name} at n={n} s={s}")


@pytest.mark.parametrize("build", BUILDERS, ids=[b.__name__.strip("_") for b in BUILDERS])
def test_op_matches_onnxruntime_at_two_sizes(build):
    case = build()
    gm = from_onnx(case.model())  # imported once ...
    for n, s in case.sizes:  # ... run at two batch sizes and sequence lengths
        _run_both(case, gm, n, s)


def test_every_new_op_is_in_the_table_and_covered():
    assert set(CASES) <= set(ONNX_OPS)
    for op, build in CASES.items():
        assert any(nd.op_type == op for nd in build().nodes), op


def test_recurrent_nodes_become_torch_modules_in_torch_gate_order():
    case = _lstm()
    gm = from_onnx(case.model())
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert [type(m) for m in mods] == [nn.LSTM, nn.LSTM] and mods[0].bidirectional and not mods[1].bidirectional
    # torch's forget gate block is ONNX's third (iofc -> ifgo)
    w = numpy_helper.to_array(next(t for t in case.inits if t.name == "LSTM_W"))
    np.testing.assert_array_equal(mods[0].weight_ih_l0.detach().numpy()[5:10], w[0][10:15])
    gm = from_onnx(_gru().model())
    assert [type(m) for m in gm.modules() if isinstance(m, nn.GRU)] == [nn.GRU, nn.GRU]
    # trainable: a gradient reaches the recurrent weights
    gm.train()
    sum(o.sum() for o in gm(torch.randn(3, 2, 6), torch.zeros(1, 2, 4))).backward()
    assert all(m.weight_hh_l0.grad is not None for m in gm.modules() if isinstance(m, nn.GRU))


@pytest.mark.parametrize("attrs,why", [
    ({"linear_before_reset": 0}, "linear_before_reset=0"),
    ({"linear_before_reset": 1, "direction": "reverse"}, "direction='reverse'"),
    ({"linear_before_reset": 1, "clip": 3.0}, "clipping"),
    ({"linear_before_reset": 1, "activations": ["Sigmoid", "Relu"]}, "activations"),
    ({"linear_before_reset": 1, "layout": 1}, "layout=1"),
])
def test_recurrent_forms_torch_lacks_are_refused_in_one_line(attrs, why):
    h = 4
    case = Case([node("GRU", ["xs", "GRU_W", "GRU_R", "GRU_B"], ["Y"], hidden_size=h, **attrs)],
                {"xs": (F, ["S", "N", 6], lambda n, s: _f(s, n, 6))}, {"Y": F}, _rnn_inits("GRU", 1, 6, h))
    with pytest.raises(DropcliError, match=why) as info:
        from_onnx(case.model())
    assert "\n" not in info.value.one_line() and "GRU" in info.value.one_line()


def test_embedding_lookup_becomes_an_embedding_module():
    gm = from_onnx(_gather().model())
    emb = [m for m in gm.modules() if isinstance(m, nn.Embedding)]
    assert len(emb) == 1 and emb[0].weight.shape == (10, 4)


@pytest.mark.parametrize("build", [_shape_reshape, _shape_arith, _expand_constant_of_shape_range],
                         ids=["shape_reshape", "shape_arith", "expand_range"])
def test_shape_arithmetic_stays_symbolic_under_torch_export(build):
    """prune and finetune write ONNX again through torch.export with a dynamic batch: the
    imported shape arithmetic must be captured as sizes, not as data-dependent tensor reads."""
    from dropcli.backends.torch.save import to_exported

    case = build()
    gm = from_onnx(case.model())
    (n0, s0), (n1, _) = case.sizes
    ep = to_exported(gm, tuple(torch.from_numpy(mk(n0, s0)) for _, _, mk in case.inputs.values()))
    x = tuple(torch.from_numpy(mk(n1, s0)) for _, _, mk in case.inputs.values())  # another batch size
    with torch.no_grad():
        for a, b in zip(ep.module()(*x), gm(*x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
