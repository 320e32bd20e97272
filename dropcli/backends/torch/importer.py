"""Turn what the loaders give into an ``fx.GraphModule`` made of real torch modules.

The torch backend turns every torch format into a ``torch.fx.GraphModule``, but a graph that
came through ``torch.export`` or TorchScript conversion computes its layers with
``call_function`` aten ops (``aten.linear``, ``aten.conv2d``, ``aten.convolution``,
``aten.batch_norm`` ...) reading weights through ``get_attr``. Training code that swaps layers
(sparse VD, SBP) and Torch-Pruning's ``DependencyGraph`` need ``nn.Linear`` / ``nn.ConvNd`` /
``nn.BatchNormNd`` modules instead. :func:`modularize` rewrites those calls into
``call_module`` nodes on real modules holding the trained weights; the function stays the same.

:func:`from_onnx` is dropcli's own ONNX importer (onnx2torch needs torchvision, which can't be
installed beside torch 2.13): it builds the same kind of GraphModule from the ONNX ops listed in
:data:`ONNX_OPS`, and names any other op in a one-line error.

Both are used by ``dropcli prune`` (and meant for ``dropcli finetune``): :func:`to_modules`
takes a loaded model of either backend.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from dropcli.backends.torch.fx import fetch_attr, set_module
from dropcli.errors import DropcliError
from dropcli.model import naming
from dropcli.model.naming import MC_INPUT, join_scopes

aten = torch.ops.aten

# ---------------------------------------------------------------------------------- fx graphs


def _const(gm: fx.GraphModule, a: Any) -> torch.Tensor | None:
    """The tensor behind a ``get_attr`` node (None for None; error for a computed value)."""
    if a is None:
        return None
    if isinstance(a, fx.Node) and a.op == "get_attr":
        return fetch_attr(gm, a.target).detach()
    raise _NotConst()


class _NotConst(Exception):
    pass


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _tuple(v: Any, k: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        v = tuple(int(x) for x in v)
        return v * k if len(v) == 1 else v
    return (int(v),) * k


def _linear_module(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m


def _conv_module(w: torch.Tensor, b: torch.Tensor | None, stride, padding, dilation, groups) -> nn.Module:
    nd = w.dim() - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(nd)
    if cls is None:
        raise DropcliError(f"a convolution with a {w.dim()}-d weight is not supported")
    pad = padding if isinstance(padding, str) else _tuple(padding, nd)
    m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_tuple(stride, nd), padding=pad,
            dilation=_tuple(dilation, nd), groups=groups, bias=b is not None)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m


def _bn_module(weight, bias, mean, var, eps: float, rank: int | None) -> nn.Module:
    c = mean.shape[0]
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank or 4, nn.BatchNorm2d)
    m = cls(c, eps=float(eps), affine=weight is not None or bias is not None)
    with torch.no_grad():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if m.affine:
            m.weight.copy_(weight if weight is not None else torch.ones(c))
            m.bias.copy_(bias if bias is not None else torch.zeros(c))
    return m.eval()


def _rank(n: fx.Node) -> int | None:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return len(tm.shape)
    return None


def _build(gm: fx.GraphModule, n: fx.Node) -> tuple[nn.Module, fx.Node, list[fx.Node]] | None:
    """For a functional layer call: (module, its input node, the weight nodes it reads)."""
    t = n.target
    try:
        if t in (aten.linear.default, torch.nn.functional.linear, torch._C._nn.linear):
            x, w, b = n.args[0], _arg(n, 1, "weight"), _arg(n, 2, "bias")
            return _linear_module(_const(gm, w), _const(gm, b)), x, [w, b]
        if t is aten.addmm.default:
            b, x, wt = n.args[:3]
            if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
                return None
            if not (isinstance(wt, fx.Node) and wt.target in (aten.t.default, aten.permute.default) and len(wt.users) == 1):
                return None
            return _linear_module(_const(gm, wt.args[0]), _const(gm, b)), x, [wt.args[0], b, wt]
        if t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
                 aten.conv2d.padding, aten.conv3d.padding, torch.conv1d, torch.conv2d, torch.conv3d,
                 torch.nn.functional.conv1d, torch.nn.functional.conv2d):
            x, w, b = n.args[0], _arg(n, 1, "weight"), _arg(n, 2, "bias")
            mod = _conv_module(_const(gm, w), _const(gm, b), _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0),
                               _arg(n, 5, "dilation", 1), int(_arg(n, 6, "groups", 1)))
            return mod, x, [w, b]
        if t is aten.convolution.default:
            x, w, b, stride, padding, dilation, transposed, _out_pad, groups = n.args[:9]
            if transposed:
                return None
            return _conv_module(_const(gm, w), _const(gm, b), stride, padding, dilation, int(groups)), x, [w, b]
        if t in (aten.batch_norm.default, torch.nn.functional.batch_norm, torch.batch_norm):
            if t is torch.nn.functional.batch_norm:
                x, mean, var = n.args[0], _arg(n, 1, "running_mean"), _arg(n, 2, "running_var")
                w, b = _arg(n, 3, "weight"), _arg(n, 4, "bias")
                training, eps = _arg(n, 5, "training", False), _arg(n, 7, "eps", 1e-5)
            else:
                x, w, b, mean, var, training, _mom, eps = n.args[:8]
            if training:
                return None
            mod = _bn_module(_const(gm, w), _const(gm, b), _const(gm, mean), _const(gm, var), eps, _rank(x))
            return mod, x, [w, b, mean, var]
        if t is aten._native_batch_norm_legit_no_training.default:
            x, w, b, mean, var, _mom, eps = n.args[:7]
            mod = _bn_module(_const(gm, w), _const(gm, b), _const(gm, mean), _const(gm, var), eps, _rank(x))
            return mod, x, [w, b, mean, var]
    except _NotConst:
        return None
    return None


def _module_name(gm: fx.GraphModule, weight_nodes: list, taken: set[str]) -> str:
    """Name a new module after the path of the weight it holds (``features.0.weight`` -> ``features.0``)."""
    base = ""
    for w in weight_nodes:
        if isinstance(w, fx.Node) and w.op == "get_attr":
            base = w.target.rsplit(".", 1)[0] if "." in w.target else w.target
            break
    base = re.sub(r"[^A-Za-z0-9_.]", "_", base) or "layer"
    if base.startswith("_"):
        base = "m" + base
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite functional linear / conv / batchnorm calls into ``call_module`` nodes on real
    ``nn.Linear`` / ``nn.ConvNd`` / ``nn.BatchNormNd`` modules (a new GraphModule; the
    function is unchanged). Layers whose weights are computed rather than stored are kept as
    they are."""
    import copy

    gm = copy.deepcopy(gm)
    g = gm.graph
    builds: list[tuple[fx.Node, nn.Module, fx.Node, list]] = []
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        res = _build(gm, n)
        if res is not None:
            builds.append((n, *res))
    if not builds:
        return gm
    new_modules: dict[str, nn.Module] = {}
    existing = {name for name, _ in gm.named_modules() if name}
    # weights read only by the rewritten calls disappear from the graph, so their names are free
    readers: dict[fx.Node, int] = {}
    for _n, _m, _x, ws in builds:
        for w in ws:
            if isinstance(w, fx.Node):
                readers[w] = readers.get(w, 0) + 1
    taken = set(existing)
    for w, k in readers.items():
        if w.op == "get_attr" and len(w.users) == k and "." in w.target:
            taken.discard(w.target.rsplit(".", 1)[0])
    plan = []
    for n, mod, x, ws in builds:
        name = _module_name(gm, ws, taken)
        plan.append((n, mod, x, ws, name))
    for n, mod, x, ws, name in plan:
        x = n.args[1] if n.target is aten.addmm.default else n.args[0]  # current input (earlier rewrites move it)
        with g.inserting_before(n):  # create_node: the module is registered below (call_module would look it up now)
            new = g.create_node("call_module", name, (x,))
        new.meta = {k: v for k, v in n.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
        if n.target is aten._native_batch_norm_legit_no_training.default:
            for u in list(n.users):
                if u.target is operator.getitem and u.args[1] == 0:
                    u.replace_all_uses_with(new)
                    g.erase_node(u)
            if n.users:
                raise DropcliError("a batch norm's saved statistics are used by the graph; dropcli can't rewrite it")
        else:
            n.replace_all_uses_with(new)
        g.erase_node(n)
        new_modules[name] = mod
    for n in list(g.nodes):  # weight reads (and transposes) that nothing uses any more
        if n.op in ("get_attr",) and not n.users:
            g.erase_node(n)
    for n in reversed(list(g.nodes)):
        if n.op == "call_function" and n.target in (aten.t.default, aten.permute.default) and not n.users:
            g.erase_node(n)
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    _delete_unused_attrs(gm)
    for name, mod in new_modules.items():
        set_module(gm, name, mod)
    g.lint()
    gm.recompile()
    return gm


def _delete_unused_attrs(gm: fx.GraphModule) -> None:
    """Remove parameters, buffers and modules the graph no longer reads."""
    used: set[str] = set()
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            used.add(n.target)
    def keep(path: str) -> bool:
        return any(u == path or u.startswith(path + ".") or path.startswith(u + ".") for u in used)
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if not keep(name):
            mod_path, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)
    for name, _ in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if not name or keep(name):
            continue
        mod_path, _, leaf = name.rpartition(".")
        parent = gm.get_submodule(mod_path) if mod_path else gm
        sub = parent._modules.get(leaf)
        if sub is not None and not any(True for _ in sub.parameters()) and not any(True for _ in sub.buffers()):
            del parent._modules[leaf]


# ---------------------------------------------------------------------------------- ONNX

# op type -> handler, filled in class-body order by @onnx_op below: adding an op is one decorated
# method. ONNX_OPS (the supported ops named in errors and docs) is read from this table.
ONNX_HANDLERS: dict[str, Callable[..., None]] = {}


def onnx_op(*ops: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register an :class:`_OnnxImporter` method as the handler of ONNX ``ops``; it is called as
    ``handler(importer, node, attrs, inputs, output)`` and binds ``importer.env[output]``."""
    def deco(fn: Callable[..., None]) -> Callable[..., None]:
        for op in ops:
            if op in ONNX_HANDLERS:
                raise RuntimeError(f"ONNX op {op} registered twice")
            ONNX_HANDLERS[op] = fn
        return fn
    return deco


def _onnx_attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _sym_pads(pads: list[int] | None, nd: int, what: str) -> tuple[int, ...]:
    if not pads:
        return (0,) * nd
    begin, end = list(pads[:nd]), list(pads[nd:])
    if begin != end:
        raise DropcliError(f"ONNX {what} with asymmetric padding {pads} is not supported by dropcli's importer",
                           "re-export the model with symmetric padding")
    return tuple(int(p) for p in begin)


# ---- values computed from tensor shapes (Shape and the integer arithmetic exporters write on it)


class _Sym:
    """An integer (or boolean) ONNX value computed from tensor shapes: ``Shape`` and the
    Gather / Slice / Concat / arithmetic that exporters write on it. It is kept as a list of
    Python ints and fx nodes that yield ints (``x.size(d)`` ...), not as a tensor, so a Reshape,
    Expand, ConstantOfShape or Range built from it follows the input's batch size and sequence
    length at run time (and stays symbolic under ``torch.export``) instead of baking in the
    export's sizes or reading a tensor's data. ``scalar``: a 0-d value (one item)."""

    __slots__ = ("items", "scalar", "dtype")

    def __init__(self, items: list[Any], scalar: bool = False, dtype: torch.dtype = torch.int64):
        self.items, self.scalar, self.dtype = list(items), scalar, dtype


def _sym_tensor(items: tuple, scalar: bool, dtype: torch.dtype) -> torch.Tensor:
    """A :class:`_Sym` as the tensor ONNX means (when a tensor op reads it)."""
    if scalar:
        return torch.as_tensor(items[0], dtype=dtype)
    if not items:
        return torch.zeros(0, dtype=dtype)
    return torch.stack([torch.as_tensor(v, dtype=dtype) for v in items])


def _shape_tensor(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(tuple(x.shape), dtype=torch.int64)


def _trunc_div(a: Any, b: Any) -> Any:
    """ONNX integer Div: the quotient rounded toward zero (Python's // rounds down)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _pick(cond: Any, a: Any, b: Any) -> Any:
    return a if cond else b


def _onnx_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div on integer tensors truncates (torch's ``/`` would return floats)."""
    if not (a.dtype.is_floating_point or b.dtype.is_floating_point):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _as_ints(v: Any) -> list[Any]:
    """A shape operand given as a tensor (when it was not kept as a :class:`_Sym`)."""
    return [int(d) for d in v.reshape(-1).tolist()] if isinstance(v, torch.Tensor) else list(v)


def _onnx_reshape(x: torch.Tensor, shape: Any, allowzero: bool = False) -> torch.Tensor:
    dims = _as_ints(shape)
    if not allowzero:
        dims = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)]
    return torch.reshape(x, tuple(dims))


def _onnx_flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Flatten: the axes before ``axis`` and those from it, each multiplied into one."""
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _onnx_expand(x: torch.Tensor, shape: Any) -> torch.Tensor:
    """ONNX Expand broadcasts both ways (a target dim of 1 keeps the input's)."""
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_as_ints(shape))))


def _onnx_full(shape: Any, value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(tuple(_as_ints(shape)), value, dtype=dtype)


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v


def _onnx_range(start: Any, limit: Any, delta: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=dtype)


def _onnx_gather(x: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Gather (``np.take``): negative indices count from the end."""
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def _onnx_gather_elements(x: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


def _onnx_gather_nd(x: torch.Tensor, idx: torch.Tensor, batch_dims: int = 0) -> torch.Tensor:
    """ONNX GatherND: the last axis of ``idx`` indexes the first ``k`` axes of ``x`` after its
    ``batch_dims`` leading (shared) axes."""
    b, k = batch_dims, idx.shape[-1]
    xf = x.reshape((-1,) + tuple(x.shape[b:]))  # [B, ...] (B = 1 without batch dims)
    idf = idx.reshape((-1,) + tuple(idx.shape[b:]))  # [B, ..., k]
    cols = [idf[..., j] for j in range(k)]
    cols = [torch.where(c < 0, c + xf.shape[1 + j], c) for j, c in enumerate(cols)]
    bi = torch.arange(xf.shape[0]).reshape((-1,) + (1,) * (idf.dim() - 2))
    out = xf[(bi, *cols)]
    return out.reshape(tuple(x.shape[:b]) + tuple(idx.shape[b:-1]) + tuple(x.shape[b + k:]))


def _onnx_cumsum(x: torch.Tensor, axis: Any, exclusive: bool, reverse: bool) -> torch.Tensor:
    ax = int(_scalar(axis))
    if reverse:
        x = torch.flip(x, (ax,))
    y = torch.cumsum(x, ax)
    if exclusive:
        y = y - x
    return torch.flip(y, (ax,)) if reverse else y


def _onnx_split(x: torch.Tensor, axis: int, parts: int) -> tuple[torch.Tensor, ...]:
    """An ONNX Split into ``parts`` without sizes: chunks of ceil(size / parts), the last one
    what is left (possibly empty; onnxruntime refuses a negative one, and so does this)."""
    dim = x.shape[axis]
    size = -(-dim // parts)
    last = dim - size * (parts - 1)
    if last < 0:
        raise ValueError(f"Split of {dim} into {parts} parts of {size} would leave a negative last part")
    return torch.split(x, [size] * (parts - 1) + [last], axis)


def _onnx_max(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x)
    return out


def _onnx_min(*xs: torch.Tensor) -> torch.Tensor:
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(out, x)
    return out


def _onnx_reduce(x: torch.Tensor, op: str, axes: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """The ONNX Reduce* ops other than ReduceMean (over ``axes``; all of them when empty)."""
    axes = axes or tuple(range(x.dim()))
    if op == "ReduceSum":
        return torch.sum(x, axes, keepdim=keepdim)
    if op == "ReduceSumSquare":
        return torch.sum(x * x, axes, keepdim=keepdim)
    if op == "ReduceL2":
        return torch.sqrt(torch.sum(x * x, axes, keepdim=keepdim))
    if op == "ReduceL1":
        return torch.sum(torch.abs(x), axes, keepdim=keepdim)
    if op == "ReduceMax":
        return torch.amax(x, axes, keepdim=keepdim)
    if op == "ReduceMin":
        return torch.amin(x, axes, keepdim=keepdim)
    if op == "ReduceLogSumExp":
        return torch.logsumexp(x, axes, keepdim=keepdim)
    if op == "ReduceProd":
        for ax in sorted((a % x.dim() for a in axes), reverse=True):
            x = torch.prod(x, ax, keepdim=keepdim)
        return x
    raise ValueError(op)


class _OnnxImporter:
    def __init__(self, model, keep_dropout: bool = False):
        import onnx
        from onnx import numpy_helper

        self.onnx = onnx
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001
            inferred = model
        self.model = model
        self.ranks: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        self.types: dict[str, int] = {}  # ONNX element types (TensorProto.FLOAT ...)
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.ranks[vi.name] = len(tt.shape.dim)
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.keep_dropout = keep_dropout
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[str, Any] = {}  # ONNX value -> fx.Node, or a _Sym (a value computed from shapes)
        self.tensors: dict[str, fx.Node] = {}  # _Sym values made tensors for the ops that read them as such
        self.sizes: dict[tuple[fx.Node, int], fx.Node] = {}  # x.size(d) nodes, one per (x, d)
        self.names: set[str] = set()
        self.users: dict[str, int] = {}
        for n in model.graph.node:
            for i in n.input:
                self.users[i] = self.users.get(i, 0) + 1
        for o in model.graph.output:
            self.users[o.name] = self.users.get(o.name, 0) + 1

    def _name(self, node, op: str) -> str:
        """Exporter names like ``/features/features.0/Conv`` read as module path ``features.0``."""
        raw = node.name or (node.output[0] if node.output else op)
        parts = [p for p in raw.split("/") if p]
        if len(parts) >= 2 and parts[-1].split("_")[0] == op:
            parts = parts[:-1]
        path = join_scopes(parts) if parts else op.lower()
        segs = [re.sub(r"[^A-Za-z0-9_]", "_", seg) or "m" for seg in path.split(".")]
        segs = [("m" + seg) if seg[0] == "_" else seg for seg in segs]
        base = ".".join(segs)
        name, k = base, 1
        while any(name == t or name.startswith(t + ".") or t.startswith(name + ".") for t in self.names):
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def _add(self, node, op: str, mod: nn.Module, x: fx.Node) -> fx.Node:
        name = self._name(node, op)
        set_module(self.root, name, mod)
        return self.graph.call_module(name, (x,))

    def _val(self, name: str) -> fx.Node:
        if name in self.env:
            v = self.env[name]
            if isinstance(v, _Sym):  # a tensor op reads a value kept as shape arithmetic: make it a tensor
                if name not in self.tensors:
                    self.tensors[name] = self.graph.call_function(_sym_tensor, (tuple(v.items), v.scalar, v.dtype))
                return self.tensors[name]
            return v
        if name in self.consts:
            buf = "const_" + re.sub(r"[^A-Za-z0-9_]", "_", name)
            while hasattr(self.root, buf):
                buf += "_"
            self.root.register_buffer(buf, torch.from_numpy(np.array(self.consts[name])))
            node = self.graph.get_attr(buf)
            self.env[name] = node
            return node
        raise DropcliError(f"ONNX value {name!r} is used before it is defined")

    def _c(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def _sym(self, name: str) -> _Sym | None:
        """``name`` as a :class:`_Sym`: one computed from shapes, or a small integer constant
        (which shape arithmetic mixes in); None for anything else."""
        v = self.env.get(name)
        if isinstance(v, _Sym):
            return v
        c = self._c(name)
        if c is not None:
            c = np.asarray(c)
            if c.ndim <= 1 and c.size <= 64 and c.dtype.kind in "iub":
                dt = torch.bool if c.dtype.kind == "b" else torch.int64
                conv = bool if c.dtype.kind == "b" else int
                return _Sym([conv(x) for x in c.reshape(-1)], c.ndim == 0, dt)
        return None

    def _live_sym(self, ins: list[str]) -> list[_Sym] | None:
        """The inputs as :class:`_Sym` values when at least one is computed from shapes and the
        rest are small integer constants; else None (the op runs on tensors)."""
        if not any(isinstance(self.env.get(x), _Sym) for x in ins if x):
            return None
        syms = [self._sym(x) for x in ins if x]
        return None if any(v is None for v in syms) else syms  # type: ignore[return-value]

    def _size(self, x: fx.Node, d: int) -> fx.Node:
        if (x, d) not in self.sizes:
            self.sizes[(x, d)] = self.graph.call_method("size", (x, d))
        return self.sizes[(x, d)]

    def _items_op(self, fn: Callable[..., Any], *xs: Any) -> Any:
        """``fn`` on items of shape values: computed now when all are ints, else an fx node."""
        if all(isinstance(v, (int, bool)) for v in xs):
            return fn(*xs)
        return self.graph.call_function(fn, tuple(xs))

    def _sym_elementwise(self, syms: list[_Sym], fn: Callable[..., Any], dtype: torch.dtype | None = None) -> _Sym | None:
        lens = {len(v.items) for v in syms if not v.scalar and len(v.items) != 1}
        if len(lens) > 1:
            return None
        n = lens.pop() if lens else 1
        cols = [v.items if len(v.items) == n else v.items * n for v in syms]
        items = [self._items_op(fn, *row) for row in zip(*cols)]
        return _Sym(items, all(v.scalar for v in syms), dtype or syms[0].dtype)

    def _site_blocks(self) -> tuple[set[int], dict[int, tuple[str, str, nn.Module]]]:
        """dropcli's own ONNX sites (nodes named ``dropcli_site_N/...``, ending in ``.../select``):
        the node indices inside them, and per select node (site name, input, the site as a torch
        module). Only with ``keep_dropout`` (``dropcli finetune``)."""
        from dropcli.variants import get_variant

        g = self.model.graph
        nodes = list(g.node)
        inside: set[int] = set()
        selects: dict[int, tuple[str, str, nn.Module]] = {}
        for i, n in enumerate(nodes):
            if not (naming.is_select(n.name) and n.op_type == "Where"):
                continue
            site = naming.node_site(n.name)
            block = [j for j, m in enumerate(nodes) if m.name.startswith(naming.site_scope(site))]
            made = {o for j in block for o in nodes[j].output}
            ext = {x for j in block for x in nodes[j].input if x and x not in made and x not in self.consts and x != MC_INPUT}
            variant, p = naming.doc_variant(n.doc_string), naming.doc_p(n.doc_string)
            if len(ext) != 1 or variant is None or p is None:
                raise DropcliError(f"cannot read dropcli site {site} of this ONNX model",
                                   "remove the sites (dropcli inject --remove), then finetune with --after")
            spec = get_variant(variant)
            if {prm.name for prm in spec.params} != {"p"}:
                raise DropcliError(f"dropcli site {site} is a {variant} site with parameters besides p, which can't be re-loaded from ONNX",
                                   "remove it first (dropcli inject --remove --layers ...)")
            inside.update(block)
            selects[i] = (site, ext.pop(), spec.torch_module(p=p))
        return inside, selects

    def run(self) -> fx.GraphModule:
        g = self.model.graph
        inside, selects = self._site_blocks() if self.keep_dropout else (set(), {})
        roots, hidden = self._activation_patterns(inside)
        folded = self._folded_nodes()
        bad = sorted({n.op_type for i, n in enumerate(g.node)
                      if i not in inside and i not in hidden and i not in roots
                      and i not in folded and (n.op_type not in ONNX_OPS or n.domain not in ("", "ai.onnx"))})
        if bad:
            raise DropcliError(f"ONNX op{'s' if len(bad) > 1 else ''} {', '.join(bad)} {'are' if len(bad) > 1 else 'is'} not supported by dropcli's ONNX importer",
                               f"supported ops: {', '.join(ONNX_OPS)}; or pass the torch model instead")
        init_names = set(self.consts)
        for inp in g.input:
            if inp.name in init_names:
                continue
            if inp.name == MC_INPUT:
                if selects:
                    continue
                raise DropcliError("this ONNX model contains dropcli dropout sites (input 'dropcli_mc')",
                                   "prune the model without its sites (dropcli inject --remove), then inject again")
            ph = self.graph.placeholder(re.sub(r"[^A-Za-z0-9_]", "_", inp.name) or "x")
            self.env[inp.name] = ph
        for i, node in enumerate(g.node):
            if i in selects:
                site, x, mod = selects[i]
                set_module(self.root, site, mod)
                self.env[node.output[0]] = self.graph.call_module(site, (self._val(x),))
            elif i in roots:  # an activation spelled as several ops becomes its one module
                m = roots[i]
                self.env[node.output[0]] = self._add(node, m.kind, _PATTERN_MODULES[m.name](), self._val(m.x))
            elif i not in inside and i not in hidden:
                self._node(node)
        outs = [self._val(o.name) for o in g.output]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(self.root, self.graph, "ImportedOnnx")
        gm.graph.eliminate_dead_code()  # sizes and recurrent states that nothing reads
        gm.recompile()
        gm.eval()
        return gm

    def _activation_patterns(self, inside: set[int]) -> tuple[dict[int, Any], set[int]]:
        """Activations spelled as several ops (:mod:`dropcli.model.patterns`): their last nodes
        (index -> match) and the nodes inside them."""
        from dropcli.model.patterns import OnnxPatternView, find_patterns

        nodes = list(self.model.graph.node)
        folded = dict(self.consts)
        for n in nodes:
            if n.op_type == "Constant" and n.output and "value" in _onnx_attrs(n):
                from onnx import numpy_helper

                folded[n.output[0]] = numpy_helper.to_array(_onnx_attrs(n)["value"])
        view = OnnxPatternView(nodes, lambda v: None if v == MC_INPUT else folded.get(v), {o.name for o in self.model.graph.output})
        where = {n.output[0]: i for i, n in enumerate(nodes) if n.output}
        roots: dict[int, Any] = {}
        hidden: set[int] = set()
        for m in find_patterns(view, [n.output[0] for i, n in enumerate(nodes) if n.output and i not in inside]):
            if m.name in _PATTERN_MODULES:
                roots[where[m.root]] = m
                hidden |= {where[v] for v in m.interior if v != m.root}
        return roots, hidden

    def _folded_nodes(self) -> set[int]:
        """The nodes whose inputs will all be constants, so :meth:`_fold` evaluates them at import
        (shape arithmetic that exporters write out, e.g. the legacy exporter's padding of
        TF-style 'same' convolutions: ConstantOfShape/Concat/Slice/Transpose/Cast)."""
        known = {x for x in self.consts if x != MC_INPUT}
        out: set[int] = set()
        for i, n in enumerate(self.model.graph.node):
            if n.op_type == "Constant":
                known.update(n.output)
            elif (n.op_type not in _NEVER_FOLD and n.op_type not in _MODULE_OPS and n.domain in ("", "ai.onnx") and n.output
                  and all(not x or x in known for x in n.input)):
                known.update(o for o in n.output if o)
                out.add(i)
        return out

    def _fold(self, node) -> bool:
        """Evaluate ``node`` now when all its inputs are constants (onnx's reference evaluator)."""
        if node.op_type in _NEVER_FOLD or not node.output or any(x and (x not in self.consts or x == MC_INPUT) for x in node.input):
            return False
        if node.op_type in _MODULE_OPS:
            return False  # a layer with constant input is still a layer (rare; keep it a module)
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 17)
        ins = [x for x in node.input if x]
        inputs = [helper.make_tensor_value_info(x, helper.np_dtype_to_tensor_dtype(np.asarray(self.consts[x]).dtype), None) for x in ins]
        outputs = [helper.make_tensor_value_info(o, 0, None) for o in node.output if o]
        g = helper.make_graph([node], "fold", inputs, outputs)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        try:
            res = ReferenceEvaluator(m).run(None, {x: np.asarray(self.consts[x]) for x in ins})
        except Exception as e:  # noqa: BLE001
            if node.op_type in ONNX_HANDLERS:
                return False  # onnx's evaluator failed (it does on some GatherElements): computed by torch at run time
            raise self._unsupported(node, f"its constant inputs could not be folded ({type(e).__name__}: {str(e)[:100]})") from e
        for o, v in zip([o for o in node.output if o], res):
            self.consts[o] = np.array(v)  # a writable copy
        return True

    def _node(self, node) -> None:
        if self._fold(node):
            return
        a = _onnx_attrs(node)
        handler = ONNX_HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            raise self._unsupported(node)
        handler(self, node, a, list(node.input), node.output[0] if node.output else None)
        for o in node.output:  # shape arithmetic that came out constant is a constant (folded onwards)
            v = self.env.get(o)
            if isinstance(v, _Sym) and all(isinstance(i, (int, bool)) for i in v.items):
                dt = np.bool_ if v.dtype == torch.bool else np.int64
                self.consts[o] = np.array(v.items[0] if v.scalar else v.items, dtype=dt)
                del self.env[o]

    # ---- one handler per ONNX op (or family); registration order is the order of ONNX_OPS

    @onnx_op("Gemm")
    def _gemm(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        w, c = self._c(ins[1]), self._c(ins[2]) if len(ins) > 2 else None
        if w is None or a.get("transA", 0) or (len(ins) > 2 and ins[2] and c is None):
            raise self._unsupported(node, "only Gemm with a constant B (and C) and transA=0 is supported")
        w = w if a.get("transB", 0) else w.T
        w = w * a.get("alpha", 1.0)
        b = None if c is None else np.array(np.broadcast_to(c * a.get("beta", 1.0), (w.shape[0],)))
        mod = _linear_module(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)),
                             None if b is None else torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)))
        self.env[out] = self._add(node, "Gemm", mod, self._val(ins[0]))

    @onnx_op("MatMul")
    def _matmul(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        w = self._c(ins[1])
        if w is None or w.ndim != 2 or self._c(ins[0]) is not None:
            # a product of two computed values (attention's Q K^T, the weights times V), or by a
            # batch of matrices: torch.matmul (same broadcasting as ONNX MatMul)
            self.env[out] = self.graph.call_function(torch.matmul, (self._val(ins[0]), self._val(ins[1])))
            return
        mod = _linear_module(torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)), None)
        self.env[out] = self._add(node, "MatMul", mod, self._val(ins[0]))

    _ARITH = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}

    @onnx_op(*_ARITH)
    def _arith(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        op = node.op_type
        x0, x1 = ins[0], ins[1]
        syms = self._live_sym([x0, x1])
        if syms is not None:
            fn = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _trunc_div}[op]
            res = self._sym_elementwise(syms, fn)
            if res is not None:
                self.env[out] = res
                return
        # MatMul + Add(bias): fold into the Linear that MatMul became
        if op == "Add":
            for lin, bias in ((x0, x1), (x1, x0)):
                prod = self.env.get(lin)
                bv = self._c(bias)
                if (prod is not None and bv is not None and prod.op == "call_module"
                        and self.users.get(lin, 0) == 1):
                    m = self.root.get_submodule(prod.target)
                    if isinstance(m, nn.Linear) and m.bias is None and bv.size == m.out_features and (bv.ndim <= 1 or bv.shape[-1] == bv.size):
                        m.bias = nn.Parameter(torch.from_numpy(np.array(bv.reshape(-1), dtype=np.float32)))
                        self.env[out] = prod
                        return
        fn = self._ARITH[op]
        if op == "Div" and self.types.get(out, 1) not in _FLOAT_TYPES:
            fn = _onnx_div  # integer division truncates
        self.env[out] = self.graph.call_function(fn, (self._val(x0), self._val(x1)))

    @onnx_op("Conv")
    def _conv(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        w = self._c(ins[1])
        b = self._c(ins[2]) if len(ins) > 2 and ins[2] else None
        if w is None or (len(ins) > 2 and ins[2] and b is None):
            raise self._unsupported(node, "only Conv with constant weights is supported")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self._unsupported(node, "auto_pad is not supported; re-export with explicit pads")
        nd = w.ndim - 2
        if nd not in (1, 2):
            raise self._unsupported(node, f"{nd}-d convolutions are not supported")
        x = self._val(ins[0])
        pads = [int(p) for p in a.get("pads", [0] * (2 * nd))]
        if pads[:nd] != pads[nd:]:  # asymmetric (TF-style 'same'): the extra part as an explicit zero pad
            common = [min(pads[k], pads[nd + k]) for k in range(nd)]
            extra: list[int] = []
            for k in range(nd - 1, -1, -1):  # F.pad lists the last axis first
                extra += [pads[k] - common[k], pads[nd + k] - common[k]]
            x = self.graph.call_function(torch.nn.functional.pad, (x, tuple(extra)), {"mode": "constant", "value": 0.0})
            pads = common + common
        mod = _conv_module(torch.from_numpy(w.astype(np.float32)), None if b is None else torch.from_numpy(b.astype(np.float32)),
                           a.get("strides", [1] * nd), _sym_pads(pads, nd, "Conv"), a.get("dilations", [1] * nd),
                           int(a.get("group", 1)))
        self.env[out] = self._add(node, "Conv", mod, x)

    @onnx_op("BatchNormalization")
    def _batchnorm(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        if len(node.output) > 1 and any(self.users.get(o) for o in node.output[1:]):
            raise self._unsupported(node, "training-mode outputs are used")
        vals = [self._c(i) for i in ins[1:5]]
        if any(v is None for v in vals):
            raise self._unsupported(node, "only BatchNormalization with constant parameters is supported")
        scale, bias, mean, var = (torch.from_numpy(v.astype(np.float32)) for v in vals)
        mod = _bn_module(scale, bias, mean, var, a.get("epsilon", 1e-5), self.ranks.get(ins[0]))
        self.env[out] = self._add(node, "BatchNormalization", mod, self._val(ins[0]))

    # elementwise ops that become one parameter-free module, built from the node's attributes
    _ACTIVATIONS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
        "Relu": lambda a: nn.ReLU(),
        "LeakyRelu": lambda a: nn.LeakyReLU(a.get("alpha", 0.01)),
        "Sigmoid": lambda a: nn.Sigmoid(),
        "Tanh": lambda a: nn.Tanh(),
        "Elu": lambda a: nn.ELU(a.get("alpha", 1.0)),
        "Selu": lambda a: nn.SELU(),
        "Softplus": lambda a: nn.Softplus(),
        "Softmax": lambda a: nn.Softmax(dim=int(a.get("axis", -1))),
        "LogSoftmax": lambda a: nn.LogSoftmax(dim=int(a.get("axis", -1))),
    }

    @onnx_op(*_ACTIVATIONS)
    def _activation(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        op = node.op_type
        if op == "Selu" and (abs(a.get("alpha", 1.67326319) - 1.6732632) > 1e-5 or abs(a.get("gamma", 1.05070102) - 1.0507010) > 1e-5):
            raise self._unsupported(node, "only SELU's standard constants are supported")
        self.env[out] = self._add(node, op, self._ACTIVATIONS[op](a), self._val(ins[0]))

    @onnx_op("Clip")
    def _clip(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        lo = self._c(ins[1]) if len(ins) > 1 and ins[1] else a.get("min")
        hi = self._c(ins[2]) if len(ins) > 2 and ins[2] else a.get("max")
        lo = float("-inf") if lo is None else float(np.asarray(lo))
        hi = float("inf") if hi is None else float(np.asarray(hi))
        mod = nn.ReLU() if lo == 0 and hi == float("inf") else nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi)
        self.env[out] = self._add(node, "Clip", mod, self._val(ins[0]))

    @onnx_op("MaxPool", "AveragePool")
    def _pool(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        op = node.op_type
        k = list(a["kernel_shape"])
        nd = len(k)
        if nd not in (1, 2) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise self._unsupported(node, "only 1-d/2-d pooling with explicit pads is supported")
        if len(node.output) > 1 and self.users.get(node.output[1]):
            raise self._unsupported(node, "its indices output is used")
        kw = dict(kernel_size=tuple(k), stride=tuple(a.get("strides", [1] * nd)),
                  padding=_sym_pads(a.get("pads"), nd, op), ceil_mode=bool(a.get("ceil_mode", 0)))
        if op == "MaxPool":
            mod = (nn.MaxPool1d if nd == 1 else nn.MaxPool2d)(dilation=tuple(a.get("dilations", [1] * nd)), **kw)
        else:
            mod = (nn.AvgPool1d if nd == 1 else nn.AvgPool2d)(count_include_pad=bool(a.get("count_include_pad", 0)), **kw)
        self.env[out] = self._add(node, op, mod, self._val(ins[0]))

    @onnx_op("GlobalAveragePool")
    def _global_average_pool(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self._add(node, "GlobalAveragePool", _global_pool(self.ranks.get(ins[0])), self._val(ins[0]))

    @onnx_op("Flatten")
    def _flatten(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axis = int(a.get("axis", 1))
        if axis != 1:
            self.env[out] = self.graph.call_function(_onnx_flatten, (self._val(ins[0]), axis))
            return
        self.env[out] = self._add(node, "Flatten", nn.Flatten(1), self._val(ins[0]))

    @onnx_op("Reshape")
    def _reshape(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        shape = self._c(ins[1])
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym) and shape is not None and np.asarray(shape).size == 1 and int(np.asarray(shape).reshape(-1)[0]) in (-1, len(sym.items)):
            self.env[out] = _Sym(sym.items, False, sym.dtype)  # a shape vector reshaped to 1-d (the legacy exporter's habit)
            return
        if shape is None:  # a shape computed at run time (the batch size, the sequence length ...)
            sym = self._sym(ins[1])
            target = tuple(sym.items) if sym is not None else self._val(ins[1])
            self.env[out] = self.graph.call_function(_onnx_reshape, (self._val(ins[0]), target, bool(a.get("allowzero", 0))))
            return
        x = self._val(ins[0])
        target = [int(v) for v in shape.reshape(-1)]
        src = self.shapes.get(ins[0])
        if (len(target) == 2 and target[0] in (-1, 0) and src and len(src) >= 2 and all(d for d in src[1:])
                and int(np.prod(src[1:])) == target[1]):
            # [N, C, 1, 1] -> [-1, C]: a flatten, written as one so that it still holds when
            # pruning removes channels
            self.env[out] = self.graph.call_function(torch.flatten, (x, 1))
            return
        dims: list[Any] = []
        for i, d in enumerate(target):
            if d == 0 and not a.get("allowzero", 0):
                dims.append(self.graph.call_method("size", (x, i)))
            else:
                dims.append(d)
        self.env[out] = self.graph.call_function(torch.reshape, (x, tuple(dims)))

    @onnx_op("Dropout", "Identity")
    def _dropout(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        op = node.op_type
        if len(node.output) > 1 and self.users.get(node.output[1]):
            raise self._unsupported(node, "its mask output is used")
        if op == "Dropout" and self.keep_dropout:
            # an nn.Dropout (identity in eval mode) that keeps the site and its ratio
            ratio = self._c(ins[1]) if len(ins) > 1 and ins[1] else a.get("ratio", 0.5)
            if ratio is None:
                raise self._unsupported(node, "its ratio is not a constant")
            self.env[out] = self._add(node, op, nn.Dropout(float(np.asarray(ratio))), self._val(ins[0]))
            return
        if isinstance(self.env.get(ins[0]), _Sym):
            self.env[out] = self.env[ins[0]]
        elif ins[0] in self.consts and ins[0] not in self.env:
            self.consts[out] = self.consts[ins[0]]
        else:
            self.env[out] = self._val(ins[0])

    @onnx_op("LayerNormalization")
    def _layernorm(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        if len(node.output) > 1 and any(self.users.get(o) for o in node.output[1:] if o):
            raise self._unsupported(node, "its mean / inverse-std outputs are used")
        scale = self._c(ins[1])
        bias = self._c(ins[2]) if len(ins) > 2 and ins[2] else None
        if scale is None or (len(ins) > 2 and ins[2] and bias is None):
            raise self._unsupported(node, "only LayerNormalization with constant scale and bias is supported")
        axis, rank = int(a.get("axis", -1)), self.ranks.get(ins[0])
        if axis < 0:
            axis = (rank + axis) if rank is not None else (-axis if scale.ndim == -axis else None)
        n_dims = (rank - axis) if rank is not None and axis is not None else scale.ndim
        shape = tuple(int(d) for d in scale.shape[-n_dims:]) if scale.ndim >= n_dims else None
        if shape is None or len(shape) != n_dims or int(a.get("stash_type", 1)) != 1:
            raise self._unsupported(node, "its normalised shape can't be read from its scale")
        mod = nn.LayerNorm(shape, eps=float(a.get("epsilon", 1e-5)), elementwise_affine=True, bias=True)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.broadcast_to(scale, shape).astype(np.float32)))
            mod.bias.copy_(torch.from_numpy(np.broadcast_to(bias if bias is not None else np.zeros(shape, np.float32), shape).astype(np.float32)))
        self.env[out] = self._add(node, "LayerNormalization", mod, self._val(ins[0]))

    @onnx_op("InstanceNormalization")
    def _instancenorm(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        # per example and channel over the remaining axes: a GroupNorm with one group per channel
        # (the exporters write GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add)
        scale, bias = self._c(ins[1]), self._c(ins[2])
        if scale is None or bias is None or np.asarray(scale).ndim != 1:
            raise self._unsupported(node, "only InstanceNormalization with constant 1-d scale and bias is supported")
        c = int(np.asarray(scale).shape[0])
        mod = nn.GroupNorm(c, c, eps=float(a.get("epsilon", 1e-5)), affine=True)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.asarray(scale, dtype=np.float32)))
            mod.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
        self.env[out] = self._add(node, "InstanceNormalization", mod, self._val(ins[0]))

    _UNARY = {"Erf": torch.erf, "Sqrt": torch.sqrt, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log,
              "Abs": torch.abs, "Reciprocal": torch.reciprocal}

    @onnx_op(*_UNARY)
    def _unary(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self.graph.call_function(self._UNARY[node.op_type], (self._val(ins[0]),))

    @onnx_op("Pow")
    def _pow(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        e = self._c(ins[1])
        exp: Any = float(np.asarray(e)) if e is not None and np.asarray(e).size == 1 else self._val(ins[1])
        self.env[out] = self.graph.call_function(torch.pow, (self._val(ins[0]), exp))

    def _axes(self, node, a: dict[str, Any], ins: list[str], k: int = 1) -> list[int] | None:
        """The ``axes`` of a reduce / squeeze op: an attribute (older opsets) or input ``k`` (a constant)."""
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(ins) > k and ins[k]:
            v = self._c(ins[k])
            if v is None:
                raise self._unsupported(node, "only constant axes are supported")
            return [int(x) for x in np.asarray(v).reshape(-1)]
        return None

    @onnx_op("ReduceMean")
    def _reduce_mean(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axes = self._axes(node, a, ins)
        x = self._val(ins[0])
        keep = bool(a.get("keepdims", 1))
        if axes is None or not axes:
            if a.get("noop_with_empty_axes", 0):
                self.env[out] = x
                return
            rank = self.ranks.get(ins[0])
            if rank is None:
                raise self._unsupported(node, "reducing over all axes needs the input's rank")
            axes = list(range(rank))
        self.env[out] = self.graph.call_function(torch.mean, (x, tuple(axes)), {"keepdim": keep})

    @onnx_op("Squeeze")
    def _squeeze(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axes = self._axes(node, a, ins)
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym) and not sym.scalar and len(sym.items) == 1:
            self.env[out] = _Sym(sym.items, True, sym.dtype)
            return
        x = self._val(ins[0])
        self.env[out] = self.graph.call_function(torch.squeeze, (x,) if axes is None else (x, tuple(axes)))

    @onnx_op("Unsqueeze")
    def _unsqueeze(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axes = self._axes(node, a, ins)
        if not axes:
            raise self._unsupported(node, "Unsqueeze needs its axes")
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym) and sym.scalar and axes in ([0], [-1]):
            self.env[out] = _Sym(sym.items, False, sym.dtype)
            return
        rank = self.ranks.get(ins[0])
        if any(ax < 0 for ax in axes):
            if rank is None:
                raise self._unsupported(node, "negative axes need the input's rank")
            axes = [ax + rank + len(axes) if ax < 0 else ax for ax in axes]
        v = self._val(ins[0])
        for ax in sorted(axes):  # ONNX axes index the output
            v = self.graph.call_function(torch.unsqueeze, (v, ax))
        self.env[out] = v

    @onnx_op("Transpose")
    def _transpose(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        perm = a.get("perm")
        if perm is None:
            rank = self.ranks.get(ins[0])
            if rank is None:
                raise self._unsupported(node, "a Transpose without perm needs the input's rank")
            perm = list(range(rank))[::-1]
        self.env[out] = self.graph.call_function(torch.permute, (self._val(ins[0]), tuple(int(p) for p in perm)))

    @onnx_op("Concat")
    def _concat(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        syms = self._live_sym(ins)
        if syms is not None and all(not v.scalar for v in syms):
            self.env[out] = _Sym([i for v in syms for i in v.items], False, syms[0].dtype)
            return
        self.env[out] = self.graph.call_function(torch.cat, ([self._val(x) for x in ins if x],), {"dim": int(a["axis"])})

    @onnx_op("Slice")
    def _slice(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        vals = [self._sym(x) if len(ins) > k and (x := ins[k]) else None for k in range(1, 5)]
        starts, ends, axes, steps = vals
        if starts is None or ends is None or any(len(ins) > k and ins[k] and vals[k - 1] is None for k in range(1, 5)):
            raise self._unsupported(node, "only Slice with constant (or shape-computed) starts/ends/axes/steps is supported")
        if (axes is not None and not all(isinstance(v, int) for v in axes.items)) or (
                steps is not None and not all(isinstance(v, int) for v in steps.items)):
            raise self._unsupported(node, "only Slice with constant axes and steps is supported")
        starts_l, ends_l = list(starts.items), list(ends.items)
        axes_l = list(axes.items) if axes is not None else list(range(len(starts_l)))
        steps_l = list(steps.items) if steps is not None else [1] * len(starts_l)
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym) and not sym.scalar and axes_l in ([0], [-1]) and all(isinstance(v, int) for v in starts_l + ends_l):
            self.env[out] = _Sym(sym.items[slice(starts_l[0], ends_l[0], steps_l[0])], False, sym.dtype)
            return
        starts, ends = starts_l, ends_l
        rank = self.ranks.get(ins[0])
        if any(ax < 0 for ax in axes_l):
            if rank is None:
                raise self._unsupported(node, "negative axes need the input's rank")
            axes_l = [ax + rank if ax < 0 else ax for ax in axes_l]
        big = 2 ** 62
        index: list[Any] = [slice(None)] * (max(axes_l) + 1)
        for st, en, ax, sp in zip(starts, ends, axes_l, steps_l):
            if sp <= 0:
                raise self._unsupported(node, "only positive Slice steps are supported")
            index[ax] = slice(st, None if isinstance(en, int) and en >= big else en, sp)
        self.env[out] = self.graph.call_function(operator.getitem, (self._val(ins[0]), tuple(index)))

    @onnx_op("Cast")
    def _cast(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        from onnx import helper

        dt = torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(int(a["to"])))).dtype
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym) and dt in (torch.int64, torch.int32) and sym.dtype != torch.bool:
            self.env[out] = sym  # sizes are integers either way
            return
        self.env[out] = self.graph.call_method("to", (self._val(ins[0]), dt))

    @onnx_op("Pad")
    def _pad(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        pads = self._c(ins[1]) if len(ins) > 1 and ins[1] else (np.array(a["pads"]) if "pads" in a else None)
        value = self._c(ins[2]) if len(ins) > 2 and ins[2] else np.array(a.get("value", 0.0))
        if pads is None or value is None:
            raise self._unsupported(node, "only Pad with constant pads and value is supported")
        pads = [int(v) for v in pads.reshape(-1)]
        rank = self.ranks.get(ins[0])
        axes = self._axes(node, {}, ins, 3) if len(ins) > 3 and ins[3] else None
        if axes is None:
            axes = list(range(len(pads) // 2))
        if any(ax < 0 for ax in axes):
            if rank is None:
                raise self._unsupported(node, "negative axes need the input's rank")
            axes = [ax + rank if ax < 0 else ax for ax in axes]
        nd = len(axes)
        per = {ax: (pads[k], pads[nd + k]) for k, ax in enumerate(axes)}
        last = max(per) if per else 0
        if rank is not None:
            last = rank - 1
        torch_pads: list[int] = []
        for ax in range(last, -1, -1):  # torch's F.pad lists the last axis first
            torch_pads += list(per.get(ax, (0, 0)))
        while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
            torch_pads = torch_pads[:-2]
        tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
        if tmode is None:
            raise self._unsupported(node, f"Pad mode {mode!r} is not supported")
        kw = {"mode": tmode}
        if tmode == "constant":
            kw["value"] = float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
        self.env[out] = self.graph.call_function(torch.nn.functional.pad, (self._val(ins[0]), tuple(torch_pads)), kw)

    @onnx_op("Constant")
    def _constant(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        from onnx import numpy_helper

        forms = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32, "value_floats": np.float32}
        if "value" in a:
            self.consts[out] = numpy_helper.to_array(a["value"])
        elif len(a) == 1 and next(iter(a)) in forms:
            k = next(iter(a))
            self.consts[out] = np.array(a[k], dtype=forms[k])
        else:
            raise self._unsupported(node, "only Constant nodes with a tensor, int(s) or float(s) value are supported")

    # ---- shapes and the tensors built from them (transformers' masks and position ids)

    @onnx_op("Shape")
    def _shape(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym):  # the shape of shape arithmetic is known now
            self.consts[out] = np.array([] if sym.scalar else [len(sym.items)], dtype=np.int64)
            return
        rank = self.ranks.get(ins[0])
        x = self._val(ins[0])
        if rank is None:
            if "start" in a or "end" in a:
                raise self._unsupported(node, "Shape with start/end needs its input's rank")
            self.env[out] = self.graph.call_function(_shape_tensor, (x,))
            return
        start, end = int(a.get("start", 0)), int(a.get("end", rank))
        start, end = (v + rank if v < 0 else v for v in (start, end))
        start, end = min(max(start, 0), rank), min(max(end, 0), rank)
        self.env[out] = _Sym([self._size(x, d) for d in range(start, end)])

    @onnx_op("Gather")
    def _gather(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axis = int(a.get("axis", 0))
        data, idx = self._c(ins[0]), self._c(ins[1])
        sym = self._sym(ins[0]) if isinstance(self.env.get(ins[0]), _Sym) else None
        if sym is not None and idx is not None and axis == 0 and np.asarray(idx).ndim <= 1:  # picking sizes out of a Shape
            n = len(sym.items)
            picked = [sym.items[int(i) + n if int(i) < 0 else int(i)] for i in np.asarray(idx).reshape(-1)]
            self.env[out] = _Sym(picked, np.asarray(idx).ndim == 0, sym.dtype)
            return
        if (data is not None and idx is None and axis == 0 and data.ndim == 2
                and np.asarray(data).dtype.kind == "f"):
            # a lookup table read with computed ids: an nn.Embedding holding it (ids must be in
            # range; onnxruntime would also wrap negative ones)
            mod = nn.Embedding(data.shape[0], data.shape[1])
            with torch.no_grad():
                mod.weight.copy_(torch.from_numpy(np.array(data, dtype=np.float32)))
            self.env[out] = self._add(node, "Gather", mod, self._val(ins[1]))
            return
        x = self._val(ins[0])
        if idx is not None and np.asarray(idx).ndim == 0:
            self.env[out] = self.graph.call_method("select", (x, axis, int(idx)))
            return
        self.env[out] = self.graph.call_function(_onnx_gather, (x, self._val(ins[1]), axis))

    @onnx_op("GatherElements")
    def _gather_elements(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self.graph.call_function(_onnx_gather_elements, (self._val(ins[0]), self._val(ins[1]), int(a.get("axis", 0))))

    @onnx_op("GatherND")
    def _gather_nd(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self.graph.call_function(_onnx_gather_nd, (self._val(ins[0]), self._val(ins[1]), int(a.get("batch_dims", 0))))

    def _shape_arg(self, name: str) -> Any:
        """A shape operand: its items when kept as shape arithmetic or a constant, else the tensor node."""
        sym = self._sym(name)
        return tuple(sym.items) if sym is not None else self._val(name)

    @onnx_op("Expand")
    def _expand(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self.graph.call_function(_onnx_expand, (self._val(ins[0]), self._shape_arg(ins[1])))

    @onnx_op("ConstantOfShape")
    def _constant_of_shape(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        from onnx import numpy_helper

        v = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        dt = torch.from_numpy(np.zeros(0, dtype=v.dtype)).dtype
        self.env[out] = self.graph.call_function(_onnx_full, (self._shape_arg(ins[0]), v.reshape(-1)[0].item(), dt))

    @onnx_op("Range")
    def _range(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        args = []
        for x in ins[:3]:
            sym = self._sym(x)
            if sym is not None and sym.scalar:
                args.append(sym.items[0])
            elif x in self.consts:
                args.append(np.asarray(self.consts[x]).reshape(-1)[0].item())
            else:
                args.append(self._val(x))
        t = self.types.get(ins[0]) or self.types.get(out)
        if t is None and ins[0] in self.consts:
            dt = torch.from_numpy(np.zeros(0, dtype=np.asarray(self.consts[ins[0]]).dtype)).dtype
        else:
            from onnx import helper

            dt = torch.from_numpy(np.zeros(0, dtype=helper.tensor_dtype_to_np_dtype(t or 7))).dtype
        self.env[out] = self.graph.call_function(_onnx_range, (*args, dt))

    # ---- comparisons, logic, selection

    _COMPARE = {"Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge,
                "LessOrEqual": torch.le, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor}
    _SYM_COMPARE = {"Equal": operator.eq, "Greater": operator.gt, "Less": operator.lt, "GreaterOrEqual": operator.ge,
                    "LessOrEqual": operator.le}

    @onnx_op(*_COMPARE)
    def _compare(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        op = node.op_type
        syms = self._live_sym(ins[:2])
        if syms is not None and op in self._SYM_COMPARE:
            res = self._sym_elementwise(syms, self._SYM_COMPARE[op], torch.bool)
            if res is not None:
                self.env[out] = res
                return
        self.env[out] = self.graph.call_function(self._COMPARE[op], (self._val(ins[0]), self._val(ins[1])))

    @onnx_op("Not")
    def _not(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self.graph.call_function(torch.logical_not, (self._val(ins[0]),))

    @onnx_op("IsNaN")
    def _isnan(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        self.env[out] = self.graph.call_function(torch.isnan, (self._val(ins[0]),))

    @onnx_op("IsInf")
    def _isinf(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        pos, neg = int(a.get("detect_positive", 1)), int(a.get("detect_negative", 1))
        fn = torch.isinf if pos and neg else torch.isposinf if pos else torch.isneginf
        if not (pos or neg):
            raise self._unsupported(node, "IsInf that detects neither sign")
        self.env[out] = self.graph.call_function(fn, (self._val(ins[0]),))

    @onnx_op("Where")
    def _where(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        syms = self._live_sym(ins[:3])
        if syms is not None:
            res = self._sym_elementwise(syms, _pick, syms[1].dtype)
            if res is not None:
                self.env[out] = res
                return
        self.env[out] = self.graph.call_function(torch.where, tuple(self._val(x) for x in ins[:3]))

    @onnx_op("Max", "Min")
    def _max_min(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        fn = _onnx_max if node.op_type == "Max" else _onnx_min
        self.env[out] = self.graph.call_function(fn, tuple(self._val(x) for x in ins if x))

    @onnx_op("CumSum")
    def _cumsum(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axis = self._c(ins[1])
        ax: Any = int(np.asarray(axis).reshape(-1)[0]) if axis is not None else self._val(ins[1])
        self.env[out] = self.graph.call_function(
            _onnx_cumsum, (self._val(ins[0]), ax, bool(a.get("exclusive", 0)), bool(a.get("reverse", 0))))

    @onnx_op("Split")
    def _split(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axis = int(a.get("axis", 0))
        x = self._val(ins[0])
        sizes = self._c(ins[1]) if len(ins) > 1 and ins[1] else (np.array(a["split"]) if "split" in a else None)
        if len(ins) > 1 and ins[1] and sizes is None:
            raise self._unsupported(node, "only Split with constant sizes is supported")
        if sizes is not None:
            parts = self.graph.call_function(torch.split, (x, [int(v) for v in np.asarray(sizes).reshape(-1)], axis))
        else:
            parts = self.graph.call_function(_onnx_split, (x, axis, int(a.get("num_outputs", len(node.output)))))
        for k, o in enumerate(node.output):
            if o:
                self.env[o] = self.graph.call_function(operator.getitem, (parts, k))

    _REDUCE = ("ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceL1", "ReduceMax", "ReduceMin", "ReduceLogSumExp", "ReduceProd")

    @onnx_op(*_REDUCE)
    def _reduce(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        axes = self._axes(node, a, ins)
        sym = self.env.get(ins[0])
        if isinstance(sym, _Sym) and not sym.scalar and node.op_type in ("ReduceProd", "ReduceSum") and sym.items and (
                axes is None and not a.get("noop_with_empty_axes", 0) or axes in ([0], [-1])):
            # a product or sum of sizes (a flattened length): kept as shape arithmetic
            fn = operator.mul if node.op_type == "ReduceProd" else operator.add
            acc = sym.items[0]
            for v in sym.items[1:]:
                acc = self._items_op(fn, acc, v)
            self.env[out] = _Sym([acc], not a.get("keepdims", 1), sym.dtype)
            return
        x = self._val(ins[0])
        if not axes and a.get("noop_with_empty_axes", 0):
            self.env[out] = x
            return
        self.env[out] = self.graph.call_function(_onnx_reduce, (x, node.op_type, tuple(axes or ()), bool(a.get("keepdims", 1))))

    # ---- recurrent layers: nn.LSTM / nn.GRU / nn.RNN modules

    @onnx_op("LSTM", "GRU", "RNN")
    def _rnn(self, node, a: dict[str, Any], ins: list[str], out: str | None) -> None:
        from dropcli.backends.torch.importer_rnn import rnn_module

        op = node.op_type
        mod, ndir = rnn_module(node, a, ins, self.consts, lambda why: self._unsupported(node, why))
        x = self._val(ins[0])
        states = [ins[k] if len(ins) > k and ins[k] else None for k in ((5, 6) if op == "LSTM" else (5,))]
        hx = [self._val(s) if s else None for s in states]  # [dir, batch, hidden], as torch's
        if op == "LSTM" and any(h is not None for h in hx):
            h, c = hx
            ref = h if h is not None else c
            h = h if h is not None else self.graph.call_function(torch.zeros_like, (ref,))
            c = c if c is not None else self.graph.call_function(torch.zeros_like, (ref,))
            args: tuple = (x, (h, c))
        elif op != "LSTM" and hx[0] is not None:
            args = (x, hx[0])
        else:
            args = (x,)
        name = self._name(node, op)
        set_module(self.root, name, mod)
        res = self.graph.call_module(name, args)
        outs = list(node.output) + [""] * 3
        if outs[0]:
            y = self.graph.call_function(operator.getitem, (res, 0))
            y = self.graph.call_method("unflatten", (y, -1, (ndir, mod.hidden_size)))  # [seq, batch, dir, hidden]
            y = self.graph.call_method("transpose", (y, 1, 2))  # ONNX's [seq, dir, batch, hidden]
            self.env[outs[0]] = y
        state = self.graph.call_function(operator.getitem, (res, 1)) if outs[1] or outs[2] else None
        for k in (1, 2):
            if not outs[k]:
                continue
            self.env[outs[k]] = state if op != "LSTM" else self.graph.call_function(operator.getitem, (state, k - 1))


    def _unsupported(self, node, why: str | None = None) -> DropcliError:
        label = f"ONNX op {node.op_type}" + (f" (node {node.name})" if node.name else "")
        if why:
            return DropcliError(f"{label} can't be imported: {why}", "re-export the model, or pass the torch model instead")
        return DropcliError(f"{label} is not supported by dropcli's ONNX importer",
                            f"supported ops: {', '.join(ONNX_OPS)}; or pass the torch model instead")


# ONNX element types of floating-point tensors (FLOAT, FLOAT16, DOUBLE, BFLOAT16)
_FLOAT_TYPES = {1, 10, 11, 16}
# never evaluated at import, even with constant inputs (random or stateful)
_NEVER_FOLD = {"Dropout", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}
# ops that carry trained weights: kept as modules
_MODULE_OPS = {"Gemm", "MatMul", "Conv", "BatchNormalization", "LayerNormalization", "InstanceNormalization", "LSTM", "GRU", "RNN"}
# activation patterns (dropcli.model.patterns names) -> the module they become
_PATTERN_MODULES: dict[str, Callable[[], nn.Module]] = {
    "gelu-erf": nn.GELU, "gelu-tanh": lambda: nn.GELU(approximate="tanh"), "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "silu": nn.SiLU,
}

# the supported ONNX ops, in registration order (named in errors; listed in docs/onnx.md)
ONNX_OPS: tuple[str, ...] = tuple(ONNX_HANDLERS)


def _global_pool(rank: int | None) -> nn.Module:
    return nn.AdaptiveAvgPool1d(1) if rank == 3 else nn.AdaptiveAvgPool2d(1)


def from_onnx(model, keep_dropout: bool = False) -> fx.GraphModule:
    """An ONNX ModelProto as an ``fx.GraphModule`` of real torch modules (see :data:`ONNX_OPS`).
    ``Dropout`` nodes vanish (inference), or with ``keep_dropout`` become ``nn.Dropout(ratio)``."""
    return _OnnxImporter(model, keep_dropout).run()


def onnx_example(model) -> tuple[torch.Tensor, ...]:
    """Zeros shaped like the ONNX model's inputs (dynamic dims -> 2)."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 2 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out.append(torch.from_numpy(np.zeros(dims, dtype=dt)))
    return tuple(out)


def to_modules(model: Any, keep_dropout: bool = False) -> fx.GraphModule:
    """A loaded model (torch or ONNX backend) as a GraphModule of real modules, in eval mode.
    ``keep_dropout``: ONNX Dropout nodes become ``nn.Dropout`` modules (``dropcli finetune``)."""
    if getattr(model, "backend", None) == "onnx":
        gm = from_onnx(model.model, keep_dropout)
    else:
        gm = modularize(_with_ranks(model.gm, getattr(model, "example_inputs", None)))
    return gm.eval()


def _with_ranks(gm: fx.GraphModule, example: tuple | None) -> fx.GraphModule:
    """A graph whose tensors' ranks are known: a TorchScript graph read directly records no
    ``meta['val']``, and a functional batch norm's module (1d, 2d or 3d) is chosen by its input's
    rank, so such a graph is run once on the example (``tensor_meta``, on a copy)."""
    import copy

    from torch.fx.passes.shape_prop import ShapeProp

    if not example or all("val" in n.meta or "tensor_meta" in n.meta for n in gm.graph.nodes
                          if n.op in ("placeholder", "call_function", "call_module", "call_method")):
        return gm
    gm = copy.deepcopy(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception:  # noqa: BLE001 - ranks stay unknown (the rewrite then assumes 2-d maps)
        pass
    return gm
