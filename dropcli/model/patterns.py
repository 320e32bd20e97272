"""Activations that exporters spell as several elementwise ops, recognised as ONE layer.

ONNX below opset 20 has no ``Gelu`` op, so exporters write GELU as ``Div/Erf/Add/Mul``, GPT-2's
tanh-GELU (``gelu_new``) as a ``Pow/Mul/Add/Tanh`` chain, ReLU6 as ``Clip(0, 6)``, HardSwish as
``x * HardSigmoid(x)`` and SiLU as ``x * Sigmoid(x)``; torch.export and TorchScript graphs of
hand-written activations arrive the same way as aten ops. A dropout site must go after the whole
activation: put inside it (after GPT-2's inner ``tanh``), a dropped unit gives ``0.5 x`` instead
of 0.

This module is backend-neutral: :data:`PATTERNS` describes each activation as an expression of
one input ``X``, and :func:`find_patterns` matches it on any graph seen through a
:class:`GraphView` (each backend supplies one: ONNX tensors, torch.fx nodes). Products and sums
are matched as flattened, unordered factor / term lists, so ``0.5*x*(1+erf(x/sqrt2))``,
``x*(1+erf(x*0.7071))*0.5`` and every other association and order match the same entry;
division by a constant is a factor of its reciprocal. Adding a pattern is one entry in
:data:`PATTERNS`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Protocol, Sequence

import numpy as np


class GraphView(Protocol):
    """What the matcher needs of a graph. A *value* is any hashable handle (a tensor name, a
    node) or a Python number (a literal argument)."""

    def producer(self, v: Any) -> tuple[str, Sequence[Any]] | None:
        """The op making ``v`` as (lower-case name, input values), or None (input, constant)."""

    def const(self, v: Any) -> float | None:
        """``v``'s value when it is a constant scalar (or a tensor of one repeated value)."""

    def consumers(self, v: Any) -> Sequence[Any]:
        """The values made by the ops that read ``v`` (empty for a graph output that nothing reads)."""

    def is_graph_output(self, v: Any) -> bool:
        """Whether ``v`` leaves the graph."""


# ---------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class X:
    """The activation's input (every occurrence must be the same value)."""


@dataclass(frozen=True)
class C:
    value: float


@dataclass(frozen=True)
class Op:
    """An op with these positional inputs (``pow``: base, exponent)."""

    name: str
    args: tuple = ()


@dataclass(frozen=True)
class Prod:
    """A product of these factors in any order and association (constants multiply together)."""

    factors: tuple


@dataclass(frozen=True)
class Sum:
    """A sum of these terms in any order and association (constants add together)."""

    terms: tuple


@dataclass(frozen=True)
class Clip:
    """``min(max(arg, lo), hi)`` (ONNX ``Clip``, aten ``clamp``/``hardtanh``)."""

    arg: Any
    lo: float
    hi: float


@dataclass(frozen=True)
class Pattern:
    kind: str  # the layer kind it shows as (gelu, relu6 ...)
    name: str  # a short label for `inspect` (gelu-erf, gelu-tanh ...)
    expr: Any


_S2 = 1.0 / math.sqrt(2.0)
_S2PI = math.sqrt(2.0 / math.pi)
_K = 0.044715

PATTERNS: tuple[Pattern, ...] = (
    # GELU, erf form: 0.5 x (1 + erf(x / sqrt 2))
    Pattern("gelu", "gelu-erf", Prod((X(), C(0.5), Sum((C(1.0), Op("erf", (Prod((X(), C(_S2))),))))))),
    # GELU, tanh form (GPT-2 gelu_new): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    Pattern("gelu", "gelu-tanh", Prod((X(), C(0.5), Sum((C(1.0), Op("tanh", (
        Prod((C(_S2PI), Sum((X(), Prod((C(_K), Op("pow", (X(), C(3.0))))))))),))))))),
    Pattern("gelu", "gelu-tanh", Prod((X(), C(0.5), Sum((C(1.0), Op("tanh", (
        Prod((C(_S2PI), Sum((X(), Prod((C(_K), X(), X(), X())))))),))))))),
    Pattern("gelu", "gelu-tanh", Prod((X(), C(0.5), Sum((C(1.0), Op("tanh", (
        Prod((C(_S2PI), X(), Sum((C(1.0), Prod((C(_K), X(), X())))))),))))))),
    # HardSwish: x * relu6(x + 3) / 6, or x * HardSigmoid(x) (ONNX's alpha 1/6, beta 0.5)
    Pattern("hardswish", "hardswish", Prod((X(), C(1.0 / 6.0), Clip(Sum((X(), C(3.0))), 0.0, 6.0)))),
    Pattern("hardswish", "hardswish", Prod((X(), Op("hardsigmoid", (X(),))))),
    # HardSigmoid: relu6(x + 3) / 6
    Pattern("hardsigmoid", "hardsigmoid", Prod((C(1.0 / 6.0), Clip(Sum((X(), C(3.0))), 0.0, 6.0)))),
    # SiLU / swish: x * sigmoid(x)
    Pattern("silu", "silu", Prod((X(), Op("sigmoid", (X(),))))),
    # ReLU6: clip(x, 0, 6)
    Pattern("relu6", "relu6", Clip(X(), 0.0, 6.0)),
)

_ROOT_OPS = {Prod: {"mul", "div"}, Sum: {"add", "sub"}, Clip: {"clip"}}


@dataclass
class Match:
    kind: str
    name: str
    root: Hashable  # the value the pattern makes: the site goes after it
    x: Any  # the activation's input
    interior: frozenset  # values made inside the pattern (root included)


def _close(a: float | None, b: float, rtol: float = 1e-3) -> bool:
    return a is not None and abs(a - b) <= rtol * max(1.0, abs(b))


class _Matcher:
    def __init__(self, view: GraphView):
        self.v = view

    def _const(self, v: Any) -> float | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, float)):
            return float(v)
        return self.v.const(v)

    def _prod(self, v: Any) -> tuple[str, Sequence[Any]] | None:
        if isinstance(v, (int, float)) or v is None:
            return None
        return self.v.producer(v)

    def _inner(self, v: Any) -> bool:
        """``v`` may be expanded as part of a flattened product/sum: read by one op only."""
        if isinstance(v, (int, float)) or self.v.is_graph_output(v):
            return False
        return len(self.v.consumers(v)) == 1

    def _flatten(self, v: Any, ops: tuple[str, str], root: bool) -> tuple[list[Any], float, list[Any]] | None:
        """(non-constant operands, combined constant, interior values) of a product (ops = mul, div)
        or a sum (ops = add, sub) rooted at ``v``."""
        join, inverse = ops
        unit = 1.0 if join == "mul" else 0.0
        p = self._prod(v)
        if p is None or p[0] not in ops or len(p[1]) != 2 or not (root or self._inner(v)):
            c = self._const(v)
            return ([], c, []) if c is not None else ([v], unit, [])
        a, b = p[1]
        left = self._flatten(a, ops, False)
        if p[0] == join:
            right = self._flatten(b, ops, False)
        else:
            cb = self._const(b)
            if cb is None or (join == "mul" and cb == 0.0):
                return ([v], unit, []) if not root else None
            right = ([], (1.0 / cb) if join == "mul" else -cb, [])
        if left is None or right is None:
            return None
        const = left[1] * right[1] if join == "mul" else left[1] + right[1]
        return left[0] + right[0], const, left[2] + right[2] + [v]

    def match(self, pat: Any, v: Any, env: dict) -> list[Any] | None:
        """The interior values when ``v`` is ``pat`` (binding X in ``env``), else None."""
        if isinstance(pat, X):
            if "x" not in env:
                if isinstance(v, (int, float)):
                    return None
                env["x"] = v
                return []
            return [] if env["x"] is v or (not isinstance(v, (int, float)) and env["x"] == v) else None
        if isinstance(pat, C):
            return [] if _close(self._const(v), pat.value) else None
        if isinstance(pat, Op):
            p = self._prod(v)
            if p is None or p[0] != pat.name or len(p[1]) < len(pat.args):
                return None
            out = [v]
            for sub, arg in zip(pat.args, p[1]):
                r = self.match(sub, arg, env)
                if r is None:
                    return None
                out += r
            return out
        if isinstance(pat, Clip):
            p = self._prod(v)
            if p is None or p[0] != "clip" or len(p[1]) < 3:
                return None
            if not (_close(self._const(p[1][1]), pat.lo) and _close(self._const(p[1][2]), pat.hi)):
                return None
            r = self.match(pat.arg, p[1][0], env)
            return None if r is None else [v] + r
        if isinstance(pat, (Prod, Sum)):
            ops = ("mul", "div") if isinstance(pat, Prod) else ("add", "sub")
            flat = self._flatten(v, ops, True)
            if flat is None:
                return None
            operands, const, interior = flat
            items = pat.factors if isinstance(pat, Prod) else pat.terms
            want = [f for f in items if not isinstance(f, C)]
            cs = [f.value for f in items if isinstance(f, C)]
            want_c = math.prod(cs) if isinstance(pat, Prod) else sum(cs)
            if len(operands) != len(want) or not _close(const, want_c if cs else (1.0 if isinstance(pat, Prod) else 0.0)):
                return None
            # X first so that it binds to a plain operand, then the structured ones
            for perm in itertools.permutations(range(len(operands))):
                trial = dict(env)
                got: list[Any] = []
                ok = True
                for f, k in sorted(zip(want, perm), key=lambda fk: not isinstance(fk[0], X)):
                    r = self.match(f, operands[k], trial)
                    if r is None:
                        ok = False
                        break
                    got += r
                if ok:
                    env.update(trial)
                    return interior + got
            return None
        raise TypeError(pat)  # pragma: no cover


def find_patterns(view: GraphView, values: Iterable[Any], patterns: Sequence[Pattern] = PATTERNS) -> list[Match]:
    """Every activation pattern in the graph. ``values`` are the candidate roots (each op's
    output) in topological order. Matches are taken downstream first, so a pattern that
    contains another (HardSwish contains ReLU6) wins; a match whose inner values are read from
    outside it is not one layer and is skipped."""
    m = _Matcher(view)
    claimed: set[Any] = set()
    found: list[Match] = []
    for v in reversed(list(values)):
        if v in claimed:
            continue
        p = view.producer(v)
        if p is None:
            continue
        for pat in patterns:
            if p[0] not in _ROOT_OPS.get(type(pat.expr), ()):
                continue
            env: dict = {}
            got = m.match(pat.expr, v, env)
            if got is None or "x" not in env:
                continue
            interior = frozenset(got) | {v}
            if env["x"] in interior or interior & claimed:
                continue
            if any(view.is_graph_output(w) or any(u not in interior for u in view.consumers(w))
                   for w in interior if w != v):
                continue
            found.append(Match(pat.kind, pat.name, v, env["x"], interior))
            claimed |= interior
            break
    found.reverse()
    return found


_PATTERN_OPS = {"Mul": "mul", "Div": "div", "Add": "add", "Sub": "sub", "Erf": "erf", "Tanh": "tanh", "Pow": "pow",
                "Sigmoid": "sigmoid", "Clip": "clip", "HardSigmoid": "hardsigmoid"}


class OnnxPatternView:
    """An ONNX graph (its ``NodeProto`` list; ``const`` gives a constant tensor as a numpy array) seen by :func:`dropcli.model.patterns.find_patterns`: values are tensor names."""

    def __init__(self, nodes: Sequence[Any], const: Callable[[str], Any], graph_outputs: set[str]):
        self.nodes = nodes
        self._const = const
        self.outputs = graph_outputs
        self.made = {o: n for n in nodes for o in n.output[:1] if o}
        self.users: dict[str, list[str]] = {}
        for n in nodes:
            for x in n.input:
                if x and n.output:
                    self.users.setdefault(x, []).append(n.output[0])

    def producer(self, v: Any) -> tuple[str, list[Any]] | None:
        n = self.made.get(v)
        if n is None or n.domain not in ("", "ai.onnx"):
            return None
        if n.op_type == "Constant":
            return None
        op = _PATTERN_OPS.get(n.op_type)
        if op is None or len(n.output) != 1:
            return None
        ins: list[Any] = list(n.input)
        if op == "clip":
            a = _onnx_attrs(n)
            if "min" in a or "max" in a:  # opset < 11
                ins = [n.input[0], float(a.get("min", -np.inf)), float(a.get("max", np.inf))]
            else:
                ins = ins + [""] * (3 - len(ins))
                ins = [ins[0], ins[1] if ins[1] else -np.inf, ins[2] if ins[2] else np.inf]
        elif op == "hardsigmoid":
            a = _onnx_attrs(n)
            if abs(float(a.get("alpha", 0.2)) - 1 / 6) > 1e-4 or abs(float(a.get("beta", 0.5)) - 0.5) > 1e-4:
                return None
        return op, ins

    def const(self, v: Any) -> float | None:
        if not isinstance(v, str) or not v:
            return None
        c = self._const(v)
        if c is None or c.size == 0 or c.dtype.kind not in "fiu":
            return None
        flat = c.reshape(-1)
        return float(flat[0]) if np.all(flat == flat[0]) else None

    def consumers(self, v: Any) -> list[str]:
        return self.users.get(v, [])

    def is_graph_output(self, v: Any) -> bool:
        return v in self.outputs


def _onnx_attrs(node: Any) -> dict[str, Any]:
    from onnx import helper  # not at module level: dropcli.model imports no onnx

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
