"""Pooling windows, computed once in numpy and shared by both backends.

:func:`pool_windows` gives an index array that gathers every window of the padded, flattened
input (torch sites index a tensor with it; ONNX sites store it as an initializer).
:func:`weighted_pool_weights` gives Wu & Gu's probabilistic weighted pooling weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dropcli.errors import UsageError


@dataclass(frozen=True)
class PoolWindows:
    """Every pooling window of an input with spatial sizes ``in_sizes``, as indices into the
    flattened spatial dims of the input padded by ``pads_begin``/``pads_end`` (the padding
    value is the caller's: -inf for max pooling)."""

    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    index: np.ndarray  # int64 [*out_sizes, K], K = prod(kernel)

    @property
    def padded_sizes(self) -> tuple[int, ...]:
        return tuple(s + b + e for s, b, e in zip(self.in_sizes, self.pads_begin, self.pads_end))

    @property
    def window(self) -> int:
        return int(self.index.shape[-1])


def pool_out_size(size: int, k: int, s: int, pb: int, pe: int, d: int, ceil_mode: bool) -> int:
    """torch's (and onnxruntime's) pooled length for begin/end padding ``pb``/``pe``, with the
    ceil-mode rule that the last window must start inside the input or the begin padding."""
    span = size + pb + pe - d * (k - 1) - 1
    if ceil_mode:
        out = -(-span // s) + 1
        if (out - 1) * s >= size + pb:
            out -= 1
    else:
        out = span // s + 1
    return out


def pool_windows(in_sizes: tuple[int, ...] | list[int], kernel: list[int], stride: list[int], pads_begin: list[int],
                 pads_end: list[int], dilation: list[int], ceil_mode: bool) -> PoolWindows:
    """The windows of a pooling layer (torch: ``pads_begin = pads_end = padding``)."""
    nd = len(in_sizes)
    outs, begins, ends, axes = [], [], [], []
    for i in range(nd):
        size, k, s, d = int(in_sizes[i]), int(kernel[i]), int(stride[i]), int(dilation[i])
        pb, pe = int(pads_begin[i]), int(pads_end[i])
        out = pool_out_size(size, k, s, pb, pe, d, ceil_mode)
        if out < 1:
            raise UsageError(f"a pooling window (kernel {list(kernel)}) does not fit an input of size {list(in_sizes)}")
        need = (out - 1) * s + d * (k - 1) + 1  # padded length the windows reach
        outs.append(out)
        begins.append(pb)
        ends.append(max(0, need - size - pb))
        # per output position o and kernel tap j: padded coordinate o*s + j*d
        axes.append(np.arange(out)[:, None] * s + np.arange(k)[None, :] * d)
    padded = [s + b + e for s, b, e in zip(in_sizes, begins, ends)]
    strides = [int(np.prod(padded[i + 1:])) for i in range(nd)]  # row-major strides of the padded input
    grid = np.zeros([*outs, *[int(k) for k in kernel]], dtype=np.int64)
    for i in range(nd):
        shape = [1] * (2 * nd)
        shape[i] = outs[i]
        shape[nd + i] = int(kernel[i])
        grid = grid + axes[i].reshape(shape) * strides[i]
    idx = grid.reshape([*outs, -1])
    return PoolWindows(tuple(int(s) for s in in_sizes), tuple(outs), tuple(begins), tuple(ends), idx)


def weighted_pool_weights(k: int, p: float) -> np.ndarray:
    """Wu & Gu's probabilistic weighted pooling weights for a window sorted DESCENDING:
    the j-th largest (j = 1..k) gets ``q * p^(j-1)``; with ascending order a_1 <= ... <= a_n
    that is ``q * p^(n-i)``. They sum to ``1 - p^k`` (the rest is the all-dropped case, 0)."""
    q = 1.0 - p
    return np.array([q * p ** j for j in range(k)], dtype=np.float64)

