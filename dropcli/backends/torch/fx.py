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
