"""`dropcli convert`: move the keep probability q between a dropout site and the weights of
the linear layer after it (docs/variants.md, Conventions).

* inverted: ``y = x m / q`` in training (MC), identity at test;
* vanilla: ``y = x m`` in training, ``y = q x`` at test.

inverted -> vanilla: the site becomes vanilla and the next layer's weight W becomes W / q;
vanilla -> inverted: the site becomes standard (inverted) and W becomes q W. For a layer
``f(x, W)`` that is linear in W for fixed x and linear in x (Linear, Conv, Gemm, MatMul)
``f(c x, W) = f(x, c W)`` for any scalar c, so both the test output and each MC sample (the
same mask m) are unchanged. Between the site and the layer only ops that commute with a
positive scalar are allowed: reshapes (view/reshape/flatten, ONNX Reshape/Flatten/Squeeze/
Unsqueeze/Transpose/Identity) and max pooling (max(c x) = c max(x) for c > 0). Anything else
(an activation, a norm, an add with a bias...) is refused and named. The bias is not scaled:
it is added after the product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from dropcli.errors import DropcliError

CONVENTION = {"standard": "inverted", "dropout": "inverted", "vanilla": "vanilla"}


def convention_of(variant: str | None, op: str = "") -> str | None:
    """inverted / vanilla for elementwise Bernoulli dropout, None for others (channel-wise
    and alpha dropout: converting them to an elementwise vanilla site would change the masks)."""
    if variant == "dropout" and any(k in (op or "").lower() for k in ("alpha", "1d", "2d", "3d", "feature")):
        return None
    return CONVENTION.get(variant or "")


@dataclass
class Move:
    site: str
    layer: str
    p: float
    frm: str
    to: str
    factor: float


# --------------------------------------------------------------------------- torch
_T_PASS = {"view", "reshape", "flatten", "_unsafe_view", "clone", "contiguous", "alias", "detach", "squeeze", "unsqueeze",
           "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
           "max_pool2d_with_indices"}


def _torch_consumer(model: Any, start: Any) -> tuple[Any, Any, str]:
    """(linear node, weight tensor, weight name) after ``start``; refuse anything else."""
    import torch
    from torch import nn

    from dropcli.backends.torch.fx import fetch_attr, fname, is_linear, linear_input

    modules = dict(model.gm.named_modules())
    n = start
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise DropcliError(f"the dropout output feeds {len(users)} ops; convert needs exactly one linear layer after it")
        nxt = users[0]
        if is_linear(nxt, modules):
            if linear_input(nxt) is not n:
                raise DropcliError(f"the dropout output is the weight operand of {nxt.name}; can't move q into it")
            break
        name = fname(nxt)
        mod = modules.get(nxt.target) if nxt.op == "call_module" else None
        if name in _T_PASS or isinstance(mod, (nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                                               nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Identity)):
            if name == "max_pool2d_with_indices":
                raise DropcliError(f"the op after the dropout ({name}) returns indices; not supported")
            n = nxt
            continue
        what = type(mod).__name__ if mod is not None else (name or str(nxt.target))
        raise DropcliError(f"the op after the dropout is {what} ({nxt.name}), which is not linear in its input; "
                           "q can only move into a Linear/Conv layer reached through reshapes or max pooling")
    if nxt.op == "call_module":
        m = modules[nxt.target]
        shared = [u for u in model.gm.graph.nodes if u.op == "call_module" and u.target == nxt.target]
        if len(shared) > 1:
            raise DropcliError(f"layer {nxt.target} is called {len(shared)} times; scaling its weight would change the other calls")
        return nxt, m.weight, f"{nxt.target}.weight"
    name = fname(nxt)
    w_node = nxt.args[2] if name == "addmm" else nxt.args[1]
    if not (hasattr(w_node, "op") and w_node.op == "get_attr"):
        raise DropcliError(f"the weight of {nxt.name} is computed, not a stored parameter; can't scale it")
    uses = [u for u in model.gm.graph.nodes if u.op == "get_attr" and u.target == w_node.target]
    if len(uses) != 1 or len(w_node.users) != 1:
        raise DropcliError(f"weight {w_node.target} is shared with other ops; scaling it would change them")
    w = fetch_attr(model.gm, w_node.target)
    if not isinstance(w, torch.Tensor):
        raise DropcliError(f"the weight of {nxt.name} is not a tensor")
    return nxt, w, str(w_node.target)


def plan_torch(model: Any, drops: Sequence[Any], to: str) -> list[tuple[Any, Move, Any]]:
    plans = []
    for layer in drops:
        conv = convention_of(layer.dropout_variant, layer.op)
        if conv is None:
            raise DropcliError(f"site {layer.name} is {layer.dropout_variant} dropout ({layer.op}); only elementwise Bernoulli "
                               "dropout (standard, vanilla, stock Dropout) has an inverted/vanilla convention", "exclude it with --exclude")
        if conv == to:
            continue
        p = layer.dropout_p
        if p is None or not 0 <= p < 1:
            raise DropcliError(f"site {layer.name} has drop probability {p}; convert needs 0 <= p < 1")
        _, w, wname = _torch_consumer(model, layer.ref)
        q = 1.0 - p
        factor = 1.0 / q if to == "vanilla" else q
        plans.append((layer, Move(layer.name, wname, p, conv, to, factor), w))
    return plans


def apply_torch(model: Any, plans: list[tuple[Any, Move, Any]]) -> list[Move]:
    import torch

    from dropcli.variants import get_variant

    spec = get_variant("vanilla" if plans and plans[0][1].to == "vanilla" else "standard")
    done = []
    for layer, mv, w in plans:
        with torch.no_grad():
            w.mul_(mv.factor)
        model.replace_dropout(layer, spec, {"p": mv.p})
        done.append(mv)
    return done


# --------------------------------------------------------------------------- ONNX
_O_PASS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "MaxPool", "GlobalMaxPool"}
_O_LINEAR = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


def _onnx_consumer(model: Any, value: str) -> tuple[int, str]:
    """(index of the linear node, name of its weight initializer) reading ``value``."""
    g = model.model.graph
    inits = {t.name for t in g.initializer}
    outs = {o.name for o in g.output}
    v = value
    while True:
        users = [(j, n) for j, n in enumerate(g.node) if v in n.input]
        if v in outs or len(users) != 1:
            raise DropcliError(f"the dropout output feeds {len(users) + (v in outs)} consumers; convert needs exactly one linear layer after it")
        j, n = users[0]
        if n.op_type in _O_LINEAR:
            data_pos = list(n.input).index(v)
            if n.op_type in ("Conv", "ConvTranspose") and data_pos != 0:
                raise DropcliError(f"the dropout output is the weight of {n.op_type} {n.name}; can't move q into it")
            if data_pos > 1:
                raise DropcliError(f"the dropout output is the bias of {n.op_type} {n.name}; that is not linear")
            wname = n.input[1 - data_pos]
            if wname not in inits:
                raise DropcliError(f"the other operand of {n.op_type} {n.name} is computed, not a stored weight; can't scale it")
            readers = [m for m in g.node if wname in m.input]
            if len(readers) != 1:
                raise DropcliError(f"weight {wname} is shared by {len(readers)} nodes; scaling it would change them")
            return j, wname
        if n.op_type in _O_PASS and list(n.input).index(v) == 0:
            v = n.output[0]
            continue
        raise DropcliError(f"the op after the dropout is {n.op_type} ({n.name or n.output[0]}), which is not linear in its input; "
                           "q can only move into MatMul/Gemm/Conv reached through reshapes or max pooling")


def plan_onnx(model: Any, drops: Sequence[Any], to: str) -> list[tuple[Any, Move, str]]:
    g = model.model.graph
    plans = []
    for layer in drops:
        conv = convention_of(layer.dropout_variant, layer.op)
        if conv is None:
            raise DropcliError(f"site {layer.name} is {layer.dropout_variant} dropout ({layer.op}); only elementwise Bernoulli "
                               "dropout (standard, vanilla, stock Dropout) has an inverted/vanilla convention", "exclude it with --exclude")
        if conv == to:
            continue
        p = layer.dropout_p
        if p is None or not 0 <= p < 1:
            raise DropcliError(f"site {layer.name} has drop probability {p}; convert needs 0 <= p < 1")
        _, i = layer.ref
        y = g.node[i].output[0]
        _, wname = _onnx_consumer(model, y)
        q = 1.0 - p
        plans.append((layer, Move(layer.name, wname, p, conv, to, 1.0 / q if to == "vanilla" else q), wname))
    return plans


def apply_onnx(model: Any, plans: list[tuple[Any, Move, str]]) -> list[Move]:
    from onnx import numpy_helper

    from dropcli.backends.plan import finalize, ordered
    from dropcli.variants import get_variant

    g = model.model.graph
    spec = get_variant("vanilla" if plans and plans[0][1].to == "vanilla" else "standard")
    for _, mv, wname in plans:
        k = next(k for k, t in enumerate(g.initializer) if t.name == wname)
        arr = numpy_helper.to_array(g.initializer[k])
        new = numpy_helper.from_array((arr.astype(np.float64) * mv.factor).astype(arr.dtype), wname)
        g.initializer[k].CopyFrom(new)
    by_layer = {id(l): mv for l, mv, _ in plans}
    for layer in ordered(model, [l for l, _, _ in plans]):
        model.replace_dropout(layer, spec, {"p": by_layer[id(layer)].p})
    finalize(model)
    return [mv for _, mv, _ in plans]
