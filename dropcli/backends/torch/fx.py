"""Small torch.fx helpers shared by the torch backend, the MC engines and the analyses.

Reading a graph: :func:`fetch_attr` (the object a ``get_attr`` target names), :func:`aten_name`
(``aten.linear.default`` -> ``linear``), :func:`fname` (a call's function or method name),
:func:`is_linear` / :func:`linear_input` (a layer that is linear in its data input, and that
input), :data:`DROPOUT_FUNCS` / :data:`ATEN_DROPOUT` (stock dropout calls). Editing a module
tree: :func:`set_module`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

# stock dropout as torch / torch.nn.functional calls (symbolic traces) and as aten ops (export)
DROPOUT_FUNCS = {torch.nn.functional.dropout, torch.dropout, torch.nn.functional.dropout1d,
                 torch.nn.functional.dropout2d, torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout,
                 torch.nn.functional.feature_alpha_dropout}
ATEN_DROPOUT = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout"}

# function names of the ops that are linear in their data input (:func:`is_linear`)
LINEAR_ATEN = {"linear", "addmm", "mm", "matmul", "conv1d", "conv2d", "conv3d", "convolution", "_convolution"}


def fetch_attr(root: nn.Module, target: Any) -> Any:
    """The object a dotted ``get_attr`` target (``features.0.weight``) names in ``root``."""
    obj: Any = root
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def aten_name(target: Any) -> str | None:
    """``linear`` for ``aten.linear.default`` (any aten overload); None for other targets."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return None


def fname(n: fx.Node) -> str | None:
    """The name of the function (aten op, torch function) or method a node calls."""
    if n.op == "call_function":
        return aten_name(n.target) or getattr(n.target, "__name__", None)
    if n.op == "call_method":
        return str(n.target)
    return None


def is_linear(n: fx.Node, modules: dict) -> bool:
    """A Linear/Conv module call or a linear/matmul/conv op."""
    if n.op == "call_module":
        return isinstance(modules.get(n.target), (nn.Linear, nn.modules.conv._ConvNd))
    return fname(n) in LINEAR_ATEN


def linear_input(n: fx.Node) -> Any:
    """The node a linear op reads its data from (addmm's second argument)."""
    if n.op == "call_function" and fname(n) == "addmm":
        return n.args[1]
    return n.args[0]


def set_module(root: nn.Module, name: str, mod: nn.Module) -> None:
    """Put ``mod`` at dotted path ``name`` in ``root``, creating empty parents and replacing
    whatever (module, parameter or buffer) was there."""
    parts = name.split(".")
    parent = root
    for p in parts[:-1]:
        if not hasattr(parent, p) or not isinstance(getattr(parent, p), nn.Module):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    if parts[-1] in parent._modules:
        del parent._modules[parts[-1]]
    for store in (parent._parameters, parent._buffers):
        store.pop(parts[-1], None)
    parent.add_module(parts[-1], mod)


# ops of an fx graph as :mod:`dropcli.model.patterns` names them
_PATTERN_FUNCS = {"mul": "mul", "mul_": "mul", "div": "div", "div_": "div", "truediv": "div", "add": "add", "add_": "add",
                  "sub": "sub", "sub_": "sub", "erf": "erf", "tanh": "tanh", "pow": "pow", "sigmoid": "sigmoid",
                  "clamp": "clip", "clip": "clip", "hardtanh": "clip", "hardsigmoid": "hardsigmoid"}
_PATTERN_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}


class FxPatternView:
    """A torch.fx graph seen by :func:`dropcli.model.patterns.find_patterns`: values are nodes
    (and the Python numbers they take as arguments)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def producer(self, v: Any) -> tuple[str, list[Any]] | None:
        if not isinstance(v, fx.Node):
            return None
        if v.op == "call_module":
            mod = self.gm.get_submodule(v.target)
            for cls, name in _PATTERN_MODULES.items():
                if type(mod) is cls:
                    return name, [v.args[0]] if v.args else []
            if type(mod) is nn.Hardtanh:
                return "clip", [v.args[0], float(mod.min_val), float(mod.max_val)]
            return None
        name = fname(v)
        if v.op not in ("call_function", "call_method") or name is None:
            return None
        op = _PATTERN_FUNCS.get(name)
        if op is None:
            return None
        args = list(v.args)
        kw = v.kwargs
        if op in ("add", "sub") and kw.get("alpha", 1) != 1:
            return None
        if op == "div" and kw.get("rounding_mode") is not None:
            return None
        if op == "clip":
            lo = args[1] if len(args) > 1 else kw.get("min", kw.get("min_val", -1.0 if name == "hardtanh" else None))
            hi = args[2] if len(args) > 2 else kw.get("max", kw.get("max_val", 1.0 if name == "hardtanh" else None))
            args = [args[0], float("-inf") if lo is None else lo, float("inf") if hi is None else hi]
        return op, args

    def const(self, v: Any) -> float | None:
        if isinstance(v, fx.Node) and v.op == "get_attr":
            try:
                t = fetch_attr(self.gm, v.target)
            except AttributeError:
                return None
            if isinstance(t, torch.Tensor) and t.numel() >= 1 and not t.dtype.is_complex and t.dtype != torch.bool:
                flat = t.detach().reshape(-1)
                if bool((flat == flat[0]).all()):
                    return float(flat[0])
        return None

    def consumers(self, v: Any) -> list[Any]:
        return list(v.users) if isinstance(v, fx.Node) else []

    def is_graph_output(self, v: Any) -> bool:
        return isinstance(v, fx.Node) and any(u.op == "output" for u in v.users)
