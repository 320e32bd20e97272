"""ONNX nodes that layer-replacing variants rewrite, and the helpers their builders use.

:func:`describe_node` recognises a trained layer in an ONNX graph:

* linear: ``Gemm`` (``transA = 0``) with a constant ``B`` (and ``C``), or ``MatMul`` with a
  constant 2-D weight, followed (as its only consumer) by an ``Add`` of a constant bias;
* conv: ``Conv`` with a constant weight (and bias);
* maxpool: ``MaxPool`` whose ``Indices`` output is unused; avgpool: ``AveragePool`` or
  ``GlobalAveragePool``;
* lstm / gru: ``LSTM`` / ``GRU`` with constant ``W``, ``R`` (and ``B``).

An :class:`OnnxLayer` lets a builder re-emit the layer's own op with substituted inputs
(:meth:`OnnxLayer.lin`, :meth:`OnnxLayer.pool`), so strides, pads, dilations, groups and
Gemm's ``alpha``/``beta``/``transB`` are kept exactly, and the trained weight initializers
are referenced by name (never copied).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dropcli.errors import UsageError
from dropcli.model.kinds import AVGPOOL, CONV, GRU, LINEAR, LSTM, MAXPOOL, Activation
from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo

_ACT_OPS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "LeakyRelu": "leakyrelu", "Elu": "elu", "Gelu": "gelu"}


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def activation_of_node(node: onnx.NodeProto) -> Activation | None:
    kind = _ACT_OPS.get(node.op_type)
    if kind is None or node.domain not in ("", "ai.onnx"):
        return None
    a = node_attrs(node)
    if kind == "leakyrelu":
        return Activation(kind, (("negative_slope", float(a.get("alpha", 0.01))),))
    if kind == "elu":
        return Activation(kind, (("alpha", float(a.get("alpha", 1.0))),))
    if kind == "gelu":
        approx = a.get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else str(approx)
        return Activation(kind, (("approximate", approx),))
    return Activation(kind)


def emit_activation(b: OnnxBuilder, act: Activation | None, v: str, info: TensorInfo) -> str:
    """``act(v)`` from stock ops (gelu from Erf/Tanh, so any opset >= 13 works)."""
    if act is None:
        return v
    k, a = act.kind, act.params
    if k == "relu":
        return b.op("Relu", v)
    if k == "sigmoid":
        return b.op("Sigmoid", v)
    if k == "tanh":
        return b.op("Tanh", v)
    if k == "leakyrelu":
        return b.op("LeakyRelu", v, alpha=float(a.get("negative_slope", 0.01)))
    if k == "elu":
        return b.op("Elu", v, alpha=float(a.get("alpha", 1.0)))
    if k == "silu":
        return b.op("Mul", v, b.op("Sigmoid", v))
    if k == "gelu":
        half = b.op("Mul", v, b.f(0.5, info))
        if a.get("approximate", "none") == "tanh":
            c = float(np.sqrt(2.0 / np.pi))
            inner = b.op("Mul", b.op("Add", v, b.op("Mul", b.op("Mul", b.op("Mul", v, v), v), b.f(0.044715, info))), b.f(c, info))
            return b.op("Mul", half, b.op("Add", b.op("Tanh", inner), b.f(1.0, info)))
        erf = b.op("Erf", b.op("Mul", v, b.f(float(1.0 / np.sqrt(2.0)), info)))
        return b.op("Mul", half, b.op("Add", erf, b.f(1.0, info)))
    raise ValueError(k)  # pragma: no cover


@dataclass
class OnnxLayer:
    """A trained layer in an ONNX graph (see the module docstring)."""

    cls: str
    nd: int
    node: onnx.NodeProto
    inputs: list[str]  # data inputs: x (and a recurrent layer's initial states, '' when absent)
    attrs: dict[str, Any]
    weight: str | None = None
    bias: str | None = None
    weight_value: np.ndarray | None = None
    bias_value: np.ndarray | None = None
    bias_node: onnx.NodeProto | None = None  # MatMul's Add
    act_node: onnx.NodeProto | None = None
    act: Activation | None = None
    x_info: TensorInfo = field(default_factory=lambda: TensorInfo(None, None))
    consts: dict[str, np.ndarray] = field(default_factory=dict)  # other constant inputs (LSTM's R, B ...)

    @property
    def x(self) -> str:
        return self.inputs[0]

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def pre_output(self) -> str:
        """The layer's output before the absorbed activation (after MatMul's bias Add)."""
        return (self.bias_node or self.node).output[0]

    @property
    def outputs(self) -> list[str]:
        """What the site must produce (the names consumers read)."""
        if self.act_node is not None:
            return [self.act_node.output[0]]
        if self.cls in (LSTM, GRU):
            return list(self.node.output)
        return [self.pre_output]

    @property
    def replaced_nodes(self) -> list[onnx.NodeProto]:
        return [n for n in (self.node, self.bias_node, self.act_node) if n is not None]

    # -- linear / conv ------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        """Output units (linear) or channels (conv)."""
        w = self.weight_value
        assert w is not None
        if self.cls == CONV:
            return int(w.shape[0])
        if self.op == "Gemm":
            return int(w.shape[0] if self.attrs.get("transB", 0) else w.shape[1])
        return int(w.shape[1])  # MatMul: [in, out]

    def w_eff(self, b: OnnxBuilder) -> str:
        """The weight as the layer multiplies it (Gemm's alpha folded in)."""
        assert self.weight is not None
        alpha = float(self.attrs.get("alpha", 1.0)) if self.op == "Gemm" else 1.0
        if alpha == 1.0:
            return self.weight
        return b.op("Mul", self.weight, b.f(alpha, self.x_info))

    def b_eff(self, b: OnnxBuilder) -> str | None:
        """The bias as the layer adds it (Gemm's beta folded in), or None."""
        if self.bias is None:
            return None
        beta = float(self.attrs.get("beta", 1.0)) if self.op == "Gemm" else 1.0
        if beta == 1.0:
            return self.bias
        return b.op("Mul", self.bias, b.f(beta, self.x_info))

    def lin(self, b: OnnxBuilder, x: str, w: str, bias: str | None) -> str:
        """The layer's op with effective weight ``w`` and bias ``bias`` (None: none) on ``x``."""
        if self.op == "Gemm":
            ins = [x, w] + ([bias] if bias is not None else [])
            return b.op("Gemm", *ins, transB=int(self.attrs.get("transB", 0)))
        if self.op == "MatMul":
            y = b.op("MatMul", x, w)
            return b.op("Add", y, bias) if bias is not None else y
        if self.op == "Conv":
            ins = [x, w] + ([bias] if bias is not None else [])
            keep = {k: v for k, v in self.attrs.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
            return b.op("Conv", *ins, **keep)
        raise ValueError(self.op)  # pragma: no cover

    def channel_shape(self) -> list[int]:
        """Shape that broadcasts a per-output-unit vector over the layer's output."""
        if self.cls == CONV:
            return [self.out_channels] + [1] * self.nd
        return [self.out_channels]

    # -- pooling ---------------------------------------------------------------------------
    def pool(self, b: OnnxBuilder, x: str) -> str:
        """The pooling op itself (first output only) on ``x``."""
        keep = {k: v for k, v in self.attrs.items() if k != "storage_order"}
        return b.op(self.op, x, **keep)

    def pool_geometry(self) -> tuple[list[int], list[int], list[int], list[int], bool]:
        """(kernel, strides, pads_begin+pads_end resolved to symmetric-or-not lists, dilations, ceil_mode)
        for a MaxPool/AveragePool with static spatial sizes; auto_pad resolved like onnxruntime."""
        a = self.attrs
        k = [int(v) for v in a["kernel_shape"]]
        nd = len(k)
        s = [int(v) for v in a.get("strides", [1] * nd)]
        d = [int(v) for v in a.get("dilations", [1] * nd)]
        pads = [int(v) for v in a.get("pads", [0] * (2 * nd))]
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            sizes = self.x_info.static_dims(list(range(2, 2 + nd)), f"{self.op} with auto_pad={auto}")
            pads = [0] * (2 * nd)
            for i in range(nd):
                out = -(-sizes[i] // s[i])
                total = max(0, (out - 1) * s[i] + d[i] * (k[i] - 1) + 1 - sizes[i])
                lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
                pads[i], pads[nd + i] = lo, total - lo
        elif auto == "VALID":
            pads = [0] * (2 * nd)
        return k, s, pads, d, bool(a.get("ceil_mode", 0))


def describe_node(
    nodes: list[onnx.NodeProto], i: int, const: Callable[[str], np.ndarray | None],
    users: dict[str, list[int]], graph_outputs: set[str], info: Callable[[str], TensorInfo],
) -> OnnxLayer | None:
    """The layer node ``nodes[i]`` is, or None. ``const`` gives a constant input's value."""
    n = nodes[i]
    if n.domain not in ("", "ai.onnx"):
        return None
    op = n.op_type
    a = node_attrs(n)
    if op in ("Gemm", "MatMul"):
        if len(n.input) < 2 or int(a.get("transA", 0)) != 0:
            return None
        w = const(n.input[1])
        if w is None or w.ndim != 2:
            return None
        layer = OnnxLayer(LINEAR, 0, n, [n.input[0]], a, weight=n.input[1], weight_value=w, x_info=info(n.input[0]))
        if op == "Gemm" and len(n.input) > 2 and n.input[2]:
            c = const(n.input[2])
            if c is None:
                return None
            layer.bias, layer.bias_value = n.input[2], c
        if op == "MatMul":
            outs = users.get(n.output[0], [])
            if len(outs) == 1 and n.output[0] not in graph_outputs:
                add = nodes[outs[0]]
                if add.op_type == "Add" and len(add.input) == 2:
                    other = add.input[1] if add.input[0] == n.output[0] else add.input[0]
                    c = const(other)
                    if c is not None and c.ndim <= 1 and c.size == w.shape[1]:
                        layer.bias, layer.bias_value, layer.bias_node = other, c, add
        return layer
    if op == "Conv":
        if len(n.input) < 2:
            return None
        w = const(n.input[1])
        if w is None:
            return None
        layer = OnnxLayer(CONV, w.ndim - 2, n, [n.input[0]], a, weight=n.input[1], weight_value=w, x_info=info(n.input[0]))
        if len(n.input) > 2 and n.input[2]:
            c = const(n.input[2])
            if c is None:
                return None
            layer.bias, layer.bias_value = n.input[2], c
        return layer
    if op in ("MaxPool", "AveragePool"):
        if len(n.output) > 1 and n.output[1] and (users.get(n.output[1]) or n.output[1] in graph_outputs):
            return None
        return OnnxLayer(MAXPOOL if op == "MaxPool" else AVGPOOL, len(a.get("kernel_shape", [])), n, [n.input[0]], a,
                         x_info=info(n.input[0]))
    if op == "GlobalAveragePool":
        xi = info(n.input[0])
        nd = (xi.rank - 2) if xi.rank else 0
        return OnnxLayer(AVGPOOL, nd, n, [n.input[0]], a, x_info=xi)
    if op in ("LSTM", "GRU"):
        if len(n.input) < 3:
            return None
        w, r = const(n.input[1]), const(n.input[2])
        if w is None or r is None:
            return None
        consts = {"W": w, "R": r}
        if len(n.input) > 3 and n.input[3]:
            bb = const(n.input[3])
            if bb is None:
                return None
            consts["B"] = bb
        if len(n.input) > 4 and n.input[4]:
            return None  # sequence_lens: not rewritten
        if op == "LSTM" and len(n.input) > 7 and n.input[7]:
            return None  # peepholes
        states = [n.input[k] if len(n.input) > k else "" for k in ((5, 6) if op == "LSTM" else (5,))]
        return OnnxLayer(LSTM if op == "LSTM" else GRU, 0, n, [n.input[0], *states], a, x_info=info(n.input[0]), consts=consts)
    return None


def absorbable_activation(nodes: list[onnx.NodeProto], layer: OnnxLayer, users: dict[str, list[int]],
                          graph_outputs: set[str], kinds: tuple[str, ...]) -> tuple[onnx.NodeProto | None, Activation | None]:
    """The activation that is the layer's only consumer, when its kind is in ``kinds``."""
    if not kinds or layer.cls in (LSTM, GRU):
        return None, None
    out = layer.pre_output
    consumers = users.get(out, [])
    if len(consumers) != 1 or out in graph_outputs:
        return None, None
    u = nodes[consumers[0]]
    if len(u.input) != 1 or u.input[0] != out:
        return None, None
    act = activation_of_node(u)
    if act is None or act.kind not in kinds:
        return None, None
    return u, act


def const_value(name: str, inits: dict[str, onnx.TensorProto], const_nodes: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    n = const_nodes.get(name)
    if n is not None:
        for at in n.attribute:
            if at.name == "value":
                return numpy_helper.to_array(at.t)
    return None


def check_static_window_input(layer: OnnxLayer, what: str) -> list[int]:
    """Static spatial sizes of a pooling input (needed to build the window index)."""
    if layer.x_info.rank is None:
        raise UsageError(f"{what} needs the rank and spatial sizes of its input in ONNX, but they are unknown",
                         "run shape inference on the model, or export it with fixed spatial sizes")
    return layer.x_info.static_dims(list(range(2, layer.x_info.rank)), what)

