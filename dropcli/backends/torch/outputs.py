"""Models with several outputs (a tuple, a dict, a transformers ``ModelOutput``) seen as models
with one: what `dropcli prune` and `dropcli finetune` train and score on.

:func:`first_output_view` gives a GraphModule that returns only the model's first output (the
first tensor leaf of the output structure: ``logits`` for transformers' classification outputs)
and :meth:`OutputView.restore` puts the other outputs back after training, in the structure the
model returned them (same ``ModelOutput`` class, tuple or dict, same field names).

The view holds only the part of the graph the first output depends on. The rest (a second head,
say) is left out of it, so neither training nor pruning touches it, and is grafted back unchanged
by :meth:`OutputView.restore`. The view's graph still reads every value that part needs (through
one :func:`first_of` call before the output), so the layers whose outputs the other outputs read
count as output layers: pruning keeps their widths, and every output keeps its shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from dropcli.backends.torch.fx import fetch_attr, set_module
from dropcli.errors import DropcliError


def first_of(*values: Any) -> Any:
    """The view's output: its first argument. The others are what the outputs left out of the view
    read; they stay in the graph so that pruning sees them as outputs."""
    return values[0]


def leaf_name(path: tuple) -> str:
    """``logits`` / ``0`` / ``hidden.1``: a pytree key path as the user would name the output."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def output_leaves(out: Any) -> list[tuple[str, Any]]:
    """The tensors a model returns, as (name, value), in the order of the output structure."""
    try:
        flat = pytree.tree_flatten_with_path(out)[0]
        return [(leaf_name(p) or str(i), v) for i, (p, v) in enumerate(flat)]
    except Exception:  # noqa: BLE001  (a pytree node type without key paths: positions name them)
        return [(str(i), v) for i, v in enumerate(pytree.tree_leaves(out))]


@dataclass
class OutputView:
    """A single-output view of a multi-output GraphModule (see the module's docstring)."""

    gm: fx.GraphModule  # the view: returns the first output only
    index: int  # which leaf of the output structure the view returns
    names: list[str]  # every leaf's name
    shapes: list[tuple[int, ...] | None]  # every leaf's shape on the example (batch dim included)
    _full: fx.GraphModule = field(repr=False)  # the original model (the left-out part comes from it)
    _side: list[fx.Node] = field(repr=False)  # the original nodes left out of the view, in graph order
    _frontier: list[fx.Node] = field(repr=False)  # original nodes in the view that the left-out part / other outputs read
    _first: fx.Node = field(repr=False)  # the original node of the first output

    def describe(self) -> str:
        return f"output {self.index} `{self.names[self.index]}` of {len(self.names)}"

    def restore(self, trained: fx.GraphModule, example: tuple) -> fx.GraphModule:
        """A copy of ``trained`` (a trained / pruned copy of :attr:`gm`) with every output back, in
        the original structure; the left-out part of the graph comes back unchanged. Checked on
        ``example``: every output keeps its shape."""
        gm = copy.deepcopy(trained)
        g = gm.graph
        keep = [n for n in g.nodes if n.op == "call_function" and n.target is first_of]
        if len(keep) != 1:
            raise DropcliError("internal error: the single-output view lost its output marker", "please report this model")
        keep = keep[0]
        env: dict[fx.Node, Any] = dict(zip([self._first, *self._frontier], keep.args))
        full = self._full.graph
        for old, new in zip([n for n in full.nodes if n.op == "placeholder"], [n for n in g.nodes if n.op == "placeholder"]):
            env.setdefault(old, new)
        with g.inserting_before(keep):
            for n in self._side:
                env[n] = g.node_copy(n, lambda a: env[a])
        for n in self._side:
            if n.op == "call_module" and not _has(gm, n.target, module=True):
                set_module(gm, n.target, copy.deepcopy(self._full.get_submodule(n.target)))
            elif n.op == "get_attr" and not _has(gm, n.target):
                _put(gm, n.target, copy.deepcopy(fetch_attr(self._full, n.target)))
        out = next(n for n in g.nodes if n.op == "output")
        old_out = next(n for n in full.nodes if n.op == "output")
        out.args = fx.node.map_arg(old_out.args, lambda a: env[a])
        g.erase_node(keep)
        g._codegen = copy.deepcopy(full._codegen)
        g.lint()
        gm.recompile()
        with torch.no_grad():
            got = [v for _, v in output_leaves(gm(*example))]
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in got]
        if len(got) != len(self.names) or any(a != b for a, b in zip(shapes, self.shapes)):
            raise DropcliError(f"internal error: after training on {self.describe()}, the model's outputs have shapes "
                               f"{shapes}, not {self.shapes}", "please report this model")
        return gm


def _has(root: nn.Module, target: str, module: bool = False) -> bool:
    try:
        obj = fetch_attr(root, target)
    except AttributeError:
        return False
    return isinstance(obj, nn.Module) or not module


def _put(root: nn.Module, target: str, obj: Any) -> None:
    parent_name, _, leaf = target.rpartition(".")
    if parent_name and not _has(root, parent_name, module=True):
        set_module(root, parent_name, nn.Module())
    parent = fetch_attr(root, parent_name) if parent_name else root
    if isinstance(obj, nn.Parameter):
        parent.register_parameter(leaf, obj)
    elif isinstance(obj, torch.Tensor):
        parent.register_buffer(leaf, obj)
    else:
        setattr(parent, leaf, obj)


def first_output_view(gm: fx.GraphModule, example: tuple) -> OutputView | None:
    """None when ``gm`` returns one tensor; else the single-output view of its first tensor output
    (the first leaf of the output structure that is a floating-point tensor with a batch dimension)."""
    with torch.no_grad():
        ref = gm(*example)
    if isinstance(ref, torch.Tensor):
        return None
    leaves = output_leaves(ref)
    g = gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    node_leaves = pytree.tree_leaves(out.args[0])
    if len(node_leaves) != len(leaves):
        raise DropcliError(f"dropcli cannot match the model's {len(leaves)} outputs to its graph ({len(node_leaves)} values)",
                           "pass a model that returns one tensor (or a tuple / dict of tensors)")
    index = next((i for i, ((_, v), n) in enumerate(zip(leaves, node_leaves))
                  if isinstance(n, fx.Node) and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() >= 1), None)
    if index is None:
        raise DropcliError("none of the model's outputs is a floating-point tensor with a batch dimension, so there is nothing "
                           "to train on", "pass a model whose first output holds its predictions (logits or values)")
    first = node_leaves[index]
    needed: set[fx.Node] = set()
    stack = [first]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    inputs = {n for n in g.nodes if n.op == "placeholder"}
    side = [n for n in g.nodes if n not in needed and n.op not in ("placeholder", "output")]
    frontier: list[fx.Node] = []
    for v in [a for n in side for a in n.all_input_nodes] + [n for n in node_leaves if isinstance(n, fx.Node)]:
        if (v in needed or v in inputs) and v is not first and v not in frontier:
            frontier.append(v)
    vg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in g.nodes:
        if n.op == "output" or n in side:
            continue
        env[n] = vg.node_copy(n, lambda a: env[a])
    keep = vg.call_function(first_of, (env[first], *[env[v] for v in frontier]))
    vg.output(keep)
    cg = copy.deepcopy(g._codegen)
    info = getattr(cg, "pytree_info", None)
    if info is not None:  # keep the input signature (keyword programs stay keyword programs); one tensor out
        cg.pytree_info = info._replace(out_spec=None)
    vg._codegen = cg
    view = fx.GraphModule(gm, vg, type(gm).__name__)
    view.training = gm.training
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for _, v in leaves]
    return OutputView(view, index, [k for k, _ in leaves], shapes, gm, side, frontier, first)
