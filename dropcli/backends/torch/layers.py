"""Trained layers that a layer-replacing variant rewrites, described independently of how the
model was saved.

A REPLACE variant (DropConnect, pooling dropout, ...) swaps a layer for a site built from the
layer itself. The torch backend meets the same layer in several shapes: an ``nn.Linear``
module call (pickles, state_dicts), ``aten.linear`` / ``aten.conv2d`` / ``aten.convolution``
calls with ``get_attr`` weights (``torch.export`` programs, TorchScript), or
``torch.nn.functional`` calls (symbolic traces). :func:`describe_module` and
:func:`describe_call` turn each into one :class:`TorchLayer`: the layer class, its attributes
(strides, padding, dilation, groups, ceil mode...) as JSON-able values and its tensors (kept
as they are: same storage, same dtype). :func:`layer_forward` runs the layer from that
description, so a site computes exactly what the layer computed, and :func:`stock_module`
rebuilds the stock ``nn`` module when a site is removed again.

The activation that directly follows a weighted layer (its only user) can be absorbed into
the site: DropConnect's test rule averages ``a(u)`` over Gaussian draws of the
pre-activation ``u``, and Standout's is ``g(pi x) * f(W x)``; neither can be written as a
function of ``W x`` alone followed by the unchanged activation. The layer classes and
:class:`~dropcli.model.kinds.Activation` are backend-neutral data (:mod:`dropcli.model.kinds`);
:func:`activation_forward` and :func:`activation_module` evaluate an activation in torch.
Pooling windows live in :mod:`dropcli.model.pooling` (shared with the ONNX backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dropcli.backends.torch.fx import aten_name
from dropcli.model.kinds import AVGPOOL, CONV, GRU, LINEAR, LSTM, MAXPOOL, Activation

# --------------------------------------------------------------------------------- activations


def activation_forward(act: Activation, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` in torch."""
    k, a = act.kind, act.params
    if k == "relu":
        return torch.relu(x)
    if k == "sigmoid":
        return torch.sigmoid(x)
    if k == "tanh":
        return torch.tanh(x)
    if k == "gelu":
        return F.gelu(x, approximate=a.get("approximate", "none"))
    if k == "silu":
        return F.silu(x)
    if k == "elu":
        return F.elu(x, alpha=float(a.get("alpha", 1.0)))
    if k == "leakyrelu":
        return F.leaky_relu(x, negative_slope=float(a.get("negative_slope", 0.01)))
    raise ValueError(k)  # pragma: no cover - Activation.from_record/activation_of_* only make known kinds


def activation_module(act: Activation) -> nn.Module:
    """The stock ``nn`` module computing ``act``."""
    k, a = act.kind, act.params
    return {
        "relu": lambda: nn.ReLU(), "sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(),
        "gelu": lambda: nn.GELU(approximate=a.get("approximate", "none")), "silu": lambda: nn.SiLU(),
        "elu": lambda: nn.ELU(alpha=float(a.get("alpha", 1.0))),
        "leakyrelu": lambda: nn.LeakyReLU(float(a.get("negative_slope", 0.01))),
    }[k]()


_ACT_MODULES = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.GELU: "gelu", nn.SiLU: "silu",
                nn.ELU: "elu", nn.LeakyReLU: "leakyrelu"}
_ACT_FUNCS: dict[Any, str] = {
    torch.relu: "relu", F.relu: "relu", torch.relu_: "relu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu", F.silu: "silu", F.elu: "elu", F.leaky_relu: "leakyrelu",
}
_ATEN_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
              "tanh_": "tanh", "gelu": "gelu", "silu": "silu", "silu_": "silu", "elu": "elu", "elu_": "elu",
              "leaky_relu": "leakyrelu", "leaky_relu_": "leakyrelu"}


def activation_of_module(m: nn.Module) -> Activation | None:
    for typ, kind in _ACT_MODULES.items():
        if type(m) is typ:
            if kind == "gelu":
                return Activation(kind, (("approximate", m.approximate),))
            if kind == "elu":
                return Activation(kind, (("alpha", float(m.alpha)),))
            if kind == "leakyrelu":
                return Activation(kind, (("negative_slope", float(m.negative_slope)),))
            return Activation(kind)
    return None


def activation_of_call(target: Any, kwargs: dict[str, Any], method: bool = False) -> Activation | None:
    """The activation of an fx ``call_function`` / ``call_method`` with normalised kwargs."""
    if method:
        kind = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}.get(str(target))
    elif isinstance(target, torch._ops.OpOverload):
        kind = _ATEN_ACTS.get(aten_name(target))
        if kind == "elu" and (float(kwargs.get("scale", 1.0)) != 1.0 or float(kwargs.get("input_scale", 1.0)) != 1.0):
            return None  # selu-like elu: not one of ours
    else:
        kind = _ACT_FUNCS.get(target)
    if kind is None:
        return None
    if kind == "gelu":
        return Activation(kind, (("approximate", str(kwargs.get("approximate", "none"))),))
    if kind == "elu":
        return Activation(kind, (("alpha", float(kwargs.get("alpha", 1.0))),))
    if kind == "leakyrelu":
        return Activation(kind, (("negative_slope", float(kwargs.get("negative_slope", 0.01))),))
    return Activation(kind)


# --------------------------------------------------------------------------------- layers


@dataclass
class TorchLayer:
    """A trained layer: class, spatial rank, attributes, tensors, absorbed activation."""

    cls: str
    nd: int = 0  # spatial dims of a conv/pool (1, 2, 3); 0 for linear and recurrent layers
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    act: Activation | None = None
    # torch backend only (not recorded): the node's data inputs and the weight get_attr nodes
    inputs: tuple[Any, ...] = ()
    weight_nodes: tuple[Any, ...] = ()
    output_style: str = "tensor"  # recurrent layers: "aten" (y, h, c) or "module" (y, (h, c))

    @property
    def weight(self) -> torch.Tensor | None:
        return self.tensors.get("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensors.get("bias")

    def record(self) -> dict[str, Any]:
        """JSON-able description (tensors by name only: they live in the site module)."""
        return {"cls": self.cls, "nd": self.nd, "attrs": self.attrs, "tensors": sorted(self.tensors),
                "act": self.act.record() if self.act else None, "output_style": self.output_style}

    @classmethod
    def from_record(cls, rec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "TorchLayer":
        return cls(rec["cls"], int(rec.get("nd", 0)), dict(rec.get("attrs", {})), dict(tensors),
                   Activation.from_record(rec.get("act")), output_style=rec.get("output_style", "tensor"))

    def describe(self) -> str:
        a = self.attrs
        if self.cls == LINEAR:
            w = self.weight
            text = f"Linear({w.shape[1]}->{w.shape[0]}{', bias' if self.bias is not None else ''})"
        elif self.cls == CONV:
            w = self.weight
            text = (f"Conv{self.nd}d({w.shape[1] * a['groups']}->{w.shape[0]}, k={list(w.shape[2:])}, s={a['stride']}, "
                    f"p={a['padding']}, d={a['dilation']}, g={a['groups']})")
        elif self.cls in (MAXPOOL, AVGPOOL):
            if a.get("adaptive") is not None:
                text = f"AdaptiveAvgPool{self.nd}d({a['adaptive']})"
            else:
                text = f"{'Max' if self.cls == MAXPOOL else 'Avg'}Pool{self.nd}d(k={a['kernel']}, s={a['stride']}, p={a['padding']})"
        else:
            text = f"{self.cls.upper()}({a.get('input_size')}->{a.get('hidden_size')}, layers={a.get('num_layers')})"
        return text + (f" + {self.act}" if self.act else "")


_CONV_F = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL_F = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL_F = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_ADAPTIVE_AVG_F = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def layer_forward(layer: TorchLayer, x: torch.Tensor, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None | bool = True) -> torch.Tensor:
    """The layer's own op on ``x``, with ``weight`` / ``bias`` substituted when given
    (``bias=True``: the layer's bias, ``None``/``False``: none). No activation."""
    a = layer.attrs
    w = layer.weight if weight is None else weight
    b = layer.bias if bias is True else (None if bias is False else bias)
    if layer.cls == LINEAR:
        return F.linear(x, w, b)
    if layer.cls == CONV:
        padding = a["padding"]
        mode = a.get("padding_mode", "zeros")
        if mode != "zeros":
            x = F.pad(x, _torch_pad(padding), mode=mode)
            padding = 0
        return _CONV_F[layer.nd](x, w, b, a["stride"], padding, a["dilation"], a["groups"])
    if layer.cls == MAXPOOL:
        return _MAXPOOL_F[layer.nd](x, a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
    if layer.cls == AVGPOOL:
        if a.get("adaptive") is not None:
            return _ADAPTIVE_AVG_F[layer.nd](x, a["adaptive"])
        if layer.nd == 1:
            return F.avg_pool1d(x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
        return _AVGPOOL_F[layer.nd](x, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                                    a.get("divisor_override"))
    raise ValueError(f"layer_forward: {layer.cls}")  # recurrent layers run in their variant's module


def _torch_pad(padding: list[int]) -> list[int]:
    """[p_d1, p_d2, ...] -> F.pad's (last dim first, both sides) form."""
    out: list[int] = []
    for p in reversed(list(padding)):
        out += [int(p), int(p)]
    return out


def stock_module(layer: TorchLayer) -> nn.Module:
    """The stock ``nn`` module computing ``layer`` (without its absorbed activation: that is
    ``activation_module(layer.act)``), holding the same tensors: what a removed site turns back into."""
    a, t = layer.attrs, layer.tensors
    if layer.cls == LINEAR:
        w = t["weight"]
        m: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias="bias" in t, device="meta", dtype=w.dtype)
        m.weight = nn.Parameter(w, requires_grad=w.requires_grad)
        if "bias" in t:
            m.bias = nn.Parameter(t["bias"], requires_grad=t["bias"].requires_grad)
    elif layer.cls == CONV:
        w = t["weight"]
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[layer.nd]
        m = cls(w.shape[1] * a["groups"], w.shape[0], tuple(w.shape[2:]), stride=a["stride"], padding=a["padding"],
                dilation=a["dilation"], groups=a["groups"], bias="bias" in t, padding_mode=a.get("padding_mode", "zeros"),
                device="meta", dtype=w.dtype)
        m.weight = nn.Parameter(w, requires_grad=w.requires_grad)
        if "bias" in t:
            m.bias = nn.Parameter(t["bias"], requires_grad=t["bias"].requires_grad)
    elif layer.cls == MAXPOOL:
        m = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[layer.nd](
            a["kernel"], a["stride"], a["padding"], a["dilation"], ceil_mode=a["ceil_mode"])
    elif layer.cls == AVGPOOL:
        if a.get("adaptive") is not None:
            m = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[layer.nd](a["adaptive"])
        elif layer.nd == 1:
            m = nn.AvgPool1d(a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"])
        else:
            m = {2: nn.AvgPool2d, 3: nn.AvgPool3d}[layer.nd](a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                                                            a["count_include_pad"], a.get("divisor_override"))
    elif layer.cls in (LSTM, GRU):
        m = _stock_rnn(layer)
    else:  # pragma: no cover
        raise ValueError(layer.cls)
    return m


def _stock_rnn(layer: TorchLayer) -> nn.Module:
    a, t = layer.attrs, layer.tensors
    cls = nn.LSTM if layer.cls == LSTM else nn.GRU
    w0 = t["weight_ih_l0"]
    kw: dict[str, Any] = dict(num_layers=a["num_layers"], bias=a["bias"], batch_first=a["batch_first"],
                              dropout=float(a.get("dropout", 0.0)), bidirectional=a["bidirectional"], dtype=w0.dtype)
    if layer.cls == LSTM and a.get("proj_size", 0):
        kw["proj_size"] = a["proj_size"]
    m = cls(a["input_size"], a["hidden_size"], **kw)
    for name in m._flat_weights_names:
        setattr(m, name, nn.Parameter(t[name], requires_grad=t[name].requires_grad))
    m.flatten_parameters() if hasattr(m, "flatten_parameters") else None
    return m.eval()


def _nd_list(v: Any, nd: int, what: str) -> list[int]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1 and nd > 1:
            return [int(v[0])] * nd
        return [int(e) for e in v]
    return [int(v)] * nd


def describe_module(m: nn.Module) -> TorchLayer | None:
    """A stock layer module as a :class:`TorchLayer` (None: not a layer dropcli rewrites)."""
    t: dict[str, torch.Tensor] = {}
    if type(m) is nn.Linear:
        t["weight"] = m.weight
        if m.bias is not None:
            t["bias"] = m.bias
        return TorchLayer(LINEAR, 0, {}, t)
    if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        nd = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(m)]
        t["weight"] = m.weight
        if m.bias is not None:
            t["bias"] = m.bias
        padding = m.padding if isinstance(m.padding, str) else _nd_list(m.padding, nd, "padding")
        if isinstance(padding, str):
            padding = _string_padding(padding, list(m.weight.shape[2:]), _nd_list(m.dilation, nd, "dilation"))
            if padding is None:
                return None
        return TorchLayer(CONV, nd, {"stride": _nd_list(m.stride, nd, "stride"), "padding": padding,
                                     "dilation": _nd_list(m.dilation, nd, "dilation"), "groups": int(m.groups),
                                     "padding_mode": m.padding_mode}, t)
    if type(m) in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
        if m.return_indices:
            return None
        nd = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
        k = _nd_list(m.kernel_size, nd, "kernel")
        return TorchLayer(MAXPOOL, nd, {"kernel": k, "stride": _nd_list(m.stride if m.stride is not None else k, nd, "stride"),
                                        "padding": _nd_list(m.padding, nd, "padding"),
                                        "dilation": _nd_list(m.dilation, nd, "dilation"), "ceil_mode": bool(m.ceil_mode)})
    if type(m) in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
        nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
        k = _nd_list(m.kernel_size, nd, "kernel")
        return TorchLayer(AVGPOOL, nd, {"kernel": k, "stride": _nd_list(m.stride if m.stride is not None else k, nd, "stride"),
                                        "padding": _nd_list(m.padding, nd, "padding"), "ceil_mode": bool(m.ceil_mode),
                                        "count_include_pad": bool(m.count_include_pad),
                                        "divisor_override": getattr(m, "divisor_override", None)})
    if type(m) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d):
        nd = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(m)]
        size = m.output_size
        size = list(size) if isinstance(size, (list, tuple)) else [size] * nd
        if any(s is None for s in size):
            return None
        return TorchLayer(AVGPOOL, nd, {"adaptive": [int(s) for s in size]})
    if type(m) in (nn.LSTM, nn.GRU):
        cls = LSTM if type(m) is nn.LSTM else GRU
        for name in m._flat_weights_names:
            t[name] = getattr(m, name)
        attrs = {"input_size": int(m.input_size), "hidden_size": int(m.hidden_size), "num_layers": int(m.num_layers),
                 "bias": bool(m.bias), "batch_first": bool(m.batch_first), "bidirectional": bool(m.bidirectional),
                 "dropout": float(m.dropout), "proj_size": int(getattr(m, "proj_size", 0) or 0)}
        return TorchLayer(cls, 0, attrs, t, output_style="module")
    return None


def _string_padding(padding: str, kernel: list[int], dilation: list[int]) -> list[int] | None:
    if padding == "valid":
        return [0] * len(kernel)
    # "same" with stride 1: symmetric only when every dilation*(k-1) is even
    total = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if any(t % 2 for t in total):
        return None
    return [t // 2 for t in total]


_ATEN_LAYERS = {
    "linear": (LINEAR, 0), "conv1d": (CONV, 1), "conv2d": (CONV, 2), "conv3d": (CONV, 3), "convolution": (CONV, -1),
    "max_pool1d": (MAXPOOL, 1), "max_pool2d": (MAXPOOL, 2), "max_pool3d": (MAXPOOL, 3),
    "avg_pool1d": (AVGPOOL, 1), "avg_pool2d": (AVGPOOL, 2), "avg_pool3d": (AVGPOOL, 3),
    "adaptive_avg_pool1d": (AVGPOOL, 1), "adaptive_avg_pool2d": (AVGPOOL, 2), "adaptive_avg_pool3d": (AVGPOOL, 3),
    "_adaptive_avg_pool2d": (AVGPOOL, 2), "_adaptive_avg_pool3d": (AVGPOOL, 3),
    "lstm": (LSTM, 0), "gru": (GRU, 0),
}
_PY_LAYERS = {
    F.linear: (LINEAR, 0), torch.conv1d: (CONV, 1), torch.conv2d: (CONV, 2), torch.conv3d: (CONV, 3),
    F.max_pool1d: (MAXPOOL, 1), F.max_pool2d: (MAXPOOL, 2), F.max_pool3d: (MAXPOOL, 3),
    torch.max_pool1d: (MAXPOOL, 1), torch.max_pool2d: (MAXPOOL, 2), torch.max_pool3d: (MAXPOOL, 3),
    F.avg_pool1d: (AVGPOOL, 1), F.avg_pool2d: (AVGPOOL, 2), F.avg_pool3d: (AVGPOOL, 3),
    torch.avg_pool1d: (AVGPOOL, 1),
    F.adaptive_avg_pool1d: (AVGPOOL, 1), F.adaptive_avg_pool2d: (AVGPOOL, 2), F.adaptive_avg_pool3d: (AVGPOOL, 3),
    torch.lstm: (LSTM, 0), torch.gru: (GRU, 0),
}


def call_layer_class(target: Any) -> tuple[str, int] | None:
    """(layer class, spatial rank) of an fx call target, or None."""
    if isinstance(target, torch._ops.OpOverload):
        name = aten_name(target)
        overload = target._overloadname
        if name in ("lstm", "gru") and overload != "input":
            return None  # packed-sequence overloads
        return _ATEN_LAYERS.get(name)
    try:
        return _PY_LAYERS.get(target)
    except TypeError:  # unhashable target
        return None


def describe_call(target: Any, kw: dict[str, Any], fetch: Callable[[Any], torch.Tensor | None]) -> TorchLayer | None:
    """A layer from an fx call with normalised kwargs. ``fetch`` turns a ``get_attr`` node into
    its tensor (None for anything else: computed weights are not rewritten)."""
    found = call_layer_class(target)
    if found is None:
        return None
    cls, nd = found
    t: dict[str, torch.Tensor] = {}
    nodes = []
    if cls in (LINEAR, CONV):
        w = fetch(kw.get("weight"))
        if w is None:
            return None
        t["weight"] = w
        nodes.append(kw["weight"])
        if kw.get("bias") is not None:
            bias = fetch(kw["bias"])
            if bias is None:
                return None
            t["bias"] = bias
            nodes.append(kw["bias"])
    if cls == LINEAR:
        return TorchLayer(LINEAR, 0, {}, t, weight_nodes=tuple(nodes))
    if cls == CONV:
        if nd == -1:  # aten.convolution
            if kw.get("transposed"):
                return None
            nd = t["weight"].dim() - 2
        kernel = list(t["weight"].shape[2:])
        dilation = _nd_list(kw.get("dilation", 1), nd, "dilation")
        padding = kw.get("padding", 0)
        padding = _string_padding(padding, kernel, dilation) if isinstance(padding, str) else _nd_list(padding, nd, "padding")
        if padding is None:
            return None
        return TorchLayer(CONV, nd, {"stride": _nd_list(kw.get("stride", 1), nd, "stride"), "padding": padding,
                                     "dilation": dilation, "groups": int(kw.get("groups", 1)), "padding_mode": "zeros"},
                          t, weight_nodes=tuple(nodes))
    if cls == MAXPOOL:
        if kw.get("return_indices"):
            return None
        k = _nd_list(kw["kernel_size"], nd, "kernel")
        stride = kw.get("stride")
        return TorchLayer(MAXPOOL, nd, {"kernel": k, "stride": _nd_list(stride if stride not in (None, [], ()) else k, nd, "stride"),
                                        "padding": _nd_list(kw.get("padding", 0), nd, "padding"),
                                        "dilation": _nd_list(kw.get("dilation", 1), nd, "dilation"),
                                        "ceil_mode": bool(kw.get("ceil_mode", False))})
    if cls == AVGPOOL:
        if "output_size" in kw:
            size = kw["output_size"]
            size = list(size) if isinstance(size, (list, tuple)) else [size] * nd
            if any(not isinstance(s, int) for s in size):
                return None
            return TorchLayer(AVGPOOL, nd, {"adaptive": [int(s) for s in size]})
        k = _nd_list(kw["kernel_size"], nd, "kernel")
        stride = kw.get("stride")
        return TorchLayer(AVGPOOL, nd, {"kernel": k, "stride": _nd_list(stride if stride not in (None, [], ()) else k, nd, "stride"),
                                        "padding": _nd_list(kw.get("padding", 0), nd, "padding"),
                                        "ceil_mode": bool(kw.get("ceil_mode", False)),
                                        "count_include_pad": bool(kw.get("count_include_pad", True)),
                                        "divisor_override": kw.get("divisor_override")})
    return describe_rnn_call(cls, kw, fetch)


def describe_rnn_call(cls: str, kw: dict[str, Any], fetch: Callable[[Any], torch.Tensor | None]) -> TorchLayer | None:
    """``aten.lstm.input`` / ``aten.gru.input``: flat params in torch's order, named like the
    module's ``_flat_weights_names``."""
    params = list(kw.get("params") or [])
    tensors = [fetch(p) for p in params]
    if not params or any(t is None for t in tensors):
        return None
    num_layers, bidir, has_b = int(kw["num_layers"]), bool(kw["bidirectional"]), bool(kw["has_biases"])
    per = 4 if has_b else 2
    dirs = 2 if bidir else 1
    if len(tensors) == num_layers * dirs * (per + 1):
        return None  # LSTM with projections: not rewritten
    if len(tensors) != num_layers * dirs * per:
        return None
    names = []
    for layer in range(num_layers):
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            names += [f"weight_ih{sfx}", f"weight_hh{sfx}"] + ([f"bias_ih{sfx}", f"bias_hh{sfx}"] if has_b else [])
    t = dict(zip(names, tensors))
    w_ih = t["weight_ih_l0"]
    gates = 4 if cls == LSTM else 3
    attrs = {"input_size": int(w_ih.shape[1]), "hidden_size": int(w_ih.shape[0] // gates), "num_layers": num_layers,
             "bias": has_b, "batch_first": bool(kw["batch_first"]), "bidirectional": bidir,
             "dropout": float(kw.get("dropout", 0.0)), "proj_size": 0}
    return TorchLayer(cls, 0, attrs, t, weight_nodes=tuple(params), output_style="aten")
