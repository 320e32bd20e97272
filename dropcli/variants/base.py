"""The variant catalogue's building blocks: parameters, specs and the torch site base classes
(the registry of specs is :mod:`dropcli.variants.registry`).

Convention (everywhere in dropcli): ``p`` is the DROP probability and ``q = 1 - p`` the
KEEP probability; masks are ``m ~ Bernoulli(q)``.

A variant is one :class:`VariantSpec` holding a torch module class (a :class:`SiteModule`)
and an ONNX builder function. Adding a variant = one spec + one module + one builder
(+ one statistical test).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dropcli.backends.torch.layers import TorchLayer, activation_forward, activation_of_module, describe_module, layer_forward
from dropcli.errors import UsageError
from dropcli.model import naming
from dropcli.model.kinds import AFTER, INPUT, REPLACE, RESIDUAL  # noqa: F401  (re-exported: the variants' attach modes)

# ---------------------------------------------------------------------------------------
# Noise source. Variants draw all randomness through these helpers, so an engine can swap
# the generator (for example a counter-based stream keyed by example index) in one place.
# In tracing/export they emit plain rand_like/randn_like ops.
# ---------------------------------------------------------------------------------------

_NOISE_OVERRIDE: list[Any] = []


@contextlib.contextmanager
def noise_source(src: Any) -> Iterator[None]:
    """Route the variants' random draws through ``src`` (has ``uniform_like``/``normal_like``)."""
    _NOISE_OVERRIDE.append(src)
    try:
        yield
    finally:
        _NOISE_OVERRIDE.pop()


def uniform_like(t: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise with the shape, dtype and device of ``t``."""
    if _NOISE_OVERRIDE and not tracing():
        return _NOISE_OVERRIDE[-1].uniform_like(t)
    return torch.rand_like(t)


def normal_like(t: torch.Tensor) -> torch.Tensor:
    """N(0, 1) noise with the shape, dtype and device of ``t``."""
    if _NOISE_OVERRIDE and not tracing():
        return _NOISE_OVERRIDE[-1].normal_like(t)
    return torch.randn_like(t)


def keep_mask_like(t: torch.Tensor, q: float) -> torch.Tensor:
    """A bool Bernoulli(q) keep-mask shaped like ``t``.

    Plain ``rand_like(t) < q`` when exported/traced or without an engine. The MC engine
    draws it from 16-bit lanes of 64-bit random integers (4 masks per draw), which
    quantises q to a multiple of 1/65536.
    """
    if _NOISE_OVERRIDE and not tracing():
        src = _NOISE_OVERRIDE[-1]
        if hasattr(src, "keep_mask_like"):
            return src.keep_mask_like(t, q)
        return src.uniform_like(t) < q
    return torch.rand_like(t) < q


def apply_keep(x: torch.Tensor, q: float, scale: float = 1.0) -> torch.Tensor:
    """``x * m * scale`` with ``m ~ Bernoulli(q)`` elementwise (scale = 1/q: inverted dropout).

    Exported/traced: ``x * (rand_like(x) < q) * scale``. In the MC engine the mask comes from
    :func:`keep_mask_like`'s cheap bits and is applied in place (no float mask is built).
    """
    if _NOISE_OVERRIDE and not tracing():
        src = _NOISE_OVERRIDE[-1]
        if hasattr(src, "mask_like"):
            return src.mask_like(x, q, scale).mul_(x)  # a fresh mask: multiplied in place (m * x is x * m)
        return x * (src.uniform_like(x) < q).to(x.dtype) * scale
    keep = (torch.rand_like(x) < q).to(x.dtype)
    return x * keep * scale if scale != 1.0 else x * keep


def tracing() -> bool:
    """Whether torch is capturing a graph (jit trace, torch.export, torch.compile) right now."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling())


# ---------------------------------------------------------------------------------------
# Parameters and specs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a variant, with its CLI flag, default and check."""

    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns an error text, or None when fine

    def validate(self, value: Any, variant: str) -> Any:
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{self.flag} for {variant} must be a {self.type.__name__}, got {value!r}") from None
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise UsageError(f"--{self.flag}={value} is invalid for {variant}: {problem}")
        return value

    @property
    def flag(self) -> str:
        return self.name.replace("_", "-")


def check_p(p: float) -> str | None:
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p < 1.0):
        return "the drop probability p must be in [0, 1)"
    return None


def check_positive_int(v: int) -> str | None:
    return None if v >= 1 else "must be a positive integer"


P_PARAM = Param("p", float, 0.5, "drop probability p (keep q = 1 - p)", check_p)


# Where a variant attaches (AFTER, RESIDUAL, INPUT, REPLACE): defined in dropcli.model.kinds, torch-free,
# so that the ONNX backend reads them without importing torch.


@dataclass(frozen=True)
class Replacement:
    """How a ``REPLACE`` variant finds and rewrites the layers it replaces, in each backend.

    ``torch_match(gm, node)`` / ``onnx_match(node_proto)`` return the layer kind (e.g. "lstm")
    when the variant can replace that node, else None. ``torch_apply(gm, node, spec, params,
    site_name)`` swaps the fx node for the site (the caller recompiles);
    ``onnx_apply(onnx_model, node_index, spec, params)`` rewrites the ONNX node and returns the
    site's name.
    """

    kinds: tuple[str, ...]
    torch_match: Callable[..., str | None]
    torch_apply: Callable[..., Any]
    onnx_match: Callable[..., str | None]
    onnx_apply: Callable[..., str]


@dataclass(frozen=True)
class VariantSpec:
    name: str
    summary: str
    formula: str  # train-time rule, one line
    test_rule: str  # inference-time rule, one line
    attaches: str  # AFTER | RESIDUAL | INPUT | REPLACE
    paper: str
    torch_module: type["SiteModule"]
    onnx_builder: Callable[..., tuple[str, str]]
    params: tuple[Param, ...] = (P_PARAM,)
    ranks: tuple[int, ...] | None = None  # allowed ranks of the tensor at the site (None: any)
    rank_help: str = ""
    aliases: tuple[str, ...] = ()
    default_after: tuple[str, ...] = ("activation",)  # default --after selection
    notes: str = ""
    # REPLACE variants: the layer classes they rewrite (dropcli.model.kinds.LAYER_CLASSES) and the
    # activations that, directly following such a layer, the site absorbs (dropcli.model.kinds.ACT_KINDS)
    replaces: tuple[str, ...] = ()
    absorbs: tuple[str, ...] = ()
    # True when the test rule gives back the original model's function (identity at test time)
    identity_at_test: bool = True
    # REPLACE variants whose rewrite the generic layer mechanism (dropcli.backends.torch.layers) cannot express
    # (a recurrent layer becomes a loop with several outputs) bring their own finder/rewriter
    replacement: Replacement | None = None

    def resolve_params(self, given: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and validate. Unknown keys for this variant are an error."""
        known = {p.name: p for p in self.params}
        out: dict[str, Any] = {}
        for key, value in given.items():
            if value is None:
                continue
            if key not in known:
                raise UsageError(
                    f"variant {self.name} takes no --{key.replace('_', '-')}",
                    f"its parameters are: {', '.join('--' + p.flag for p in self.params)}",
                )
            out[key] = known[key].validate(value, self.name)
        for p in self.params:
            out.setdefault(p.name, p.default)
        return out

    def check_rank(self, rank: int | None, where: str) -> None:
        if rank is None or self.ranks is None:
            return
        if rank not in self.ranks:
            raise UsageError(
                f"variant {self.name} needs a tensor of rank {' or '.join(map(str, self.ranks))} "
                f"({self.rank_help}), but {where} has rank {rank}",
                "choose other sites with --after/--layers, or another variant",
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "formula": self.formula,
            "test_rule": self.test_rule,
            "attaches": self.attaches,
            "replaces": list(self.replaces),
            "absorbs": list(self.absorbs),
            "identity_at_test": self.identity_at_test,
            "ranks": list(self.ranks) if self.ranks else None,
            "parameters": [
                {"name": p.name, "flag": "--" + p.flag, "type": p.type.__name__, "default": p.default, "help": p.help}
                for p in self.params
            ],
            "paper": self.paper,
            "aliases": list(self.aliases),
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------
# torch side
# ---------------------------------------------------------------------------------------


class SiteModule(nn.Module):
    """Base class of every torch site.

    The ``mc`` buffer (bool scalar) switches a site between inference behaviour (False,
    the default) and stochastic MC/training behaviour (True). It survives TorchScript and
    ``torch.export`` saving, so users can flip it without dropcli::

        for name, buf in model.named_buffers():
            if name.endswith("dropcli_mc"):
                buf.fill_(True)

    Subclasses implement :meth:`sample` (stochastic rule) and optionally :meth:`infer`
    (test rule, identity by default).
    """

    spec: VariantSpec  # set by register()

    def __init__(self, p: float = 0.5, **params: Any):
        super().__init__()
        self.p = float(p)
        self.params = dict(params)
        for k, v in params.items():
            setattr(self, k, v)
        self.register_buffer(naming.MC_NAME, torch.zeros((), dtype=torch.bool))  # read below as self.dropcli_mc

    @property
    def q(self) -> float:
        return 1.0 - self.p

    def sample(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            # Graph capture: keep both branches and select on the buffer at run time.
            return torch.where(self.dropcli_mc, self.sample(x), self.infer(x))
        if bool(self.dropcli_mc):
            return self.sample(x)
        return self.infer(x)

    def set_mc(self, on: bool = True) -> "SiteModule":
        self.dropcli_mc.fill_(bool(on))
        return self

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"p={self.p}{extra}"


def set_mc(model: nn.Module, on: bool = True) -> int:
    """Switch every dropcli site (by buffer name, so loaded TorchScript/pt2 models work too)."""
    n = 0
    for name, buf in model.named_buffers():
        if naming.is_mc_buffer(name):
            buf.fill_(bool(on))
            n += 1
    return n


def _where_tree(cond: torch.Tensor, a: Any, b: Any) -> Any:
    """``torch.where(cond, a, b)`` on each tensor of matching (nested) tuples."""
    if isinstance(a, (tuple, list)):
        return type(a)(_where_tree(cond, x, y) for x, y in zip(a, b))
    return torch.where(cond, a, b)


class LayerSite(SiteModule):
    """Base class of the sites of REPLACE variants: a trained layer rewritten.

    Built from a :class:`dropcli.backends.torch.layers.TorchLayer` (the layer's class, attributes and
    tensors, plus the activation it absorbs, if any). The tensors become this module's
    parameters under the layer's own names (``weight``, ``bias``, ``weight_hh_l0`` ...),
    sharing storage and dtype with the trained ones. :meth:`original` computes what the
    replaced layer (and activation) computed; subclasses implement :meth:`sample` (MC mode)
    and :meth:`infer` (the variant's test rule) on the same inputs as the layer.
    """

    def __init__(self, layer: Any, p: float = 0.5, **params: Any):
        super().__init__(p, **params)
        self.layer_cls = layer.cls
        self.nd = int(layer.nd)
        self.layer_attrs = dict(layer.attrs)
        self.act = layer.act
        self.output_style = layer.output_style
        self.tensor_names = tuple(sorted(layer.tensors))
        for name in self.tensor_names:
            t = layer.tensors[name]
            self.register_parameter(name, nn.Parameter(t.detach(), requires_grad=bool(t.requires_grad)))
        self.check_layer()

    @classmethod
    def from_module(cls, module: nn.Module, act: nn.Module | None = None, **params: Any) -> "LayerSite":
        """A site from a stock layer module (and activation module), e.g. ``nn.Linear``."""
        layer = describe_module(module)
        if layer is None:
            raise UsageError(f"{type(module).__name__} is not a layer dropcli rewrites")
        if act is not None:
            layer.act = activation_of_module(act)
            if layer.act is None:
                raise UsageError(f"{type(act).__name__} is not an activation dropcli can absorb")
        spec = cls.spec
        return cls(layer, **spec.resolve_params(params))

    def check_layer(self) -> None:
        """Refuse layers the variant can't rewrite (a UsageError); called at construction."""

    @property
    def layer(self) -> Any:
        return TorchLayer(self.layer_cls, self.nd, self.layer_attrs, {n: getattr(self, n) for n in self.tensor_names},
                          self.act, output_style=self.output_style)

    def layer_record(self) -> dict[str, Any]:
        return self.layer.record()

    def pre(self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: Any = True) -> torch.Tensor:
        """The layer's own op (no activation), with substituted weight/bias when given."""
        return layer_forward(self.layer, x, weight, bias)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return activation_forward(self.act, h) if self.act is not None else h

    def original(self, *inputs: torch.Tensor) -> Any:
        return self.activate(self.pre(inputs[0]))

    def infer(self, *inputs: torch.Tensor) -> Any:  # type: ignore[override]
        return self.original(*inputs)

    def forward(self, *inputs: torch.Tensor) -> Any:  # type: ignore[override]
        if tracing():
            return _where_tree(self.dropcli_mc, self.sample(*inputs), self.infer(*inputs))
        if bool(self.dropcli_mc):
            return self.sample(*inputs)
        return self.infer(*inputs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer.describe()}"
