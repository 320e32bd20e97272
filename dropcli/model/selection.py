"""Layers, kinds and the one site-selection language shared by every command.

A backend describes its model as a list of :class:`Layer` rows. The selection language
(``--after``, ``--layers``, ``--exclude``, ``--allow-output``) picks rows from that list the
same way for torch and ONNX.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Sequence

from dropcli.errors import UsageError

ACTIVATIONS = {
    "relu", "relu6", "leakyrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh",
    "hardtanh", "hardswish", "hardsigmoid", "softplus", "prelu", "softsign",
}
NORMS = {"batchnorm", "layernorm", "groupnorm", "instancenorm"}
WEIGHTED = {"linear", "conv", "convtranspose", "lstm", "gru", "rnn", "embedding"}

# Kind groups usable in --after.
GROUPS = {
    "activation": ACTIVATIONS,
    "norm": NORMS,
    "weighted": WEIGHTED,
}

# Canonical kind for names seen in torch modules, aten ops, torch functions and ONNX ops
# (all compared lower-case, without underscores).
_KIND_ALIASES = {
    "linear": "linear", "addmm": "linear", "gemm": "linear", "lazylinear": "linear", "bilinear": "linear",
    "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv", "conv": "conv",
    "lazyconv1d": "conv", "lazyconv2d": "conv", "lazyconv3d": "conv",
    "convtranspose1d": "convtranspose", "convtranspose2d": "convtranspose", "convtranspose3d": "convtranspose",
    "convtranspose": "convtranspose",
    "batchnorm1d": "batchnorm", "batchnorm2d": "batchnorm", "batchnorm3d": "batchnorm", "batchnorm": "batchnorm",
    "nativebatchnormlegitnotraining": "batchnorm", "batchnormalization": "batchnorm",
    "layernorm": "layernorm", "layernormalization": "layernorm", "nativelayernorm": "layernorm",
    "groupnorm": "groupnorm", "groupnormalization": "groupnorm", "nativegroupnorm": "groupnorm",
    "instancenorm1d": "instancenorm", "instancenorm2d": "instancenorm", "instancenormalization": "instancenorm",
    "relu": "relu", "relu6": "relu6", "leakyrelu": "leakyrelu", "elu": "elu", "selu": "selu", "celu": "celu",
    "gelu": "gelu", "silu": "silu", "swish": "silu", "mish": "mish", "sigmoid": "sigmoid", "tanh": "tanh",
    "hardtanh": "hardtanh", "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "softplus": "softplus",
    "prelu": "prelu", "softsign": "softsign",
    "softmax": "softmax", "logsoftmax": "softmax", "softmaxint": "softmax",
    "dropout": "dropout", "dropout1d": "dropout", "dropout2d": "dropout", "dropout3d": "dropout",
    "alphadropout": "dropout", "featurealphadropout": "dropout", "featuredropout": "dropout",
    "nativedropout": "dropout",
    "maxpool1d": "pool", "maxpool2d": "pool", "maxpool3d": "pool", "avgpool1d": "pool", "avgpool2d": "pool",
    "avgpool3d": "pool", "adaptiveavgpool1d": "pool", "adaptiveavgpool2d": "pool", "adaptiveavgpool3d": "pool",
    "adaptivemaxpool2d": "pool", "maxpool2dwithindices": "pool", "maxpool": "pool", "averagepool": "pool",
    "globalaveragepool": "pool", "globalmaxpool": "pool",
    "add": "add", "iadd": "add", "sum": "add",
    "flatten": "reshape", "view": "reshape", "reshape": "reshape", "unflatten": "reshape",
    "embedding": "embedding", "gather": "embedding",
    "lstm": "lstm", "gru": "gru", "rnn": "rnn",
    "mul": "mul", "matmul": "matmul", "bmm": "matmul", "mm": "linear",
    "cat": "cat", "concat": "cat",
}


KNOWN_KINDS = set(_KIND_ALIASES.values())


def canonical_kind(raw: str) -> str:
    key = raw.lower().replace("_", "")
    return _KIND_ALIASES.get(key, key)


@dataclass
class Layer:
    """One row of ``dropcli inspect``: a layer (torch) or node (ONNX)."""

    name: str
    kind: str  # canonical kind ("linear", "relu", "dropout", ...)
    op: str  # backend-specific op/module type
    shape: list[Any] | None = None  # output shape where known (None entries are dynamic)
    params: int = 0
    dropout_p: float | None = None  # for existing dropout (or dropcli sites): its p
    dropout_variant: str | None = None  # "dropout" for stock dropout, variant name for dropcli sites
    is_output: bool = False  # in the output region (after the last weighted layer)
    is_input: bool = False
    residual: bool = False  # an add whose one operand is a skip of the other
    layer_class: str | None = None  # a layer a REPLACE variant can rewrite: linear, conv, maxpool, avgpool, lstm, gru
    ref: Any = field(default=None, repr=False, compare=False)

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "op": self.op,
            "shape": self.shape,
            "params": self.params,
            "dropout": None if self.dropout_p is None and self.dropout_variant is None
            else {"variant": self.dropout_variant, "p": self.dropout_p},
            "is_output": self.is_output,
            "is_input": self.is_input,
            "residual": self.residual,
            "layer_class": self.layer_class,
        }


@dataclass
class Selection:
    after: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    allow_output: bool = False

    @classmethod
    def from_options(
        cls, after: Sequence[str] | str | None, layers: Sequence[str] | str | None,
        exclude: Sequence[str] | str | None, allow_output: bool = False,
    ) -> "Selection":
        return cls(_split(after), _split(layers), _split(exclude), allow_output)

    @property
    def explicit(self) -> bool:
        return bool(self.after or self.layers)

    def describe(self) -> str:
        parts = []
        if self.after:
            parts.append("--after " + ",".join(self.after))
        if self.layers:
            parts.append("--layers " + ",".join(self.layers))
        if self.exclude:
            parts.append("--exclude " + ",".join(self.exclude))
        return " ".join(parts) or "the default selection"


def _split(v: Sequence[str] | str | None) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    out: list[str] = []
    for item in items:
        out.extend(t.strip() for t in item.split(",") if t.strip())
    return out


def kind_matches(kind: str, token: str) -> bool:
    token_l = token.lower()
    if token_l in GROUPS:
        return kind in GROUPS[token_l]
    return kind == canonical_kind(token_l) or kind == token_l


def _summarise(layers: Sequence[Layer]) -> str:
    kinds = sorted({l.kind for l in layers})
    names = [l.name for l in layers]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return f"kinds present: {', '.join(kinds)}; layers: {shown} (see `dropcli inspect`)"


def select(
    candidates: Sequence[Layer], sel: Selection, default_after: Sequence[str], what: str = "site",
) -> list[Layer]:
    """Apply the selection language to ``candidates`` and return the chosen layers.

    Raises a :class:`UsageError` that lists what exists when nothing matches.
    """
    chosen = list(candidates)
    after = sel.after or ([] if sel.layers else list(default_after))
    if after:
        chosen = [l for l in chosen if any(kind_matches(l.kind, t) for t in after)]
    if sel.layers:
        chosen = [l for l in chosen if any(fnmatch.fnmatchcase(l.name, g) for g in sel.layers)]
    if sel.exclude:
        chosen = [l for l in chosen if not any(fnmatch.fnmatchcase(l.name, g) for g in sel.exclude)]
    dropped_output = [l for l in chosen if l.is_output]
    if not sel.allow_output:
        chosen = [l for l in chosen if not l.is_output]
    if not chosen:
        desc = sel.describe() if sel.explicit else f"the default selection (--after {','.join(default_after)})"
        if dropped_output:
            raise UsageError(
                f"{desc} matches only the output layer ({', '.join(l.name for l in dropped_output)}), "
                f"where dropout does not go by default",
                "pass --allow-output to put it there anyway, or select other layers",
            )
        raise UsageError(f"{desc} matches no {what}", _summarise(candidates))
    return chosen
