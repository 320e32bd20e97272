"""Layer classes and activations that sites rewrite or absorb, as plain data shared by both
backends (no torch, no onnx).

A REPLACE variant names the layer classes it rewrites (:data:`LAYER_CLASSES`) and the
activations it absorbs (:data:`ACT_KINDS`). :class:`Activation` is the description of one
absorbed activation; each backend evaluates it its own way
(:func:`dropcli.backends.torch.layers.activation_forward` in torch,
:func:`dropcli.backends.onnx.layers.emit_activation` in ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LINEAR, CONV, MAXPOOL, AVGPOOL, LSTM, GRU = "linear", "conv", "maxpool", "avgpool", "lstm", "gru"
LAYER_CLASSES = (LINEAR, CONV, MAXPOOL, AVGPOOL, LSTM, GRU)

ACT_KINDS = ("relu", "sigmoid", "tanh", "gelu", "silu", "elu", "leakyrelu")


@dataclass(frozen=True)
class Activation:
    """An elementwise activation absorbed into a site: its kind plus its one parameter
    (gelu: approximate, elu: alpha, leakyrelu: negative_slope)."""

    kind: str
    attrs: tuple[tuple[str, Any], ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.attrs)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None) -> "Activation | None":
        if not rec:
            return None
        rec = dict(rec)
        kind = rec.pop("kind")
        return cls(kind, tuple(sorted(rec.items())))

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.attrs)
        return f"{self.kind}({extra})" if extra else self.kind


# Where a variant attaches (VariantSpec.attaches). The backends turn these into candidate sites.
AFTER = "after"  # after a layer or activation: y = site(x), all consumers rewired
RESIDUAL = "residual"  # on the branch operand of a residual add
INPUT = "input"  # on a model input
REPLACE = "replace"  # replaces a trained layer (Linear, Conv, pooling, LSTM/GRU) by a site built from it
