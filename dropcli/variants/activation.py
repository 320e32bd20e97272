"""Elementwise Bernoulli dropout: standard (inverted) and vanilla (scaled at test time)."""

from __future__ import annotations

import torch

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
from dropcli.variants.base import AFTER, SiteModule, VariantSpec, apply_keep
from dropcli.variants.registry import register


class StandardDropout(SiteModule):
    """Inverted dropout (Hinton 2012; Srivastava 2014): ``x*m/q`` in training, identity at test."""

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        return apply_keep(x, self.q, 1.0 / self.q)


def standard_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    mask = b.bernoulli_keep(x, 1.0 - p, info)
    return b.op("Mul", b.op("Mul", x, mask), b.f(1.0 / (1.0 - p), info)), x


class VanillaDropout(SiteModule):
    """Vanilla dropout (Srivastava 2014): ``x*m`` in training, ``q*x`` at test."""

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        return apply_keep(x, self.q)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.q


def vanilla_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    mask = b.bernoulli_keep(x, 1.0 - p, info)
    return b.op("Mul", x, mask), b.op("Mul", x, b.f(1.0 - p, info))


register(VariantSpec(
    name="standard", summary="inverted Bernoulli dropout (the default)",
    formula="y = x * m / q,  m ~ Bernoulli(q)", test_rule="y = x",
    attaches=AFTER, paper="Hinton et al. 2012; Srivastava et al. 2014 (JMLR)",
    torch_module=StandardDropout, onnx_builder=standard_onnx, aliases=("dropout", "inverted", "bernoulli"),
))
register(VariantSpec(
    name="vanilla", summary="Bernoulli dropout scaled at test time",
    formula="y = x * m,  m ~ Bernoulli(q)", test_rule="y = q * x",
    attaches=AFTER, paper="Srivastava et al. 2014 (JMLR)",
    torch_module=VanillaDropout, onnx_builder=vanilla_onnx, identity_at_test=False,
    notes="Equivalent to inverted dropout with the outgoing weights multiplied by q (see `dropcli convert`).",
))
