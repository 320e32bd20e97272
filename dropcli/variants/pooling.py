"""Pooling dropout (Wu & Gu 2015): max-pooling dropout and average-pooling dropout.

Both replace a pooling layer (same kernel, strides, padding, dilation, ceil mode) by a site
that masks the pooling INPUT with ``m ~ Bernoulli(q)`` in MC/training mode:

- max-pooling dropout: ``y = max`` over the kept units of each window, and ``y = 0`` when a
  window keeps none of its units. For non-negative inputs (pooling after ReLU, the paper's
  setting) this is the same as zeroing the dropped units before the max. Test rule:
  probabilistic weighted pooling. Sort a window ascending, ``a_1 <= ... <= a_n``; output
  ``sum_i q p^(n-i) a_i``. That is exactly ``E[y]`` under the training mask: ``a_i`` is the
  output when it is kept and every larger unit is dropped (probability ``q p^(n-i)``), and
  the all-dropped case (``p^n``) gives 0. Padding taps of a window are never kept (they are
  -inf for a max), so a window at a border weighs only its real units. The weaker
  "``q * max``" rule that the paper rejects is not used.
- average-pooling dropout: ``E[avg(a*m)] = q*avg(a)``, so the masked average is scaled by
  ``1/q`` (inverted): ``y = avgpool(x * m / q)``; test rule: the average pool itself.

The masks are on the units of the input map (an input unit shared by overlapping windows is
kept or dropped in all of them); each window's expectation is the same either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dropcli.backends.onnx.builder import OnnxBuilder
from dropcli.backends.onnx.layers import OnnxLayer, check_static_window_input
from dropcli.errors import UsageError
from dropcli.model.kinds import AVGPOOL, MAXPOOL
from dropcli.model.pooling import PoolWindows, pool_windows, weighted_pool_weights
from dropcli.variants.base import REPLACE, LayerSite, VariantSpec, apply_keep, keep_mask_like
from dropcli.variants.registry import register


class MaxPoolDropout(LayerSite):
    """Max-pooling dropout (Wu & Gu 2015, "Towards dropout training for convolutional neural
    networks", Neural Networks 71; arXiv:1512.00242).

    MC: ``m ~ Bernoulli(q)`` on the pooling input; each window outputs the max of its kept
    units (0 if none is kept). Test: probabilistic weighted pooling, ``sum_i q p^(n-i) a_i``
    over the window sorted ascending (``n`` = the window's real units).
    """

    def check_layer(self) -> None:
        if self.layer_cls != MAXPOOL:
            raise UsageError(f"maxpool-dropout replaces max-pooling layers, not {self.layer_cls}")

    def _windows(self, sizes: tuple[int, ...]) -> PoolWindows:
        cache = self.__dict__.setdefault("_win_cache", {})
        if sizes not in cache:
            a = self.layer_attrs
            cache[sizes] = pool_windows(sizes, a["kernel"], a["stride"], a["padding"], a["padding"], a["dilation"],
                                        a["ceil_mode"])
        return cache[sizes]

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        keep = keep_mask_like(x, self.q)
        y = self.pre(torch.where(keep, x, float("-inf")))
        # windows that kept none of their units give 0 (found by pooling the mask itself, as in
        # ONNX, where MaxPool of all -inf gives the lowest finite float, not -inf)
        any_kept = self.pre(keep.to(x.dtype)) > 0.5
        return torch.where(any_kept, y, torch.zeros_like(y))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.nd
        win = self._windows(tuple(int(s) for s in x.shape[-nd:]))
        pad: list[int] = []
        for b, e in zip(reversed(win.pads_begin), reversed(win.pads_end)):
            pad += [b, e]
        xp = F.pad(x, pad, value=float("-inf")) if any(pad) else x
        flat = xp.flatten(-nd)  # [..., C, P]
        idx = torch.as_tensor(win.index, device=x.device)  # [*out, K]
        windows = flat[..., idx]  # [..., C, *out, K]
        top = torch.sort(windows, dim=-1, descending=True).values
        top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
        w = torch.as_tensor(weighted_pool_weights(win.window, self.p), dtype=x.dtype, device=x.device)
        return (top * w).sum(-1)


def maxpool_dropout_onnx(b: OnnxBuilder, layer: OnnxLayer, p: float) -> tuple[str, str]:
    if layer.cls != MAXPOOL:
        raise UsageError(f"maxpool-dropout replaces max-pooling layers, not {layer.op}")
    x, info = layer.x, layer.x_info
    q = 1.0 - p
    # MC: max over the kept units (dropped -> -inf), 0 where a window kept none
    u = b.op("RandomUniformLike", x, dtype=info.elem_type)
    keep = b.op("Less", u, b.f(q, info))
    ninf = b.f(float("-inf"), info)
    y = layer.pool(b, b.op("Where", keep, x, ninf))
    # onnxruntime's MaxPool of an all -inf window is the lowest finite float, not -inf: find the
    # windows that kept nothing by pooling the mask itself
    any_kept = b.op("Greater", layer.pool(b, b.op("Cast", keep, to=info.elem_type)), b.f(0.5, info))
    stoch = b.op("Where", any_kept, y, b.f(0.0, info))
    # test: probabilistic weighted pooling over the window (static spatial sizes)
    sizes = check_static_window_input(layer, "maxpool-dropout")
    kernel, strides, pads, dil, ceil = layer.pool_geometry()
    nd = len(kernel)
    win = pool_windows(sizes, kernel, strides, pads[:nd], pads[nd:], dil, ceil)
    xp = x
    if any(win.pads_begin) or any(win.pads_end):
        xp = b.op("Pad", x, b.i64([0, 0, *win.pads_begin, 0, 0, *win.pads_end]), ninf)
    flat = b.op("Reshape", xp, b.i64([0, 0, -1]))
    gathered = b.op("Gather", flat, b.i64(win.index), axis=2)  # [N, C, *out, K]
    k = win.window
    top, _ = b.op("TopK", gathered, b.i64([k]), axis=-1, largest=1, sorted=1, n_out=2)
    top = b.op("Where", b.op("IsInf", top, detect_positive=0), b.f(0.0, info), top)
    w = b.const(weighted_pool_weights(k, p).astype(info.np_dtype), info.np_dtype)
    det = b.reduce("ReduceSum", b.op("Mul", top, w), [-1], keepdims=0)
    return stoch, det


class AvgPoolDropout(LayerSite):
    """Average-pooling dropout (Wu & Gu 2015): ``m ~ Bernoulli(q)`` on the pooling input and
    ``y = avgpool(x * m / q)`` in MC mode, because ``E[avg(a*m)] = q*avg(a)``; the average
    pool itself at test time."""

    def check_layer(self) -> None:
        if self.layer_cls != AVGPOOL:
            raise UsageError(f"avgpool-dropout replaces average-pooling layers, not {self.layer_cls}")

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre(apply_keep(x, self.q, 1.0 / self.q))


def avgpool_dropout_onnx(b: OnnxBuilder, layer: OnnxLayer, p: float) -> tuple[str, str]:
    if layer.cls != AVGPOOL:
        raise UsageError(f"avgpool-dropout replaces average-pooling layers, not {layer.op}")
    x, info = layer.x, layer.x_info
    q = 1.0 - p
    mask = b.bernoulli_keep(x, q, info)
    scaled = b.op("Mul", b.op("Mul", x, mask), b.f(1.0 / q, info))
    return layer.pool(b, scaled), layer.pool(b, x)


register(VariantSpec(
    name="maxpool-dropout", summary="max-pooling dropout: drop pooling inputs; test by probabilistic weighted pooling",
    formula="m ~ Bernoulli(q) on the pooling input; y = max of each window's kept units (0 if none is kept)",
    test_rule="sort each window ascending a_1 <= ... <= a_n; y = sum_i q * p^(n-i) * a_i",
    attaches=REPLACE, replaces=(MAXPOOL,), identity_at_test=False,
    paper="Wu & Gu 2015, Towards dropout training for convolutional neural networks (Neural Networks 71)",
    torch_module=MaxPoolDropout, onnx_builder=maxpool_dropout_onnx,
    aliases=("max-pooling-dropout", "maxpooldrop"),
    notes="Replaces MaxPool layers (1d/2d/3d; kernel, strides, padding, dilation and ceil mode kept). The test rule is "
          "the exact expectation of the MC rule, not q*max (the weaker baseline the paper rejects); padding taps are "
          "never kept, so a border window weighs only its real units. For non-negative inputs (after ReLU) the MC rule "
          "equals zeroing the dropped units. No rescaling (the weights sum to 1 - p^n). ONNX: the test rule gathers "
          "the windows with a constant index, so the spatial sizes must be static.",
))
register(VariantSpec(
    name="avgpool-dropout", summary="average-pooling dropout: drop pooling inputs, rescale by 1/q",
    formula="y = avgpool(x * m / q),  m ~ Bernoulli(q) on the pooling input",
    test_rule="y = avgpool(x)",
    attaches=REPLACE, replaces=(AVGPOOL,),
    paper="Wu & Gu 2015, Towards dropout training for convolutional neural networks (Neural Networks 71)",
    torch_module=AvgPoolDropout, onnx_builder=avgpool_dropout_onnx,
    aliases=("average-pooling-dropout", "avgpooldrop"),
    notes="Replaces AvgPool / AdaptiveAvgPool layers (ONNX AveragePool, GlobalAveragePool), every pooling attribute kept. "
          "E[avg(a*m)] = q*avg(a), so the masked average is scaled by 1/q and the test rule is the pool itself: "
          "inference mode equals the original model.",
))
