"""Activation-dependent dropout with an exact drop count (Gavier): dropact, dropinv, dropcorr.

All three work on the units of one sample: every non-batch element, flattened, so a sample
has ``D = numel / batch`` units. Exactly ``k = floor(p*D)`` of them are zeroed per sample
and the kept units are scaled by ``D/(D-k)`` in MC/training mode; the test rule is identity.

The k-subset is always drawn as the top-k of per-unit keys:

- dropact / dropinv: Gumbel-top-k. With ``key_i = log w_i + G_i``, ``G_i ~ Gumbel(0, 1)``
  iid, the indices of the k largest keys are distributed exactly as k successive draws
  without replacement with ``P(i) ∝ w_i`` (Vieira 2014; Kool et al. 2019). ``w_i = x_i``
  (dropact) or ``1/x_i`` (dropinv), for units with ``x_i > 0``. Non-positive units get
  ``key = -1e4 + G_i``, strictly below every positive unit's key (``|log x| <= 104`` for
  any positive float32 and the guarded Gumbel lies in about [-3.9, 16.7]), so they are only
  chosen, uniformly, once all positive units are taken.
- dropcorr: the keys are one draw ``s ~ N(0, S)`` per sample, with ``S`` the batch scatter
  matrix of the centred activations.

ONNX has no sampling-without-replacement op (``Multinomial`` samples with replacement), so
the builders use TopK + ScatterElements on the flattened ``[N, D]`` tensor.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnx import helper

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
from dropcli.errors import UsageError
from dropcli.variants.base import AFTER, SiteModule, VariantSpec, normal_like, uniform_like
from dropcli.variants.registry import register

# Keys of non-positive units sit at this offset (plus Gumbel noise), far below any
# log-weight of a positive unit.
NONPOS_KEY = -1.0e4


def drop_count(p: float, d: int) -> int:
    """``k = floor(p*D)``, robust to float round-off (0.29*100 = 28.999... gives 29), < D."""
    k = int(math.floor(p * d + 1e-9))
    return max(0, min(k, d - 1))


def _units(shape) -> int:
    d = 1
    for s in shape[1:]:
        d *= int(s)
    return d


def _guarded_uniform(t: torch.Tensor) -> torch.Tensor:
    """U(0,1) noise shaped like ``t`` and clipped into the open interval (0, 1)."""
    fi = torch.finfo(t.dtype)
    return uniform_like(t).clamp(fi.tiny, 1.0 - fi.eps)


def _gumbel_like(t: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(_guarded_uniform(t)))


def _weighted_keys(xf: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Gumbel-top-k keys: ``±log x + G`` for x > 0, ``-1e4 + G`` otherwise."""
    pos = xf > 0
    logw = torch.log(torch.where(pos, xf, torch.ones_like(xf)))
    if inverse:
        logw = -logw
    g = _gumbel_like(xf)
    return torch.where(pos, logw + g, g + NONPOS_KEY)


def corr_scores(xf: torch.Tensor) -> torch.Tensor:
    """One draw ``s_b ~ N(0, S)`` per row of ``xf`` ([B, D]), ``S = sum_b xc_b xc_b^T``.

    With ``xc = xf - mean_b(xf)`` ([B, D]) and ``z ~ N(0, I)`` of shape [B, B] (iid
    entries), ``s = z @ xc`` has rows ``s_b = sum_j z_bj xc_j``. Each is a linear map of a
    Gaussian vector, so Gaussian with mean 0 and
    ``Cov(s_b) = sum_j sum_l E[z_bj z_bl] xc_j xc_l^T = sum_j xc_j xc_j^T = S``
    (``E[z_bj z_bl] = [j == l]``), and rows b != b' are independent because they use
    disjoint rows of z. The D x D matrix S is never formed: the cost is B*B*D, not D*D.
    """
    xc = xf - xf.mean(dim=0, keepdim=True)
    b = xf.shape[0]
    z = normal_like(xf.new_zeros((b, b)))
    return z @ xc


def _corr_keys(xf: torch.Tensor) -> torch.Tensor:
    s = corr_scores(xf)
    # S = 0 for this row (batch of one, identical rows, all-constant units): s is all 0, so
    # fall back to a uniformly random k-subset via iid uniform keys. No division: no NaN.
    degenerate = s.abs().amax(dim=1, keepdim=True) == 0
    return torch.where(degenerate, uniform_like(xf), s)


class _RankedDrop(SiteModule):
    """Shared torch rule: zero the top-k keys of each sample, scale the rest by D/(D-k)."""

    def keys(self, xf: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        d = _units(x.shape)
        k = drop_count(self.p, d)
        if k == 0:
            return x
        xf = x.reshape(-1, d)
        idx = torch.topk(self.keys(xf), k, dim=1).indices
        keep = torch.scatter(torch.ones_like(xf), 1, idx, 0.0)
        return (xf * keep * (d / (d - k))).reshape_as(x)


class DropAct(_RankedDrop):
    """Activation-proportional dropout (Gavier).

    Exactly ``k = floor(p*D)`` units per sample are dropped, drawn without replacement with
    ``P_i ∝ x_i`` among units with ``x_i > 0`` (Gumbel-top-k); kept units are scaled by
    ``D/(D-k)``. Identity at test time.
    """

    def keys(self, xf: torch.Tensor) -> torch.Tensor:
        return _weighted_keys(xf, inverse=False)


class DropInv(_RankedDrop):
    """Inverse-activation dropout (Gavier): as :class:`DropAct` with ``P_i ∝ 1/x_i``."""

    def keys(self, xf: torch.Tensor) -> torch.Tensor:
        return _weighted_keys(xf, inverse=True)


class DropCorr(_RankedDrop):
    """Correlation-driven dropout (Gavier).

    Centre the activations over the batch, ``S = sum_b xc_b xc_b^T``, draw ``s ~ N(0, S)``
    per sample and drop its top-k units; kept units are scaled by ``D/(D-k)``. Identity at
    test time. A sample's mask depends on the other samples in its batch.
    """

    def keys(self, xf: torch.Tensor) -> torch.Tensor:
        return _corr_keys(xf)


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------


def _static_units(info: TensorInfo, what: str) -> int:
    if info.rank is None or info.shape is None:
        raise UsageError(f"{what} needs the rank and the non-batch sizes of its input in ONNX, but they are unknown",
                         "run shape inference on the model or export it with fixed non-batch sizes")
    if info.rank < 1:
        raise UsageError(f"{what} needs a tensor with a batch dimension, but the site is a scalar")
    return _units([None] + info.static_dims(list(range(1, info.rank)), what))


def _onnx_gumbel(b: OnnxBuilder, like: str, info: TensorInfo) -> str:
    fi = np.finfo(info.np_dtype)
    u = b.op("RandomUniformLike", like, dtype=info.elem_type)
    u = b.op("Clip", u, b.f(float(fi.tiny), info), b.f(1.0 - float(fi.eps), info))
    return b.op("Neg", b.op("Log", b.op("Neg", b.op("Log", u))))


def _onnx_weighted_keys(b: OnnxBuilder, xf: str, info: TensorInfo, inverse: bool) -> str:
    pos = b.op("Greater", xf, b.f(0.0, info))
    logw = b.op("Log", b.op("Where", pos, xf, b.f(1.0, info)))
    if inverse:
        logw = b.op("Neg", logw)
    g = _onnx_gumbel(b, xf, info)
    return b.op("Where", pos, b.op("Add", logw, g), b.op("Add", g, b.f(NONPOS_KEY, info)))


def _onnx_corr_keys(b: OnnxBuilder, xf: str, info: TensorInfo) -> str:
    # see corr_scores: s = z @ (xf - mean_b xf), z ~ N(0, I) of shape [N, N]
    xc = b.op("Sub", xf, b.reduce("ReduceMean", xf, [0], keepdims=1))
    n = b.op("Slice", b.op("Shape", xf), b.i64([0]), b.i64([1]))
    zeros = b.zeros_of_shape(b.op("Concat", n, n, axis=0), info)
    z = b.op("RandomNormalLike", zeros, dtype=info.elem_type)
    s = b.op("MatMul", z, xc)
    rowmax = b.reduce("ReduceMax", b.op("Abs", s), [1], keepdims=1)
    degenerate = b.op("Equal", rowmax, b.f(0.0, info))
    u = b.op("RandomUniformLike", xf, dtype=info.elem_type)
    return b.op("Where", degenerate, u, s)


def _onnx_ranked(b: OnnxBuilder, x: str, info: TensorInfo, p: float, what: str, keys_fn) -> tuple[str, str]:
    d = _static_units(info, what)
    k = drop_count(p, d)
    if k == 0:
        return x, x
    xf = b.op("Reshape", x, b.i64([-1, d]))
    keys = keys_fn(b, xf, info)
    _, idx = b.op("TopK", keys, b.i64([k]), n_out=2, axis=1, largest=1, sorted=0)
    ones = b.op("ConstantOfShape", b.op("Shape", xf),
                value=helper.make_tensor("value", info.elem_type, [1], [1]))
    zeros = b.zeros_of_shape(b.op("Shape", idx), info)
    keep = b.op("ScatterElements", ones, idx, zeros, axis=1)
    y = b.op("Mul", b.op("Mul", xf, keep), b.f(d / (d - k), info))
    return b.op("Reshape", y, b.op("Shape", x)), x


def dropact_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    return _onnx_ranked(b, x, info, p, "dropact", lambda b, xf, info: _onnx_weighted_keys(b, xf, info, False))


def dropinv_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    return _onnx_ranked(b, x, info, p, "dropinv", lambda b, xf, info: _onnx_weighted_keys(b, xf, info, True))


def dropcorr_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    return _onnx_ranked(b, x, info, p, "dropcorr", _onnx_corr_keys)


_UNITS = ("Units are all non-batch elements of a sample, flattened (D of them); "
          "k = floor(p*D) (k = 0 leaves the sample unchanged). ")
_ONNX = "ONNX: TopK + ScatterElements on the flattened [N, D] tensor; D must be static, the batch may be dynamic. "

register(VariantSpec(
    name="dropact", summary="drop exactly k units per sample, chosen with probability proportional to the activation",
    formula="drop k = floor(p*D) units w/o replacement, P_i ∝ x_i (x_i > 0); y = x * m * D/(D-k)",
    test_rule="y = x",
    attaches=AFTER, paper="Gavier (activation-dependent dropout)",
    torch_module=DropAct, onnx_builder=dropact_onnx,
    notes=_UNITS + "Sampled by Gumbel-top-k (keys log x_i + Gumbel). Units with x_i <= 0 are dropped only "
                   "when fewer than k units are positive, and then uniformly. " + _ONNX,
))
register(VariantSpec(
    name="dropinv", summary="drop exactly k units per sample, chosen with probability proportional to 1/activation",
    formula="drop k = floor(p*D) units w/o replacement, P_i ∝ 1/x_i (x_i > 0); y = x * m * D/(D-k)",
    test_rule="y = x",
    attaches=AFTER, paper="Gavier (activation-dependent dropout)",
    torch_module=DropInv, onnx_builder=dropinv_onnx,
    notes=_UNITS + "Sampled by Gumbel-top-k (keys -log x_i + Gumbel). Units with x_i <= 0 are dropped only "
                   "when fewer than k units are positive, and then uniformly. " + _ONNX,
))
register(VariantSpec(
    name="dropcorr", summary="drop the top-k units of a Gaussian draw with the batch's activation covariance",
    formula="xc = x - mean_batch(x); S = sum_b xc_b xc_b^T; s ~ N(0, S); drop top-k(s); y = x * m * D/(D-k)",
    test_rule="y = x",
    attaches=AFTER, paper="Gavier (activation-dependent dropout)",
    torch_module=DropCorr, onnx_builder=dropcorr_onnx,
    notes=_UNITS + "s is drawn as z @ xc with z ~ N(0, I) of shape [B, B], so S is never formed; the cost is "
                   "B*B noise and B*B*D multiply-adds per site, so very large batches are expensive. "
                   "This variant makes an example's mask depend on the other examples in its batch "
                   "(MC results change with batch composition and batch size). Where S gives s = 0 for a "
                   "sample (batch size 1, identical rows) the k units are drawn uniformly instead; no NaN. "
                   + _ONNX,
))
