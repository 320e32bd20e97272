"""TorchScript read directly as a ``torch.fx.GraphModule`` of aten ops.

torch's own route from TorchScript to a graph (``torch._export.converter.TS2EPConverter``) imports
torch.export's tracer and dynamo: about 2.5 s before it converts anything, most of a short
``dropcli uncertainty`` run. A traced (or simply scripted) module's inlined graph is already a
list of aten calls, so this module translates it one node at a time:

* ``prim::GetAttr`` chains from ``self`` -> the module's parameters and buffers (``get_attr``
  nodes; parameters become buffers, as the converter makes them);
* ``prim::Constant`` -> Python values (a tensor constant becomes a buffer);
* ``prim::ListConstruct`` / ``TupleConstruct`` / ``DictConstruct`` and their ``Unpack`` ->
  Python containers of nodes, or ``getitem`` on a node that returns a list;
* ``aten::<name>`` -> ``torch.ops.aten.<name>.<overload>``, the overload read from the node's
  schema; ``aten::size`` -> ``aten.sym_size`` (a live size, which dropcli's TorchScript writer
  keeps live);
* a trace's size arithmetic (``prim::NumToTensor``, ``aten::mul`` on it, ``aten::Int``) ->
  Python integer arithmetic on the live sizes, so a head count times the batch follows the
  batch instead of passing through a data-dependent ``.item()``.

Anything else (control flow, other ``prim::`` ops, an in-place write into a weight) raises
:class:`Unsupported`; the caller then uses the converter, and says so under ``--debug``. The
graph's inputs are named after the forward's arguments, as the user wrote them (TorchScript's
``.1``-style suffixes dropped), so a data file's named arrays match them.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Sequence

import torch
from torch import fx, nn


class Unsupported(Exception):
    """The TorchScript graph holds something this translation does not cover."""


class _Num:
    """A trace's integer (or float) held as a 0-dim tensor (``prim::NumToTensor``): kept as the
    Python number it came from (a node of the graph or a constant)."""

    __slots__ = ("value", "kind", "dtype")

    def __init__(self, value: Any, kind: type, dtype: torch.dtype | None = None):
        self.value = value
        self.kind = kind
        # as a tensor: NumToTensor gives int64 / float64 / bool; a true division of integer
        # tensors gives the default float dtype
        self.dtype = dtype or {int: torch.int64, float: torch.float64}.get(kind, torch.bool)


# ScalarType / MemoryFormat / Layout are plain integers in a TorchScript graph
_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
           None, torch.complex64, torch.complex128, torch.bool, None, None, None, torch.bfloat16]
_FORMATS = [torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d]
_LAYOUTS = [torch.strided, torch.sparse_coo]


def _trunc_div(a: Any, b: Any) -> Any:
    """Integer division rounding toward zero (``aten::div(..., rounding_mode='trunc')`` on sizes)."""
    q = a // b
    return q + 1 if q < 0 and q * b != a else q


def _true_div(a: Any, b: Any) -> float:
    return a / b


_trunc_div.dropcli_size_arith = _true_div.dropcli_size_arith = True  # type: ignore[attr-defined]  # the MC engine recomputes sizes


def _nonneg(v: Any) -> bool:
    """Whether a size expression is known to be >= 0: sizes, and products, sums and floor
    quotients of them with non-negative constants."""
    if isinstance(v, fx.Node):
        if v.target is torch.ops.aten.sym_size.int:
            return True
        return v.target in (operator.mul, operator.add, operator.floordiv) and all(_nonneg(a) for a in v.args)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


_NUM_OPS = {"mul": operator.mul, "add": operator.add, "sub": operator.sub, "floor_divide": operator.floordiv,
            "remainder": operator.mod, "rsub": operator.sub}  # rsub: operands swapped
_ID_OPS = {"aten::Int", "aten::Float", "aten::ScalarImplicit", "aten::IntImplicit", "aten::FloatImplicit"}
_SCHEMA_RE = re.compile(r"^aten::(\w+)(?:\.(\w+))?\(")


def user_name(name: str) -> str:
    """A TorchScript value's name without its ``.1``-style suffix, as an fx-safe identifier."""
    base = re.sub(r"\.\d+$", "", name)
    return re.sub(r"[^0-9A-Za-z_]", "_", base) or "x"


def translate(ts: torch.jit.ScriptModule, names: Sequence[str] = ()) -> fx.GraphModule:
    """``ts`` (traced or scripted, without control flow) as an fx GraphModule of aten ops.

    ``names`` are the forward's argument names (the graph's inputs are named after them).
    Raises :class:`Unsupported` where the graph holds what this translation does not cover."""
    return _Translator(ts).run(names)


class _Translator:
    def __init__(self, ts: torch.jit.ScriptModule):
        self.ts = ts
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[int, Any] = {}  # TorchScript value (unique id) -> fx node / python value / _Num / module path
        self.attrs: dict[str, fx.Node] = {}
        self.n_const = 0
        # the module's parameters stay parameters (trainable as they were): a model written back
        # from this graph must train like the input did
        self.params = {k: p.requires_grad for k, p in ts.named_parameters()}

    # ------------------------------------------------------------------ values
    def get(self, v: torch._C.Value) -> Any:
        try:
            return self.env[v.unique()]
        except KeyError:
            raise Unsupported(f"value %{v.debugName()} is used before it is defined") from None

    def set(self, v: torch._C.Value, val: Any) -> None:
        self.env[v.unique()] = val

    def attr_node(self, path: str, value: torch.Tensor) -> fx.Node:
        if path not in self.attrs:
            mod = self.root
            *parents, leaf = path.split(".")
            for p in parents:
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
                if not isinstance(mod, nn.Module):
                    raise Unsupported(f"attribute path {path} crosses a non-module")
            if path in self.params:
                mod.register_parameter(leaf, nn.Parameter(value.detach(), requires_grad=self.params[path]))
            else:
                mod.register_buffer(leaf, value.detach())
            self.attrs[path] = self.graph.get_attr(path)
        return self.attrs[path]

    def tensor_constant(self, t: torch.Tensor) -> fx.Node:
        name = f"_tensor_constant{self.n_const}"
        self.n_const += 1
        return self.attr_node(name, t)

    def plain(self, val: Any) -> Any:
        """A value as an argument of a real op: a trace's number is a 0-dim tensor there."""
        if isinstance(val, _Num):
            return self.graph.call_function(torch.ops.aten.scalar_tensor.default, (val.value,), {"dtype": val.dtype})
        if isinstance(val, list):
            return [self.plain(v) for v in val]
        if isinstance(val, tuple):
            return tuple(self.plain(v) for v in val)
        if isinstance(val, _Module):
            raise Unsupported(f"module {val.path or 'self'} is passed as a value")
        return val

    # ------------------------------------------------------------------ the walk
    def run(self, names: Sequence[str]) -> fx.GraphModule:
        g = self.ts.inlined_graph
        inputs = list(g.inputs())
        self.set(inputs[0], _Module("", self.ts))
        used: set[str] = set()
        for i, v in enumerate(inputs[1:]):
            name = user_name(names[i] if i < len(names) else v.debugName())
            while name in used:
                name += "_"
            used.add(name)
            self.set(v, self.graph.placeholder(name))
        for node in g.nodes():
            self.node(node)
        outs = [self.plain(self.get(v)) for v in g.outputs()]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        self.graph.eliminate_dead_code()
        return fx.GraphModule(self.root, self.graph, "TorchScriptGraph")

    def node(self, n: torch._C.Node) -> None:
        kind = n.kind()
        if any(True for _ in n.blocks()):
            raise Unsupported(f"{kind} (control flow)")
        outs = list(n.outputs())
        if kind == "prim::Constant":
            self.constant(n, outs[0])
        elif kind == "prim::GetAttr":
            self.getattr(n, outs[0])
        elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            items = [self.get(v) for v in n.inputs()]
            self.set(outs[0], items if kind == "prim::ListConstruct" else tuple(items))
        elif kind == "prim::DictConstruct":
            items = [self.get(v) for v in n.inputs()]
            self.set(outs[0], {items[i]: items[i + 1] for i in range(0, len(items), 2)})
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            src = self.get(n.input())
            if isinstance(src, (list, tuple)):
                if len(src) != len(outs):
                    raise Unsupported(f"{kind} of {len(src)} values into {len(outs)}")
                for v, s in zip(outs, src):
                    self.set(v, s)
            elif isinstance(src, fx.Node):
                for i, v in enumerate(outs):
                    self.set(v, self.graph.call_function(operator.getitem, (src, i)))
            else:
                raise Unsupported(f"{kind} of a {type(src).__name__}")
        elif kind == "prim::TupleIndex":
            src, i = self.get(n.inputsAt(0)), self.get(n.inputsAt(1))
            if not isinstance(i, int):
                raise Unsupported("prim::TupleIndex with a computed index")
            self.set(outs[0], src[i] if isinstance(src, (list, tuple)) else self.graph.call_function(operator.getitem, (src, i)))
        elif kind == "prim::NumToTensor":
            val = self.get(n.input())
            kind_of = {"int": int, "float": float, "bool": bool}.get(str(n.input().type()))
            if kind_of is None:
                raise Unsupported(f"prim::NumToTensor of {n.input().type()}")
            self.set(outs[0], val if isinstance(val, _Num) else _Num(val, kind_of))
        elif kind in _ID_OPS:
            val = self.get(n.input())
            if not isinstance(val, _Num):
                raise Unsupported(f"{kind} of a computed tensor (a data-dependent value)")
            self.set(outs[0], val.value)
        elif kind.startswith("aten::"):
            self.aten(n, outs)
        else:
            raise Unsupported(kind)

    def constant(self, n: torch._C.Node, out: torch._C.Value) -> None:
        typ = str(out.type())
        if typ == "NoneType":
            self.set(out, None)
            return
        try:
            val = out.toIValue()
        except Exception as e:  # noqa: BLE001
            raise Unsupported(f"constant of type {typ} ({e})") from None
        if isinstance(val, torch.Tensor):
            val = self.tensor_constant(val)
        elif not isinstance(val, (int, float, bool, str, torch.device, list, tuple)):
            raise Unsupported(f"constant of type {typ}")
        self.set(out, val)

    def getattr(self, n: torch._C.Node, out: torch._C.Value) -> None:
        owner = self.get(n.input())
        if not isinstance(owner, _Module):
            raise Unsupported("prim::GetAttr on something other than a module")
        name = n.s("name")
        path = f"{owner.path}.{name}" if owner.path else name
        val = getattr(owner.obj, name)
        if isinstance(val, (torch.jit.ScriptModule, torch._C.ScriptModule)):
            self.set(out, _Module(path, val))
        elif isinstance(val, torch.Tensor):
            self.set(out, self.attr_node(path, val))
        elif val is None or isinstance(val, (int, float, bool, str)):
            self.set(out, val)
        else:
            raise Unsupported(f"attribute {path} of type {type(val).__name__}")

    def aten(self, n: torch._C.Node, outs: list) -> None:
        m = _SCHEMA_RE.match(n.schema())
        if not m:
            raise Unsupported(f"{n.kind()} without a schema")
        name, overload = m.group(1), m.group(2) or "default"
        args = [self.get(v) for v in n.inputs()]
        if name == "size" and not any(isinstance(a, _Num) for a in args):
            target = torch.ops.aten.sym_size.int if overload == "int" else torch.ops.aten.sym_size.default
            self.set(outs[0], self.graph.call_function(target, tuple(args)))
            return
        if self.num_op(name, overload, args, outs):
            return
        if name == "_convolution":
            # a trace's convolution: the public op (what dropcli and the exporters read) takes its
            # first 9 arguments; the rest are cuDNN/benchmark switches
            name, overload, args = "convolution", "default", args[:9]
        try:
            op = getattr(getattr(torch.ops.aten, name), overload)
        except AttributeError:
            raise Unsupported(f"aten::{name}.{overload} has no torch.ops overload") from None
        schema = op._schema
        if len(args) > len(schema.arguments):
            raise Unsupported(f"aten::{name}.{overload} given {len(args)} arguments")
        pos, kw = [], {}
        for a, arg in zip(args, schema.arguments):
            a = self.plain(self.typed(a, str(getattr(arg, "real_type", arg.type))))
            if arg.kwarg_only:
                kw[arg.name] = a
            else:
                pos.append(a)
        if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
            first = pos[0] if pos else None
            if isinstance(first, fx.Node) and first.op == "get_attr":
                raise Unsupported(f"aten::{name}_ writes into the weight {first.target}")
        node = self.graph.create_node("call_function", op, tuple(pos), kw, name=name.strip("_") or None)  # named as export names them
        if len(outs) == 1:
            self.set(outs[0], node)
        else:
            for i, v in enumerate(outs):
                self.set(v, self.graph.call_function(operator.getitem, (node, i)))

    def num_op(self, name: str, overload: str, args: list, outs: list) -> bool:
        """Arithmetic on a trace's numbers (sizes) stays Python arithmetic; True when done."""
        if len(outs) != 1 or not any(isinstance(a, _Num) for a in args):
            return False
        vals = []
        for a in args[:2]:
            if isinstance(a, _Num):
                vals.append(a.value)
            elif isinstance(a, fx.Node) and a.op == "get_attr" and a.target.startswith("_tensor_constant"):
                t = getattr(self.root, a.target)
                if t.dim() != 0:
                    return False
                vals.append(t.item())
            elif isinstance(a, (int, float)) and not isinstance(a, bool):
                vals.append(a)
            else:
                return False
        if len(vals) != 2:
            return False
        if name in _NUM_OPS and (len(args) == 2 or name in ("add", "sub", "rsub") and args[2] == 1):
            fn = _NUM_OPS[name]
        elif name == "div":
            mode = args[2] if len(args) > 2 else None
            fn = {None: _true_div, "trunc": _trunc_div, "floor": operator.floordiv}.get(mode)
            if fn is None:
                return False
            if fn is _trunc_div and all(_nonneg(v) for v in vals):
                fn = operator.floordiv  # sizes: rounding toward zero is floor division (and has no branch to trace)
        else:
            return False
        nums = [a for a in args[:2] if isinstance(a, _Num)]
        kinds = [a.kind if isinstance(a, _Num) else type(v) for a, v in zip(args[:2], vals)]
        kind = float if float in kinds or fn is _true_div else int
        if fn is _true_div and int in kinds and float not in kinds:
            dtype = torch.get_default_dtype()  # int / int as tensors: the default float dtype
        else:  # the wider of the operands' tensor types (int64 < float64)
            dtype = max((a.dtype for a in nums), key=lambda d: d.is_floating_point) if kind is float else torch.int64
            if kind is float and not dtype.is_floating_point:
                dtype = torch.get_default_dtype()
        if name == "rsub":
            vals = vals[::-1]
        if all(not isinstance(v, fx.Node) for v in vals):
            self.set(outs[0], _Num(fn(*vals), kind, dtype))
        else:
            self.set(outs[0], _Num(self.graph.call_function(fn, tuple(vals)), kind, dtype))
        return True

    @staticmethod
    def typed(a: Any, typ: str) -> Any:
        """Integers that stand for a dtype, memory format or layout, as torch's objects."""
        if not isinstance(a, int) or isinstance(a, bool):
            return a
        table = _DTYPES if "ScalarType" in typ else _FORMATS if "MemoryFormat" in typ else _LAYOUTS if "Layout" in typ else None
        if table is None:
            return a
        if not 0 <= a < len(table) or table[a] is None:
            raise Unsupported(f"{typ} code {a}")
        return table[a]


class _Module:
    """A submodule reached through ``prim::GetAttr`` (its dotted path and the script object)."""

    __slots__ = ("path", "obj")

    def __init__(self, path: str, obj: Any):
        self.path = path
        self.obj = obj
