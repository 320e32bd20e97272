"""Structured Bernoulli dropout: whole feature maps (spatial) and whole residual branches
(droppath / stochastic depth).

Both draw one Bernoulli(q) keep-mask over a reduced shape and broadcast it:

- spatial: one mask per (sample, channel), shape ``[N, C, 1, ...]``, broadcast over the
  spatial dims (``Dropout1d/2d/3d``, picked by the rank 3/4/5 of the site's tensor).
- droppath: one mask per sample, shape ``[N, 1, ...]``, applied to a residual branch
  ``f(x)`` so that the block computes ``x + f(x)*m/q``.

Kept values are scaled by ``1/q`` (inverted dropout); both are the identity at test time.
The mask shapes are taken by slicing ``x`` (``x[:, :, :1, :1]``), so the batch dimension
stays dynamic under ``torch.jit.trace`` / ``torch.export``. ONNX has no feature-dropout
op: the builders draw ``RandomUniformLike`` over a ``ConstantOfShape`` whose shape is
``Shape(x)[:k]`` followed by ones, which also works with a dynamic batch.
"""

from __future__ import annotations

import torch
from onnx import TensorProto, helper

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
from dropcli.errors import UsageError
from dropcli.variants.base import AFTER, RESIDUAL, SiteModule, VariantSpec, keep_mask_like
from dropcli.variants.registry import register

SPATIAL_RANKS = (3, 4, 5)


def _reduced(x: torch.Tensor, keep_dims: int) -> torch.Tensor:
    """``x`` sliced to shape ``x.shape[:keep_dims] + [1]*(rank-keep_dims)`` (a view, no copy)."""
    return x[(slice(None),) * keep_dims + (slice(0, 1),) * (x.dim() - keep_dims)]


def _broadcast_keep(x: torch.Tensor, keep_dims: int, q: float) -> torch.Tensor:
    """``x * m / q`` with one Bernoulli(q) mask per index of the first ``keep_dims`` dims."""
    keep = keep_mask_like(_reduced(x, keep_dims), q).to(x.dtype)
    return x * keep * (1.0 / q)


def _onnx_broadcast_keep(b: OnnxBuilder, x: str, info: TensorInfo, p: float, keep_dims: int, rank: int | None) -> str:
    q = 1.0 - p
    if rank is not None:
        shape = b.per_sample_shape(x, keep_dims, rank)
    else:  # rank unknown in the graph: Shape(x)[:k] ++ ones(rank(x) - k), computed at run time
        shp = b.op("Shape", x)
        head = b.op("Slice", shp, b.i64([0]), b.i64([keep_dims]))
        n_rest = b.op("Sub", b.op("Shape", shp), b.i64([keep_dims]))
        ones = b.op("ConstantOfShape", n_rest, value=helper.make_tensor("value", TensorProto.INT64, [1], [1]))
        shape = b.op("Concat", head, ones, axis=0)
    mask = b.bernoulli_keep(b.zeros_of_shape(shape, info), q, info)
    return b.op("Mul", b.op("Mul", x, mask), b.f(1.0 / q, info))


class SpatialDropout(SiteModule):
    """Spatial dropout (Tompson et al. 2015, "Efficient Object Localization Using
    Convolutional Networks", CVPR; torch ``Dropout1d/2d/3d``).

    Training / MC: one mask ``m ~ Bernoulli(q)`` per (sample, channel) of an ``[N, C, ...]``
    tensor, broadcast over the 1, 2 or 3 spatial dims: ``y = x * m / q``. Whole feature maps
    are kept or dropped, because neighbouring activations are strongly correlated. Test:
    identity.
    """

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in SPATIAL_RANKS:
            raise UsageError(f"spatial dropout needs an [N, C, L], [N, C, H, W] or [N, C, D, H, W] tensor, "
                             f"got rank {x.dim()}", "put it after a convolution (see `dropcli inspect`)")
        return _broadcast_keep(x, 2, self.q)


def spatial_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    if info.rank is None:
        raise UsageError("spatial needs the rank of its input in ONNX, but it is unknown",
                         "run shape inference on the model (onnx.shape_inference) or pick another variant")
    if info.rank not in SPATIAL_RANKS:
        raise UsageError(f"spatial needs a tensor of rank 3, 4 or 5 ([N, C, spatial...]), but the site has rank {info.rank}")
    return _onnx_broadcast_keep(b, x, info, p, 2, info.rank), x


class DropPath(SiteModule):
    """Drop path / stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic
    Depth", ECCV; timm ``DropPath``; EfficientNet's ``drop_connect_rate``).

    Sits on the branch ``f(x)`` of a residual block ``x + f(x)``. Training / MC: one mask
    ``m ~ Bernoulli(q)`` per sample, shape ``[N, 1, ...]``: the branch output becomes
    ``f(x) * m / q``, so the whole block is skipped (identity) for dropped samples. Test:
    identity. This is not Wan et al.'s DropConnect, which masks individual weights.
    """

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1:
            raise UsageError("droppath needs a tensor with a batch dimension, but the residual branch is a scalar")
        return _broadcast_keep(x, 1, self.q)


def droppath_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    if info.rank is not None and info.rank < 1:
        raise UsageError("droppath needs a tensor with a batch dimension, but the residual branch is a scalar")
    return _onnx_broadcast_keep(b, x, info, p, 1, info.rank), x


register(VariantSpec(
    name="spatial", summary="drop whole feature maps: one mask per (sample, channel)",
    formula="y = x * m / q,  m ~ Bernoulli(q) of shape [N, C, 1, ...], broadcast over the spatial dims",
    test_rule="y = x",
    attaches=AFTER, paper="Tompson et al. 2015, Efficient Object Localization Using Convolutional Networks (CVPR)",
    torch_module=SpatialDropout, onnx_builder=spatial_onnx,
    ranks=SPATIAL_RANKS, rank_help="[N, C, L], [N, C, H, W] or [N, C, D, H, W]: Dropout1d/2d/3d by rank",
    aliases=("spatial-dropout", "dropout1d", "dropout2d", "dropout3d"),
    notes="Channels are dim 1 (channels-first). ONNX: RandomUniformLike over a [N, C, 1, ...] shape "
          "built from Shape(x), so the batch may be dynamic.",
))
register(VariantSpec(
    name="droppath", summary="stochastic depth: drop a residual branch per sample",
    formula="x + f(x) * m / q,  m ~ Bernoulli(q) of shape [N, 1, ...] (one per sample)",
    test_rule="x + f(x)",
    attaches=RESIDUAL, paper="Huang et al. 2016, Deep Networks with Stochastic Depth (ECCV)",
    torch_module=DropPath, onnx_builder=droppath_onnx,
    aliases=("drop-path", "stochastic-depth", "stochdepth"),
    notes="Goes on residual adds only; the site masks the branch operand f(x). EfficientNet's "
          "drop_connect_rate is this variant, not Wan et al.'s DropConnect (which masks weights). "
          "Huang et al. use a rate growing linearly with depth up to p = 0.5 for the last block.",
))
