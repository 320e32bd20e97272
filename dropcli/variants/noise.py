"""Noise-based dropout: Gaussian (multiplicative) dropout and alpha dropout (SELU nets).

Both keep the first two moments of the activations in MC/training mode, and both are the
identity at test time.

- gaussian: ``y = x * n`` with ``n ~ N(1, p/q)`` elementwise. The variance is ``p/(1-p)``
  (not ``p(1-p)``) and the mean is 1 (not 0): with these, ``E[y] = x`` and
  ``Var[y] = x^2 p/q``, the same as inverted Bernoulli dropout at the same ``p``.
- alpha: dropped units are set to ``a' = -1.7581`` (SELU's negative saturation value
  ``-lambda*alpha``) and an affine correction ``a*(.) + b`` restores zero mean and unit
  variance for standardised inputs: ``a = (q + a'^2 q p)^-1/2`` and ``b = -a a' p``.
"""

from __future__ import annotations

import math

import torch

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
from dropcli.variants.base import AFTER, SiteModule, VariantSpec, keep_mask_like, normal_like
from dropcli.variants.registry import register

# SELU's saturation value -lambda*alpha, to the precision given in the variant catalogue
# (torch uses -1.7580993408473766; the difference is far below any statistical tolerance).
ALPHA_PRIME = -1.7581


def gaussian_std(p: float) -> float:
    """Std of the multiplicative noise: ``sqrt(p/q)``, so the variance is ``p/(1-p)``."""
    return math.sqrt(p / (1.0 - p))


def alpha_affine(p: float) -> tuple[float, float]:
    """``(a, b)`` of alpha dropout: ``a = (q + a'^2 q p)^-1/2``, ``b = -a a' p``."""
    q = 1.0 - p
    a = (q + ALPHA_PRIME * ALPHA_PRIME * q * p) ** -0.5
    return a, -a * ALPHA_PRIME * p


class GaussianDropout(SiteModule):
    """Gaussian dropout (Srivastava et al. 2014, JMLR, section 10: "Multiplicative Gaussian Noise").

    Training / MC: ``y = x * n`` with ``n ~ N(1, sigma^2)`` elementwise and
    ``sigma^2 = p/(1-p)``, so ``E[y] = x`` and ``Var[y] = x^2 p/(1-p)``, the moments of
    inverted Bernoulli dropout with drop probability ``p``. Test: identity.

    Per-unit rates (``dropcli finetune --variant variational``): ``alpha`` is a list with one noise
    variance per unit of the last dimension (the features a following Linear reads), so
    ``n_j ~ N(1, alpha_j)``; ``p`` is then the equivalent drop rate of the mean alpha,
    ``mean(alpha) / (1 + mean(alpha))`` (what `dropcli inspect` shows).
    """

    def __init__(self, p: float = 0.5, alpha: list[float] | None = None, **params):
        if alpha is not None:
            alpha = [float(a) for a in alpha]
            if not alpha or not all(math.isfinite(a) and a >= 0 for a in alpha):
                raise ValueError("gaussian alpha must be a non-empty list of finite variances >= 0")
            mean = sum(alpha) / len(alpha)
            p = mean / (1.0 + mean)
            params["alpha"] = alpha
        super().__init__(p, **params)
        if alpha is not None:
            self.register_buffer("alpha_std", torch.tensor(alpha, dtype=torch.float32).sqrt())
        else:
            self.alpha_std = None

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha_std is not None:
            return x * (1.0 + self.alpha_std.to(x.dtype) * normal_like(x))
        n = 1.0 + gaussian_std(self.p) * normal_like(x)
        return x * n

    def extra_repr(self) -> str:
        if self.alpha_std is None:
            return super().extra_repr()
        return f"p={self.p:.4g}, alpha per unit ({self.alpha_std.numel()} units)"


def gaussian_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float, alpha: list[float] | None = None) -> tuple[str, str]:
    # standard normal noise, scaled and shifted explicitly (as in torch), so the graph's
    # only random op draws N(0, 1); per-unit alpha scales by a [units] vector (broadcast on the last dim)
    z = b.op("RandomNormalLike", x, dtype=info.elem_type)
    std = b.f(gaussian_std(p), info) if alpha is None else b.const([math.sqrt(a) for a in alpha], info.np_dtype)
    n = b.op("Add", b.op("Mul", z, std), b.f(1.0, info))
    return b.op("Mul", x, n), x


class AlphaDropout(SiteModule):
    """Alpha dropout for self-normalising (SELU) networks (Klambauer et al. 2017,
    "Self-Normalizing Neural Networks", NeurIPS; torch ``nn.AlphaDropout``).

    Training / MC: with ``m ~ Bernoulli(q)``, dropped units are set to ``a' = -1.7581`` and
    ``y = a*(x*m + a'*(1-m)) + b``, ``a = (q + a'^2 q p)^-1/2``, ``b = -a a' p``. For inputs
    with zero mean and unit variance the output keeps zero mean and unit variance.
    Test: identity.
    """

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        a, b = alpha_affine(self.p)
        keep = keep_mask_like(x, self.q)
        return torch.where(keep, x, ALPHA_PRIME) * a + b


def alpha_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    a, c = alpha_affine(p)
    u = b.op("RandomUniformLike", x, dtype=info.elem_type)
    keep = b.op("Less", u, b.f(1.0 - p, info))
    y = b.op("Where", keep, x, b.f(ALPHA_PRIME, info))
    return b.op("Add", b.op("Mul", y, b.f(a, info)), b.f(c, info)), x


register(VariantSpec(
    name="gaussian", summary="multiplicative Gaussian noise with the moments of Bernoulli dropout",
    formula="y = x * n,  n ~ N(1, p/(1-p))  (std sqrt(p/q))", test_rule="y = x",
    attaches=AFTER, paper="Srivastava et al. 2014 (JMLR), section 10",
    torch_module=GaussianDropout, onnx_builder=gaussian_onnx, aliases=("gaussian-dropout",),
    notes="The noise variance is p/(1-p), not p(1-p), and its mean is 1: E[y] = x and Var[y] = x^2 p/q, "
          "matching inverted Bernoulli dropout at the same p. ONNX: RandomNormalLike.",
))
register(VariantSpec(
    name="alpha", summary="alpha dropout for SELU networks (keeps zero mean and unit variance)",
    formula="y = a*(x*m + a'*(1-m)) + b,  m ~ Bernoulli(q), a' = -1.7581, a = (q + a'^2 q p)^-1/2, b = -a a' p",
    test_rule="y = x",
    attaches=AFTER, paper="Klambauer et al. 2017, Self-Normalizing Neural Networks (NeurIPS)",
    torch_module=AlphaDropout, onnx_builder=alpha_onnx, aliases=("alpha-dropout", "alphadropout"),
    notes="Meant for SELU networks (inputs with zero mean and unit variance); the SNN paper uses small "
          "rates such as p = 0.05 or 0.1. Same rule as torch.nn.AlphaDropout.",
))
