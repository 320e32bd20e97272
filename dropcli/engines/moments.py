"""`dropcli uncertainty --method moments`: analytic predictive mean and variance, no sampling.

Fast dropout (Wang & Manning 2013) makes a Linear layer's pre-activation Gaussian, so the
mean and variance of what the model's MC mode outputs can be propagated through the graph
instead of sampled. Every value of the torch fx graph is either deterministic (a tensor) or
a :class:`Gauss`: per-unit ``mean`` and ``var`` plus two facts that decide whether the next
rule is exact: ``indep`` (the units are independent) and ``gaussian`` (each unit is
Gaussian). The rules (Gauss in; the MC mode's true per-unit moments out when "exact"):

* fastdropout site, deterministic input ``x``: ``mu = W x + b``, ``s2 = (p/q)(W∘W)(x∘x)`` -- its
  MC mode draws exactly ``N(mu, s2)`` per unit, independently. Activation: identity, relu and
  leaky relu in closed form, sigmoid and tanh by Gauss-Legendre integration on their finite
  range plus closed-form tails (float64 precision): exact; gelu, silu, elu by 64-node
  Gauss-Hermite quadrature (approximate: its error grows with the width of S). Output:
  independent units.
* fastdropout site, random input: ``E[S] = W m + b``, ``Var[S] = (W∘W)(v/q + (p/q) m∘m)``
  (masks independent of the input; exact when the input units are independent), then the
  activation as if ``S`` were Gaussian (approximate: ``S`` is a Gaussian mixture).
* Linear / Conv / matmul with constant weights: ``mean = layer(m)`` (exact),
  ``var = layer_without_bias(v; W∘W)`` (exact only for independent input units; otherwise
  the covariances are ignored: approximate). The output units are correlated.
* elementwise relu / leaky relu / sigmoid / tanh (exact rules above), gelu / silu / elu
  (quadrature): exact only on Gaussian input; otherwise the input is taken as Gaussian.
* stock inverted dropout (``nn.Dropout``, ``F.dropout``): ``mean = m``,
  ``var = v/q + (p/q) m∘m`` (exact per unit).
* BatchNorm (inference), adding or multiplying by constants, reshapes, flatten, permutes,
  slicing: exact. The sum of two random values assumes them independent (approximate).
* softmax of random logits: the predictive probabilities by the mean-field (probit)
  approximation ``softmax(m / sqrt(1 + pi v / 8))`` and their variance by the delta method
  at ``softmax(m)``: ``Var p_k = p_k^2 (v_k (1 - 2 p_k) + sum_j p_j^2 v_j)`` (approximate).
  :func:`probs_from_logits` does the same for a model that outputs logits.

The rules are tables keyed by what a node calls (:data:`MODULE_RULES` by module class,
:data:`ATEN_RULES` / :data:`FUNCTION_RULES` by aten op name or Python function,
:data:`METHOD_RULES` by Tensor method), filled by :func:`moment_rule`. Any other op on a random
value stops the run with a one-line error naming it (use ``--method mc``). :meth:`MomentPropagator.steps` lists every rule used, per node, with
whether it was exact -- the report's "which layers it approximates".
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dropcli.backends.torch.fx import aten_name, fetch_attr
from dropcli.errors import UsageError
from dropcli.backends.torch.layers import TorchLayer, activation_of_call, activation_of_module
from dropcli.model.kinds import Activation
from dropcli.variants.base import SiteModule, set_mc

METHOD_NOTE = ("analytic moments (--method moments): no sampling; the MC mode's per-unit mean and variance "
               "propagated through the graph")
NOT_AVAILABLE = ("expected_entropy", "mutual_info", "variation_ratio")


@dataclass
class Gauss:
    """A random value: per-unit mean and variance; ``indep``: units independent; ``gaussian``:
    each unit Gaussian."""

    mean: torch.Tensor
    var: torch.Tensor
    indep: bool
    gaussian: bool
    probs: bool = False  # the result of a softmax (probabilities, not logits)

    def map(self, fn) -> "Gauss":
        return Gauss(fn(self.mean), fn(self.var), self.indep, self.gaussian, self.probs)


@dataclass
class Step:
    node: str
    op: str
    rule: str
    exact: bool
    note: str = ""

    def record(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "rule": self.rule, "exact": self.exact, "note": self.note}


def probs_from_logits(mean: torch.Tensor, var: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictive class probabilities from Gaussian logits (independent per class): the
    mean-field/probit approximation for the mean, the delta method for the variance."""
    p = torch.softmax(mean / torch.sqrt(1.0 + (math.pi / 8.0) * var), dim=dim)
    p0 = torch.softmax(mean, dim=dim)
    v = p0 * p0 * (var * (1.0 - 2.0 * p0) + (p0 * p0 * var).sum(dim, keepdim=True))
    return p, torch.clamp(v, min=0.0)


_SHAPE_ATEN = {"view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
               "clone", "contiguous", "alias", "detach", "expand", "select", "slice", "_to_copy", "to", "lift_fresh_copy",
               "dropout_eval"}
_SHAPE_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
                torch.t, torch.clone, operator.getitem}
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t", "contiguous",
                  "clone", "detach", "expand", "__getitem__", "to", "float", "double", "half"}
_SIZE_ATEN = {"sym_size", "size", "sym_numel", "sym_stride", "dim", "numel"}
_SIZE_METHODS = {"size", "dim", "numel", "shape"}
_LIN_ATEN = {"linear", "conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_LIN_FUNCS = {F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_MM_ATEN = {"mm", "matmul", "bmm"}
_ADD = {operator.add, torch.add, operator.iadd}
_SUB = {operator.sub, torch.sub, operator.isub}
_MUL = {operator.mul, torch.mul, operator.imul}
_DIV = {operator.truediv, torch.div}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax}
_DROPOUT_FUNCS = {F.dropout, torch.dropout}


# ------------------------------------------------------------------------------ rule tables
# What a random value (a Gauss) may pass through, keyed by what the fx node calls. Filled by
# @moment_rule on MomentPropagator's rule methods: adding an op is one key. A rule returns the
# node's value, or NotImplemented when its conditions don't hold (a one-line "no moment rule"
# error). Elementwise activations are found by the layer primitives' classifiers
# (activation_of_module / activation_of_call) when no table has the op.
Rule = Callable[..., Any]
MODULE_RULES: dict[type, Rule] = {}       # exact module class: rule(prop, node, module, x, label)
MODULE_BASE_RULES: dict[type, Rule] = {}  # module base class (subclasses too): the same signature
ATEN_RULES: dict[str, Rule] = {}          # aten op name: rule(prop, node, args, kwargs, label)
FUNCTION_RULES: dict[Any, Rule] = {}      # Python callable (torch.*, F.*, operator.*): the same
METHOD_RULES: dict[str, Rule] = {}        # Tensor method name: rule(prop, node, x, args, kwargs, label)


def moment_rule(*, modules: Iterable[type] = (), module_bases: Iterable[type] = (), aten: Iterable[str] = (),
                functions: Iterable[Any] = (), methods: Iterable[str] = ()) -> Callable[[Rule], Rule]:
    """Register a :class:`MomentPropagator` method as the moment rule for these keys."""
    def deco(fn: Rule) -> Rule:
        for table, keys in ((MODULE_RULES, modules), (MODULE_BASE_RULES, module_bases), (ATEN_RULES, aten),
                            (FUNCTION_RULES, functions), (METHOD_RULES, methods)):
            for k in keys:
                if k in table:
                    raise RuntimeError(f"moment rule for {k!r} registered twice")
                table[k] = fn
        return fn
    return deco


def _is_g(v: Any) -> bool:
    return isinstance(v, Gauss)


def _has_g(v: Any) -> bool:
    if isinstance(v, Gauss):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_g(a) for a in v)
    if isinstance(v, dict):
        return any(_has_g(a) for a in v.values())
    return False


class MomentPropagator:
    """Propagates (mean, variance) through a loaded torch model (``dropcli.backends``)."""

    def __init__(self, model: Any):
        from dropcli.variants.fast import FastDropout

        self.model = model
        self.gm: fx.GraphModule = model.gm
        set_mc(self.gm, False)
        self.modules = dict(self.gm.named_modules())
        self.nodes = list(self.gm.graph.nodes)
        self._fast_cls = FastDropout
        # sites saved into TorchScript/.pt2 come back inlined: where(<site>.dropcli_mc, ...)
        self.inlined: dict[fx.Node, tuple[str, fx.Node, Any]] = {}
        self.skip: set[fx.Node] = set()
        meta = getattr(model, "site_meta", {}) or {}
        for where, (site, x, internal) in (model.inlined_sites().items() if hasattr(model, "inlined_sites") else ()):
            rec = meta.get(site, {})
            if rec.get("variant") == "fastdropout" and isinstance(rec.get("layer"), dict):
                lay = rec["layer"]
                tensors = {t: fetch_attr(self.gm, f"{site}.{t}") for t in lay.get("tensors", [])}
                mod = FastDropout(TorchLayer.from_record(lay, tensors), p=float(rec["p"]))
                self.inlined[where] = (site, x, mod)
            else:
                self.inlined[where] = (site, x, rec.get("variant") or "a dropout site")
            self.skip |= set(internal)
        self.steps: list[Step] = []

    # ------------------------------------------------------------------ public
    def run(self, inputs: Sequence[torch.Tensor]) -> Any:
        """The first output: a :class:`Gauss` (or a tensor if no site was reached)."""
        self.steps = []
        env: dict[fx.Node, Any] = {}
        phs = [n for n in self.nodes if n.op == "placeholder"]
        if len(phs) != len(inputs):
            raise UsageError(f"the model takes {len(phs)} inputs, got {len(inputs)}")
        with torch.no_grad():
            for n, x in zip(phs, inputs):
                env[n] = x
            for n in self.nodes:
                if n.op == "placeholder" or n in self.skip:
                    continue
                if n.op == "get_attr":
                    env[n] = fetch_attr(self.gm, n.target)
                    continue
                if n.op == "output":
                    out = n.args[0]
                    while isinstance(out, (tuple, list)):
                        out = out[0]
                    return env[out] if isinstance(out, fx.Node) else out
                if n in self.inlined:
                    site, x, mod = self.inlined[n]
                    if isinstance(mod, str):
                        raise self._unsupported(n, f"dropcli site {site} ({mod})")
                    env[n] = self._fast(n, mod, env[x], site)
                    continue
                env[n] = self._node(n, env)
        raise UsageError("the model has no output")  # pragma: no cover

    def step_records(self) -> list[dict[str, Any]]:
        """One record per node with a rule, in graph order (the same for every batch)."""
        return [s.record() for s in self.steps]

    # ------------------------------------------------------------------ rules
    def _log(self, n: fx.Node, op: str, rule: str, exact: bool, note: str = "") -> None:
        self.steps.append(Step(n.name, op, rule, exact, note))

    def _unsupported(self, n: fx.Node, what: str) -> UsageError:
        return UsageError(f"--method moments has no moment rule for {what} (node {n.name})",
                          "use --method mc (sampling), or inject fastdropout only where the rest of the model allows it")

    def _node(self, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, self._fast_cls):
                return self._fast(n, m, args[0], str(n.target))
            if isinstance(m, SiteModule):
                raise self._unsupported(n, f"dropcli site {n.target} ({m.spec.name})")
            if type(m) is nn.Dropout:
                return self._dropout(n, args[0], float(m.p), f"nn.Dropout {n.target}")
            if isinstance(m, nn.modules.dropout._DropoutNd):
                raise self._unsupported(n, f"{type(m).__name__} {n.target}")
            if not _has_g(args) and not _has_g(kwargs):
                return m(*args, **kwargs)
            return self._module(n, m, args, kwargs)
        if not _has_g(args) and not _has_g(kwargs):
            if n.op == "call_function":
                name = aten_name(n.target)
                if n.target in _DROPOUT_FUNCS or name in ("dropout", "native_dropout", "feature_dropout", "alpha_dropout",
                                                          "rand_like", "randn_like", "rand", "randn", "bernoulli"):
                    if n.target in _DROPOUT_FUNCS or name == "dropout":
                        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
                        return self._dropout(n, args[0], float(p), str(name or n.target.__name__))
                    raise self._unsupported(n, f"the random op {name or n.target}")
                return n.target(*args, **kwargs)
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        if n.op == "call_method":
            return self._method(n, args, kwargs)
        return self._function(n, args, kwargs)

    def _fast(self, n: fx.Node, mod: Any, x: Any, site: str) -> Gauss:
        act = mod.act
        what = f"fastdropout {site} ({mod.layer.describe()})"
        if _is_g(x):
            mu, s2 = mod.gauss_in(x.mean, x.var)
            m, v, closed = self._act_moments(act, mu, s2)
            exact = x.indep and act is None
            note = ("random input: E[S], Var[S] from the input's moments" + ("" if x.indep else " taken as independent")
                    + ("; S is not Gaussian, the activation's moments treat it as one" if act is not None else ""))
            self._log(n, what, "moments of a random input", exact, note)
            return Gauss(m, v, False, False)
        mu, s2 = mod.gauss(x)
        m, v, closed = self._act_moments(act, mu, s2)
        rule = "N(mu, s2)" + (f", E/Var[{act.kind}(S)] {_act_how(act)}" if act is not None else "")
        self._log(n, what, rule, closed, "" if closed else "Gauss-Hermite error grows with the width of S")
        return Gauss(m, v, True, act is None)

    @staticmethod
    def _act_moments(act: Activation | None, mu: torch.Tensor, s2: torch.Tensor):
        from dropcli.variants.fast import gauss_moments

        return gauss_moments(act, mu, s2)

    def _elementwise(self, n: fx.Node, act: Activation, x: Gauss, op: str) -> Gauss:
        m, v, closed = self._act_moments(act, x.mean, x.var)
        exact = closed and x.gaussian
        note = []
        if not x.gaussian:
            note.append("input is not Gaussian; its moments are matched to a Gaussian")
        if not closed:
            note.append("Gauss-Hermite error grows with the width of X")
        self._log(n, op, f"E/Var[{act}(X)] {_act_how(act)}, X ~ N(m, v)", exact, "; ".join(note))
        return Gauss(m, v, x.indep, False)

    def _dropout(self, n: fx.Node, x: Any, p: float, op: str) -> Any:
        if p <= 0:
            return x
        q = 1.0 - p
        if _is_g(x):
            self._log(n, op, "inverted dropout: m, v/q + (p/q) m^2", True)
            return Gauss(x.mean, x.var / q + (p / q) * x.mean * x.mean, x.indep, False)
        self._log(n, op, "inverted dropout: x, (p/q) x^2", True)
        return Gauss(x, (p / q) * x * x, True, False)

    def _linear_like(self, n: fx.Node, op: str, x: Gauss, fn_mean, fn_var) -> Gauss:
        m = fn_mean(x.mean)
        v = torch.clamp(fn_var(x.var), min=0.0)
        self._log(n, op, "mean: the layer; var: (W∘W) v", x.indep,
                  "" if x.indep else "covariances between input units ignored")
        return Gauss(m, v, False, x.gaussian and x.indep)

    def _softmax(self, n: fx.Node, x: Gauss, dim: int, op: str) -> Gauss:
        if x.probs:
            raise self._unsupported(n, f"{op} of probabilities")
        p, v = probs_from_logits(x.mean, x.var, dim)
        self._log(n, op, "mean-field softmax(m / sqrt(1 + pi v/8)); var by the delta method", False,
                  "approximation of E and Var of softmax of Gaussian logits")
        return Gauss(p, v, False, False, probs=True)

    # ------------------------------------------------------------------ dispatch (tables above)
    def _module(self, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        name = f"{type(m).__name__} {n.target}"
        if not _is_g(x) or len(args) != 1 or kwargs:
            raise self._unsupported(n, name)
        rule = MODULE_RULES.get(type(m))
        if rule is None:
            rule = next((r for base, r in MODULE_BASE_RULES.items() if isinstance(m, base)), None)
        if rule is not None:
            out = rule(self, n, m, x, name)
        else:
            act = activation_of_module(m)
            out = NotImplemented if act is None else self._elementwise(n, act, x, name)
        if out is NotImplemented:
            raise self._unsupported(n, name)
        return out

    def _method(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        x = args[0]
        name = str(n.target)
        rule = METHOD_RULES.get(name)
        out = NotImplemented
        if rule is not None and _is_g(x) and not _has_g(args[1:]) and not _has_g(kwargs):
            out = rule(self, n, x, args, kwargs, name)
        if out is NotImplemented:
            raise self._unsupported(n, f"Tensor.{name}")
        return out

    def _function(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        tgt = n.target
        name = aten_name(tgt)
        label = f"aten.{name}" if name else getattr(tgt, "__name__", str(tgt))
        rule = ATEN_RULES.get(name) if name is not None else FUNCTION_RULES.get(tgt)
        if rule is not None:
            out = rule(self, n, args, kwargs, label)
        else:
            out = self._activation_call(n, args, kwargs, label)
        if out is NotImplemented:
            raise self._unsupported(n, f"the op {label}")
        return out

    # ------------------------------------------------------------------ module rules
    @moment_rule(modules=(nn.Linear,))
    def _linear_module(self, n: fx.Node, m: nn.Module, x: Gauss, name: str) -> Any:
        return self._linear_like(n, name, x, m, lambda v: F.linear(v, m.weight * m.weight))

    @moment_rule(modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d))
    def _conv_module(self, n: fx.Node, m: nn.Module, x: Gauss, name: str) -> Any:
        if m.padding_mode != "zeros":
            return NotImplemented
        return self._linear_like(n, name, x, m, lambda v: m._conv_forward(v, m.weight * m.weight, None))

    @moment_rule(modules=(nn.Identity, nn.Flatten, nn.Unflatten))
    def _shape_module(self, n: fx.Node, m: nn.Module, x: Gauss, name: str) -> Any:
        return x.map(m)

    @moment_rule(module_bases=(nn.modules.batchnorm._BatchNorm,))
    def _batchnorm_module(self, n: fx.Node, m: nn.Module, x: Gauss, name: str) -> Any:
        if m.training or m.running_var is None:
            return NotImplemented
        scale = (m.weight if m.affine else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
        shape = [1, -1] + [1] * (x.mean.dim() - 2)
        self._log(n, name, "affine (inference statistics)", True)
        return Gauss(m(x.mean), x.var * (scale * scale).reshape(shape), x.indep, x.gaussian)

    @moment_rule(modules=(nn.Softmax,))
    def _softmax_module(self, n: fx.Node, m: nn.Module, x: Gauss, name: str) -> Any:
        return self._softmax(n, x, m.dim if m.dim is not None else -1, name)

    # ------------------------------------------------------------------ Tensor method rules
    # (called with a random ``x`` and no other random argument)
    @moment_rule(methods=_SIZE_METHODS)
    def _size_method(self, n: fx.Node, x: Gauss, args: tuple, kwargs: dict, name: str) -> Any:
        return getattr(x.mean, name)(*args[1:], **kwargs)

    @moment_rule(methods=_SHAPE_METHODS)
    def _shape_method(self, n: fx.Node, x: Gauss, args: tuple, kwargs: dict, name: str) -> Any:
        return x.map(lambda t: getattr(t, name)(*args[1:], **kwargs))

    @moment_rule(methods=("relu", "sigmoid", "tanh"))
    def _activation_method(self, n: fx.Node, x: Gauss, args: tuple, kwargs: dict, name: str) -> Any:
        return self._elementwise(n, Activation(name), x, f"Tensor.{name}")

    @moment_rule(methods=("softmax",))
    def _softmax_method(self, n: fx.Node, x: Gauss, args: tuple, kwargs: dict, name: str) -> Any:
        return self._softmax(n, x, args[1] if len(args) > 1 else kwargs.get("dim", -1), "Tensor.softmax")

    # ------------------------------------------------------------------ function rules (aten or Python)
    @staticmethod
    def _unary(args: tuple, kwargs: dict) -> bool:
        """The first argument is random, the others are not."""
        return bool(args) and _is_g(args[0]) and not _has_g(args[1:]) and not _has_g(kwargs)

    @moment_rule(aten=_SIZE_ATEN)
    def _size_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        if not self._unary(args, kwargs):
            return NotImplemented
        return n.target(args[0].mean, *args[1:], **kwargs)

    @moment_rule(aten=_SHAPE_ATEN, functions=_SHAPE_FUNCS)
    def _shape_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        if not self._unary(args, kwargs):
            return NotImplemented
        tgt = n.target
        return args[0].map(lambda t: tgt(t, *args[1:], **kwargs))

    @moment_rule(aten=("dropout",), functions=_DROPOUT_FUNCS)
    def _dropout_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        if not self._unary(args, kwargs):
            return NotImplemented
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        return self._dropout(n, args[0], float(p), label)

    @moment_rule(aten=_LIN_ATEN, functions=_LIN_FUNCS)
    def _linear_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        """Weighted layers with constant weights: weight at 1, bias at 2."""
        if not (self._unary(args, kwargs) and len(args) >= 2 and isinstance(args[1], torch.Tensor)):
            return NotImplemented
        tgt, x, w = n.target, args[0], args[1]
        va = list(args)
        va[0], va[1] = None, w * w
        if len(va) > 2:
            va[2] = None
        kw_v = dict(kwargs, bias=None) if "bias" in kwargs else kwargs

        def fvar(v, va=va, kw_v=kw_v):
            va[0] = v
            return tgt(*va, **kw_v)

        return self._linear_like(n, label, x, lambda t: tgt(t, *args[1:], **kwargs), fvar)

    @moment_rule(aten=_MM_ATEN, functions=(torch.matmul, operator.matmul))
    def _matmul_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        if not (self._unary(args, kwargs) and isinstance(args[1], torch.Tensor)):
            return NotImplemented
        tgt, x, w = n.target, args[0], args[1]
        return self._linear_like(n, label, x, lambda t: tgt(t, w), lambda v: tgt(v, w * w))

    def _activation_call(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        """Elementwise activations (relu, sigmoid, tanh, gelu, silu, elu, leaky relu) as
        :func:`activation_of_call` recognises them."""
        if not self._unary(args, kwargs):
            return NotImplemented
        act = activation_of_call(n.target, kwargs)
        if act is None:
            return NotImplemented
        if act.kind == "leakyrelu" and len(args) > 1:
            act = Activation("leakyrelu", (("negative_slope", float(args[1])),))
        return self._elementwise(n, act, args[0], label)

    @moment_rule(aten=("softmax", "_softmax"), functions=_SOFTMAX_FUNCS)
    def _softmax_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        if not self._unary(args, kwargs):
            return NotImplemented
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        return self._softmax(n, args[0], dim, label)

    @moment_rule(aten=("addmm",))
    def _addmm_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        """addmm(bias, x, w)"""
        if not (not _is_g(args[0]) and _is_g(args[1]) and isinstance(args[2], torch.Tensor)
                and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1):
            return NotImplemented
        b, xg, w = args[0], args[1], args[2]
        return self._linear_like(n, label, xg, lambda t: torch.addmm(b, t, w), lambda v: torch.mm(v, w * w))

    @moment_rule(aten=("add", "sub"), functions=_ADD | _SUB)
    def _add_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        """Adding constants; the sum of two random values (taken as independent)."""
        tgt, name = n.target, aten_name(n.target)
        sign = -1.0 if (tgt in _SUB or name == "sub") else 1.0
        alpha = float(kwargs.get("alpha", 1.0))
        a, b = args[0], args[1]
        if _is_g(a) and _is_g(b):
            self._log(n, label, "sum of random values: means add, variances add", False,
                      "the two operands are taken as independent")
            mean = a.mean + sign * alpha * b.mean
            return Gauss(mean, a.var + alpha * alpha * b.var, a.indep and b.indep, False)
        if _is_g(a):
            return Gauss(a.mean + sign * alpha * b, a.var, a.indep, a.gaussian)
        if _is_g(b):
            return Gauss(a + sign * alpha * b.mean, alpha * alpha * b.var, b.indep, b.gaussian)
        return NotImplemented

    @moment_rule(aten=("mul",), functions=_MUL)
    def _mul_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        """Multiplying by a constant."""
        a, b = args[0], args[1]
        if _is_g(a) and not _is_g(b):
            return Gauss(a.mean * b, a.var * b * b, a.indep, a.gaussian)
        if _is_g(b) and not _is_g(a):
            return Gauss(b.mean * a, b.var * a * a, b.indep, b.gaussian)
        return NotImplemented

    @moment_rule(aten=("div",), functions=_DIV)
    def _div_fn(self, n: fx.Node, args: tuple, kwargs: dict, label: str) -> Any:
        """Dividing by a constant."""
        if not (_is_g(args[0]) and not _is_g(args[1]) and not kwargs):
            return NotImplemented
        a, b = args
        return Gauss(a.mean / b, a.var / (b * b), a.indep, a.gaussian)


def _act_how(act: Activation) -> str:
    if act.kind in ("relu", "leakyrelu"):
        return "in closed form"
    if act.kind in ("sigmoid", "tanh"):
        return "by Gauss-Legendre integration (float64 precision)"
    return "by 64-node Gauss-Hermite quadrature"


def run_moments(model: Any, xs: Sequence[np.ndarray], batch_size: int,
                device: str = "cpu") -> tuple[np.ndarray, np.ndarray, bool, list[dict]]:
    """Per-example output mean and variance ``[N, K]`` (float64), whether they are already
    probabilities (the model ends in softmax), and the rule per node. ``device``: where the
    model's graph module lives (the inputs are moved there)."""
    prop = MomentPropagator(model)
    n = len(xs[0])
    means, vars_, probs = [], [], False
    steps: list[dict] = []
    for a in range(0, n, batch_size):
        batch = [torch.from_numpy(np.ascontiguousarray(x[a:a + batch_size])).to(device) for x in xs]
        out = prop.run(batch)
        if isinstance(out, Gauss):
            m, v, probs = out.mean, out.var, out.probs
        elif isinstance(out, torch.Tensor):
            m, v = out, torch.zeros_like(out)
        else:
            raise UsageError("the model's first output is not a tensor")
        means.append(m.double().reshape(len(batch[0]), -1).cpu().numpy())
        vars_.append(v.double().reshape(len(batch[0]), -1).cpu().numpy())
        if not steps:
            steps = prop.step_records()
    return np.concatenate(means), np.concatenate(vars_), probs, steps


def per_example(mean: np.ndarray, var: np.ndarray, probs: bool, task: str, tau: float | None = None,
                temperature: float | None = None) -> dict[str, np.ndarray]:
    """Per-example statistics from analytic moments (the MC path's keys where they exist).

    Classification: predictive probabilities and their variance (from the logits by
    :func:`probs_from_logits` unless the model already outputs probabilities); entropy is
    H[mean]. Expected entropy, mutual information and the variation ratio need the
    distribution of the probabilities, not two moments: they are left out (the variance of
    the probabilities, ``var``/``std``, is the epistemic measure reported instead).
    ``temperature`` divides Gaussian logits (mean / T, var / T^2: exact); a model that outputs
    probabilities has no logits to divide: the API passes no temperature then."""
    from dropcli.analysis import stats

    if task == "classification":
        if probs:
            pm, pv = mean, var
        else:
            if temperature is not None and temperature != 1.0:
                mean, var = mean / temperature, var / temperature ** 2
            t_p, t_v = probs_from_logits(torch.from_numpy(mean), torch.from_numpy(var))
            pm, pv = t_p.numpy(), t_v.numpy()
        pm = np.clip(pm, 0.0, 1.0)
        return {"mean": pm, "var": pv, "std": np.sqrt(pv), "pred": pm.argmax(-1), "confidence": pm.max(-1),
                "entropy": stats.entropy(pm)}
    v = var + (1.0 / tau if tau is not None else 0.0)
    return {"mean": mean, "var": v, "std": np.sqrt(v)}
