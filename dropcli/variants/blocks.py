"""Spatially structured and activation-ranked dropout: dropblock, cutout, maxdrop.

- dropblock (Ghiasi et al. 2018): Bernoulli seeds grown into contiguous ``b x b`` blocks on
  each (sample, channel) map of an ``[N, C, H, W]`` activation, with per-sample rescaling.
- cutout (DeVries & Taylor 2017): one or more ``L x L`` squares zeroed in the model input.
- maxdrop (Park & Kwak 2016; Santos et al. 2020, MaxDropout): zero the highest activations
  of each map, after min-max normalisation. Deterministic given ``x``.

Randomness is drawn through :func:`~dropcli.variants.base.uniform_like` on slices of ``x``
(``x[:, :, :Hv, :Wv]``, ``x[:, :1, :1, :1]``), so the modules trace with a dynamic batch.
Spatial sizes are read from ``x.shape``; where they are symbolic (torch.export with a dynamic H
and W) or traced, dropblock computes everything from tensors of x's size instead
(:meth:`DropBlock._sample_dynamic`), so the captured program runs at every size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
from dropcli.errors import UsageError
from dropcli.variants.base import AFTER, INPUT, Param, SiteModule, VariantSpec, check_p, check_positive_int, uniform_like
from dropcli.variants.registry import register

# ---------------------------------------------------------------------------------------
# dropblock
# ---------------------------------------------------------------------------------------


def dropblock_gamma(p: float, b: int, h: int, w: int) -> float:
    """Seed rate ``gamma = p/b^2 * HW/((H-b+1)(W-b+1))`` (Ghiasi 2018, eq. 1). Needs b <= H, W."""
    return p / (b * b) * (h * w) / ((h - b + 1) * (w - b + 1))


def _block_too_big(b: int, h: int, w: int, where: str) -> UsageError:
    return UsageError(
        f"dropblock --block-size {b} does not fit the {h}x{w} feature map at {where}: a block must fit inside the map",
        f"use --block-size {min(h, w)} or smaller, or put dropblock on layers with larger maps (--layers/--after)",
    )


class DropBlock(SiteModule):
    """DropBlock: A regularization method for convolutional networks (Ghiasi et al., 2018).

    Paper: https://arxiv.org/abs/1810.12890

    For an ``[N, C, H, W]`` map and block side ``b``: seeds ``~ Bernoulli(gamma)`` on the
    ``(H-b+1) x (W-b+1)`` positions where a whole block fits (one seed map per sample and
    channel), with ``gamma = p/b^2 * HW/((H-b+1)(W-b+1))``. Each seed is the top-left corner
    of a dropped ``b x b`` block: ``M = 1 - maxpool_b(pad(seeds, b-1))``. Output
    ``x * M * numel / sum(M)`` with numel and sum taken per sample (all-dropped samples give
    zeros). Identity at test time.
    """

    block_size: int

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        b = int(self.block_size)
        h, w = x.shape[-2], x.shape[-1]
        if not (isinstance(h, int) and isinstance(w, int)) or torch.jit.is_tracing():
            return self._sample_dynamic(x, b)
        if b > h or b > w:
            raise _block_too_big(b, h, w, "this site")
        hv, wv = h - b + 1, w - b + 1
        gamma = dropblock_gamma(self.p, b, h, w)
        seeds = (uniform_like(x[:, :, :hv, :wv]) < gamma).to(x.dtype)
        # seed at (r, c) covers rows r..r+b-1, cols c..c+b-1: zero-pad to [H+b-1, W+b-1]
        # (b-1 before, b-1 after) and take a stride-1 b x b max: output (i, j) sees seeds
        # (i-b+1..i, j-b+1..j), exactly the blocks that cover pixel (i, j).
        padded = F.pad(seeds, (b - 1, b - 1, b - 1, b - 1))
        mask = 1.0 - F.max_pool2d(padded, kernel_size=b, stride=1)
        numel = float(x.shape[1] * h * w)
        kept = mask.sum(dim=(1, 2, 3), keepdim=True)
        scale = numel / kept.clamp(min=1.0)  # sum(M) = 0 -> M = 0 -> output 0, never NaN
        return x * mask * scale

    def _sample_dynamic(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """The same blocks when H and W are only known at run time (symbolic sizes under
        torch.export, a TorchScript trace): no Python arithmetic on the sizes and no slice whose
        size depends on them (export would bake the capture's H and W in, or guard them: a
        [H-b+1] slice makes it refuse H = b). Uniforms are drawn over the whole map and seeds
        kept only where a block fits, ``valid = 1 - maxpool_b(pad_after(0, value=1))``; gamma,
        HW and numel are counted from tensors of x's size. A seed at (r, c) covers r..r+b-1, so
        ``M = 1 - maxpool_b(pad_before(seeds, b-1))`` is [H, W]. A map smaller than the block
        gets no seed and is left as it is (ONNX does the same; eager torch, which sees the
        size, refuses it)."""
        zero = torch.zeros_like(x[:1, :1])  # [1, 1, H, W]
        outside = F.pad(zero, (0, b - 1, 0, b - 1), value=1.0)
        valid = 1.0 - F.max_pool2d(outside, kernel_size=b, stride=1)  # 1 where a whole block fits
        hw = (zero + 1.0).sum()
        gamma = hw / valid.sum().clamp(min=1.0) * (self.p / (b * b))
        seeds = (uniform_like(x) < gamma).to(x.dtype) * valid
        mask = 1.0 - F.max_pool2d(F.pad(seeds, (b - 1, 0, b - 1, 0)), kernel_size=b, stride=1)
        numel = hw * x.size(1)
        kept = mask.sum(dim=(1, 2, 3), keepdim=True)
        return x * mask * (numel / kept.clamp(min=1.0))


def dropblock_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float, block_size: int) -> tuple[str, str]:
    bs = int(block_size)
    if info.rank is not None and info.rank != 4:
        raise UsageError(f"dropblock needs an [N, C, H, W] feature map, got rank {info.rank}",
                         "put it after 2-d convolutions (--after conv, or --layers)")
    static = info.shape is not None and all(info.shape[d] is not None for d in (2, 3))
    if static:
        h, w = info.static_dims([2, 3], "dropblock")
        if bs > h or bs > w:
            raise _block_too_big(bs, h, w, "an ONNX site")
        hv, wv = h - bs + 1, w - bs + 1
        valid = b.op("Slice", x, b.i64([0, 0]), b.i64([hv, wv]), b.i64([2, 3]))
        gamma = b.f(dropblock_gamma(p, bs, h, w), info)
        hw = b.f(float(h * w), info)
    else:
        # dynamic H, W: the valid seed region is x[:, :, :H-b+1, :W-b+1] (a negative end), and
        # gamma = p/b^2 * HW/((H-b+1)(W-b+1)) is computed from Shape(x) when the model runs. No
        # block fits a map smaller than the block: no seed is drawn and nothing is dropped there
        # (the torch site, which sees the size, refuses it instead).
        end = -(bs - 1) if bs > 1 else 2 ** 62
        valid = b.op("Slice", x, b.i64([0, 0]), b.i64([end, end]), b.i64([2, 3]))
        hw_f = b.op("Cast", b.op("Slice", b.op("Shape", x), b.i64([2]), b.i64([4])), to=info.elem_type)  # [H, W]
        hw = b.reduce("ReduceProd", hw_f, [0], keepdims=1)
        valid_hw = b.reduce("ReduceProd", b.op("Sub", hw_f, b.f(float(bs - 1), info)), [0], keepdims=1)
        gamma = b.op("Mul", b.op("Div", hw, valid_hw), b.f(p / (bs * bs), info))
    u = b.op("RandomUniformLike", valid, dtype=info.elem_type)
    seeds = b.op("Cast", b.op("Less", u, gamma), to=info.elem_type)
    padded = b.op("Pad", seeds, b.i64([0, 0, bs - 1, bs - 1, 0, 0, bs - 1, bs - 1]))
    pooled = b.op("MaxPool", padded, kernel_shape=[bs, bs], strides=[1, 1])
    mask = b.op("Sub", b.f(1.0, info), pooled)
    # numel per sample = C*H*W; C may be dynamic
    c = b.op("Cast", b.op("Slice", b.op("Shape", x), b.i64([1]), b.i64([2])), to=info.elem_type)
    numel = b.op("Mul", c, hw)
    kept = b.reduce("ReduceSum", mask, [1, 2, 3], keepdims=1)
    scale = b.op("Div", numel, b.op("Max", kept, b.f(1.0, info)))
    return b.op("Mul", b.op("Mul", x, mask), scale), x


# ---------------------------------------------------------------------------------------
# cutout
# ---------------------------------------------------------------------------------------


class Cutout(SiteModule):
    """Improved Regularization of Convolutional Neural Networks with Cutout (DeVries & Taylor, 2017).

    Paper: https://arxiv.org/abs/1708.04552

    Input-level. Per sample and hole, a centre ``(cy, cx)`` is drawn uniformly over the
    ``H x W`` pixels and the ``L x L`` square with rows ``cy - L//2 .. cy - L//2 + L - 1``
    (same for columns), clipped at the borders, is zeroed in every channel. Holes are
    independent (they may overlap). No rescaling. Nothing happens at test time.
    """

    hole_size: int
    holes: int

    def extra_repr(self) -> str:
        return f"hole_size={self.hole_size}, holes={self.holes}"

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise UsageError(f"cutout needs an [N, H, W] or [N, C, H, W] input, got rank {x.dim()}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = int(self.hole_size)
        half = size // 2
        one = x[:, :1, :1, :1] if x.dim() == 4 else x[:, :1, :1]  # [N, 1, 1(, 1)]
        if not one.is_floating_point():
            one = one.to(torch.float32)
        rows = torch.arange(h, device=x.device, dtype=one.dtype).reshape(h, 1)
        cols = torch.arange(w, device=x.device, dtype=one.dtype).reshape(1, w)
        k = int(self.holes)
        # one draw for all centres of the site: [N, 1, 1, 2k] (or [N, 1, 2k])
        u = uniform_like(one.expand(*([-1] * (one.dim() - 1)), 2 * k))
        hole = torch.zeros_like(one, dtype=torch.bool)
        for i in range(k):
            cy = torch.clamp(torch.floor(u[..., 2 * i:2 * i + 1] * h), max=h - 1)
            cx = torch.clamp(torch.floor(u[..., 2 * i + 1:2 * i + 2] * w), max=w - 1)
            top, left = cy - half, cx - half
            in_rows = (rows >= top) & (rows <= top + (size - 1))
            in_cols = (cols >= left) & (cols <= left + (size - 1))
            hole = hole | (in_rows & in_cols)  # [N, 1, H, W] (or [N, H, W]): shared by channels
        return torch.where(hole, torch.zeros_like(x), x)


def cutout_onnx(b: OnnxBuilder, x: str, info: TensorInfo, hole_size: int, holes: int) -> tuple[str, str]:
    rank = info.rank
    if rank not in (3, 4):
        raise UsageError(f"cutout needs an [N, H, W] or [N, C, H, W] input, but its rank is {rank if rank is not None else 'unknown'}",
                         "export the model with a known input rank")
    h, w = info.static_dims([rank - 2, rank - 1], "cutout")
    size, half = int(hole_size), int(hole_size) // 2
    fl = TensorProto.FLOAT  # coordinates in float32 whatever the input type
    axes = list(range(1, rank))
    one = b.op("Slice", x, b.i64([0] * (rank - 1)), b.i64([1] * (rank - 1)), b.i64(axes))  # [N, 1, 1(, 1)]
    lead = [1] * (rank - 2)
    rows = b.const(np.arange(h, dtype=np.float32).reshape(lead + [h, 1]), np.float32)
    cols = b.const(np.arange(w, dtype=np.float32).reshape(lead + [1, w]), np.float32)

    # ONE RandomUniformLike for all 2*holes centre coordinates of the site, sliced per use.
    # onnxruntime (1.32, CPU) seeds seedless random nodes with consecutive integers into a
    # Lehmer LCG (minstd_rand0), so same-shaped random nodes in one session give
    # u_j = u_0 + j*w (mod 1) elementwise: with one node per coordinate, the holes' centres
    # would be displaced along a fixed diagonal and overlap far too often.
    k = int(holes)
    draws = b.op("RandomUniformLike", b.op("Tile", one, b.i64([1] * (rank - 1) + [2 * k])), dtype=fl)  # [N, 1(, 1), 2k]
    last = rank - 1

    def span(coords: str, n: int, j: int) -> str:
        u = b.op("Slice", draws, b.i64([j]), b.i64([j + 1]), b.i64([last]))
        c = b.op("Min", b.op("Floor", b.op("Mul", u, b.const(float(n), np.float32))), b.const(float(n - 1), np.float32))
        lo = b.op("Sub", c, b.const(float(half), np.float32))
        hi = b.op("Add", lo, b.const(float(size - 1), np.float32))
        return b.op("And", b.op("GreaterOrEqual", coords, lo), b.op("LessOrEqual", coords, hi))

    hole = None
    for i in range(k):
        one_hole = b.op("And", span(rows, h, 2 * i), span(cols, w, 2 * i + 1))
        hole = one_hole if hole is None else b.op("Or", hole, one_hole)
    return b.op("Where", hole, b.f(0, info), x), x


# ---------------------------------------------------------------------------------------
# maxdrop
# ---------------------------------------------------------------------------------------


def _map_dims(rank: int) -> list[int]:
    """Dims of one map: the spatial dims for rank >= 3 (per sample, channel), the features for rank 2."""
    return list(range(2, rank)) if rank >= 3 else [1]


class MaxDrop(SiteModule):
    """MaxDropout (Santos et al., 2020), after max-drop (Park & Kwak, 2016).

    Paper: https://arxiv.org/abs/2007.13723 ; Park & Kwak, "Analysis on the dropout effect
    in convolutional neural networks" (ACCV 2016).

    Min-max normalise each map, ``z = (x - min) / (max - min)`` (per sample and channel for
    rank >= 3, per sample over the features for rank 2), and zero the units with
    ``z > 1 - p``. No rescaling. A constant map (max == min) is left unchanged. Identity at
    test time. Deterministic given ``x``.
    """

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        dims = _map_dims(x.dim())
        lo = torch.amin(x, dim=dims, keepdim=True)
        hi = torch.amax(x, dim=dims, keepdim=True)
        rng = hi - lo
        flat = rng == 0
        z = (x - lo) / torch.where(flat, torch.ones_like(rng), rng)
        drop = (z > (1.0 - self.p)) & ~flat
        return torch.where(drop, torch.zeros_like(x), x)


def maxdrop_onnx(b: OnnxBuilder, x: str, info: TensorInfo, p: float) -> tuple[str, str]:
    if info.rank is None or info.rank < 2:
        raise UsageError(f"maxdrop needs a tensor of rank 2 or more, but the site's rank is {info.rank if info.rank is not None else 'unknown'}",
                         "run shape inference on the model, or choose other sites")
    dims = _map_dims(info.rank)
    lo = b.reduce("ReduceMin", x, dims, keepdims=1)
    hi = b.reduce("ReduceMax", x, dims, keepdims=1)
    rng = b.op("Sub", hi, lo)
    flat = b.op("Equal", rng, b.f(0.0, info))
    z = b.op("Div", b.op("Sub", x, lo), b.op("Where", flat, b.f(1.0, info), rng))
    drop = b.op("And", b.op("Greater", z, b.f(1.0 - p, info)), b.op("Not", flat))
    return b.op("Where", drop, b.f(0.0, info), x), x


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

BLOCK_P = Param("p", float, 0.1, "drop probability p: the expected dropped fraction (keep q = 1 - p)", check_p)
BLOCK_SIZE = Param("block_size", int, 7, "dropblock: block side b (a b x b square per seed)", check_positive_int)
HOLE_SIZE = Param("hole_size", int, 16, "cutout: hole side L in pixels", check_positive_int)
HOLES = Param("holes", int, 1, "cutout: number of holes per sample", check_positive_int)

register(VariantSpec(
    name="dropblock", summary="drop contiguous b x b blocks of each feature map, rescale per sample",
    formula="seeds ~ Bern(gamma) on the (H-b+1)x(W-b+1) block positions, gamma = p/b^2 * HW/((H-b+1)(W-b+1)); "
            "M = 1 - maxpool_b(pad(seeds)); y = x * M * numel/sum(M) per sample",
    test_rule="y = x",
    attaches=AFTER, paper="Ghiasi, Lin & Le 2018, DropBlock (NeurIPS), arXiv:1810.12890",
    torch_module=DropBlock, onnx_builder=dropblock_onnx,
    params=(BLOCK_P, BLOCK_SIZE), ranks=(4,), rank_help="an [N, C, H, W] feature map",
    notes="One seed map per (sample, channel); a seed is the top-left corner of its block and seeds are only "
          "drawn where the whole block fits, so every dropped region is a union of full b x b squares (any b, "
          "even b included). The expected dropped fraction is at most p (the paper's gamma ignores "
          "overlapping blocks and the smaller coverage near the borders). numel and sum(M) are per sample, so an example's output does "
          "not depend on the rest of its batch; a sample with every unit dropped outputs zeros. Default p = 0.1 "
          "(the paper's keep_prob 0.9). b must not exceed H or W: an error at inject time in ONNX when H and W are "
          "static, and when the torch site runs eagerly. With dynamic H and W (ONNX, or a .pt2/TorchScript "
          "captured with symbolic sizes), gamma and the seed region come from the map's size at run time "
          "(a map smaller than b is left unchanged there).",
))
register(VariantSpec(
    name="cutout", summary="zero L x L squares of the input at uniformly random centres",
    formula="per sample and hole: (cy, cx) ~ U(pixels); zero rows cy-L//2..cy-L//2+L-1 x cols likewise, clipped; "
            "all channels",
    test_rule="y = x (nothing)",
    attaches=INPUT, paper="DeVries & Taylor 2017, Improved Regularization of CNNs with Cutout, arXiv:1708.04552",
    torch_module=Cutout, onnx_builder=cutout_onnx,
    params=(HOLE_SIZE, HOLES), ranks=(3, 4), rank_help="an [N, H, W] or [N, C, H, W] image input",
    notes="Input-level: attaches to model inputs. Holes are independent and may overlap; holes near a border "
          "are clipped, so they are smaller there. No rescaling. Takes no p: the expected zeroed fraction "
          "follows from L, the number of holes and the image size. ONNX: H and W must be static.",
))
register(VariantSpec(
    name="maxdrop", summary="zero the highest activations of each map (min-max normalised above 1 - p)",
    formula="z = (x - min)/(max - min) per map; y = x * [z <= 1 - p]  (max == min: y = x)",
    test_rule="y = x",
    attaches=AFTER, paper="Park & Kwak 2016 (ACCV, max-drop); Santos et al. 2020, MaxDropout, arXiv:2007.13723",
    torch_module=MaxDrop, onnx_builder=maxdrop_onnx,
    ranks=(2, 3, 4, 5), rank_help="[N, D] features or an [N, C, ...] map",
    notes="A map is the spatial extent of one (sample, channel) for rank >= 3, and the features of one sample "
          "for rank 2. No rescaling; ties at the maximum are all dropped; a constant map is left unchanged. "
          "Deterministic given x: every MC pass gives the same output, so it gives a weak MC signal "
          "(the predictive spread comes only from other, stochastic sites).",
))
