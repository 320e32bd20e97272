"""Keyed noise: each example's random stream depends only on (seed, RNG call, example index).

The MC engines evaluate B examples x T samples as B*T rows, i-major (row = i*T + t).
For every random draw a site makes, :class:`KeyedNoise` fills example i's rows from a
generator seeded by ``hash(seed, call, global_index[i], block)``, where ``block`` numbers a
fixed-size group of samples. So an example's samples do not depend on the batch size, on
which other examples share its batch, on memory chunking (chunks split at block
boundaries), on the number of workers, or on the backend: torch and ONNX draw the same
noise for the same seed.

Each input of a run draws its own stream: :func:`stream_seed` turns the run's seed into the seed
of input ``stream`` (0: the input itself, unchanged; 1: the ``--ood`` input), so OOD row i does
not reuse the masks of input row i, and both stay reproducible from ``--seed``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from dropcli.engines.keyed import SAMPLE_BLOCK, keep_masks, key as _key




class KeyedNoise:
    """A noise source for :func:`dropcli.variants.base.noise_source`."""

    def __init__(self, seed: int, indices: Sequence[int], t0: int, t1: int, device: torch.device | str = "cpu"):
        if t0 % SAMPLE_BLOCK:
            raise ValueError("sample chunks must start at a multiple of SAMPLE_BLOCK")
        self.seed = int(seed)
        self.indices = [int(i) for i in indices]
        self.t0, self.t1 = int(t0), int(t1)
        self.T = self.t1 - self.t0
        self.call = 0
        self.device = torch.device(device)
        self._gen = torch.Generator(device="cpu")
        # alloc(call, shape, dtype) -> a CPU tensor the float mask of that call may be written
        # into (the torch engine's reused per-chunk buffers); None: a new tensor every time
        self.alloc: Callable[[int, tuple[int, ...], torch.dtype], torch.Tensor] | None = None

    def reset(self) -> None:
        self.call = 0

    def keep_mask_like(self, t: torch.Tensor, q: float) -> torch.Tensor:
        """A bool Bernoulli(q) keep-mask shaped like ``t``, from as few random bits as q needs:
        1 bit at q = 1/2, 8-bit lanes when q is a multiple of 1/256, else 16-bit lanes
        (q quantised to 1/65536). The generators only fill raw 64-bit words; the unpacking is
        one vectorised pass over the whole chunk."""
        call = self._next_call()
        if q >= 1.0 or q <= 0.0:
            return torch.full(t.shape, q >= 1.0, dtype=torch.bool, device=t.device)
        self._check_rows(t.shape[0])
        mask = keep_masks(self.seed, self.indices, self.t0, self.t1, [(call, tuple(t.shape[1:]), q)])[0]
        if mask is None:
            self.call = call  # not word-aligned: fall back to uniform draws under the same call number
            return self._fill(t, "uniform") < q
        return torch.from_numpy(mask).to(t.device)

    def mask_like(self, t: torch.Tensor, q: float, scale: float) -> torch.Tensor:
        """A float Bernoulli(q) mask with values {0, scale} (a new tensor, which the caller may
        multiply in place); float32 masks come from :func:`dropcli.engines.keyed.keep_masks`
        (at q = 1/2 each random byte becomes 8 mask values through one table lookup)."""
        if t.dtype == torch.float32 and 0.0 < q < 1.0:
            call = self._next_call()
            self._check_rows(t.shape[0])
            dst = self.alloc(call, tuple(t.shape), t.dtype) if self.alloc is not None and t.device.type == "cpu" else None
            into = dst.numpy() if dst is not None else None
            mask = keep_masks(self.seed, self.indices, self.t0, self.t1, [(call, tuple(t.shape[1:]), q)], [scale], [into])[0]
            if mask is not None:
                if into is not None and mask is into:  # written into the caller's buffer
                    return dst
                return torch.from_numpy(mask).to(t.device)
            self.call = call
        keep = self.keep_mask_like(t, q)
        return keep.to(t.dtype).mul_(scale)

    def _check_rows(self, rows: int) -> None:
        B = len(self.indices)
        if rows != B * self.T:
            raise RuntimeError(
                f"a dropout site drew noise for {rows} rows, expected {B}x{self.T}: the model mixes examples across the batch"
            )

    def _next_call(self) -> int:
        call = self.call
        self.call += 1
        return call

    def _fill(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        self._check_rows(t.shape[0])
        B = len(self.indices)
        call = self._next_call()
        rest = tuple(t.shape[1:])
        dtype = t.dtype if t.dtype.is_floating_point else torch.float32
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        buf = torch.empty((B, self.T) + rest, dtype=gen_dtype)
        g = self._gen
        for i, idx in enumerate(self.indices):
            for b0 in range(self.t0, self.t1, SAMPLE_BLOCK):
                b1 = min(b0 + SAMPLE_BLOCK, self.t1)
                g.manual_seed(_key(self.seed, call, idx, b0 // SAMPLE_BLOCK))
                # always draw a full block so a shorter final chunk repeats the same prefix
                n = b1 - b0
                out = buf[i, b0 - self.t0 : b1 - self.t0]
                if kind == "uniform":
                    torch.rand((n,) + rest, generator=g, dtype=gen_dtype, out=out)
                else:
                    torch.randn((n,) + rest, generator=g, dtype=gen_dtype, out=out)
        res = buf.reshape((B * self.T,) + rest)
        if res.dtype != dtype:
            res = res.to(dtype)
        return res.to(t.device) if t.device != res.device else res

    def uniform_like(self, t: torch.Tensor) -> torch.Tensor:
        return self._fill(t, "uniform")

    def normal_like(self, t: torch.Tensor) -> torch.Tensor:
        return self._fill(t, "normal")

    def uniform_np(self, shape_rest: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """For the ONNX engine: the same stream as uniform_like for a [B*T, *rest] tensor."""
        return self._fill(torch.empty((len(self.indices) * self.T,) + tuple(shape_rest)), "uniform").numpy().astype(dtype, copy=False)

    def normal_np(self, shape_rest: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return self._fill(torch.empty((len(self.indices) * self.T,) + tuple(shape_rest)), "normal").numpy().astype(dtype, copy=False)
