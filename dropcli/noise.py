"""Keyed noise: each example's random stream depends only on (seed, RNG call, example index).

The MC engines evaluate B examples x T samples as B*T rows, i-major (row = i*T + t).
For every random draw a site makes, :class:`KeyedNoise` fills example i's rows from a
generator seeded by ``hash(seed, call, global_index[i], block)``, where ``block`` numbers a
fixed-size group of samples. So an example's samples do not depend on the batch size, on
which other examples share its batch, on memory chunking (chunks split at block
boundaries), on the number of workers, or on the backend: torch and ONNX draw the same
noise for the same seed.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

import numpy as np
import torch

SAMPLE_BLOCK = 32
LANES = 1 << 16  # samples drawn from one generator; chunking over T happens at multiples of this


def _key(*parts: int) -> int:
    h = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


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

    def reset(self) -> None:
        self.call = 0

    def keep_mask_like(self, t: torch.Tensor, q: float) -> torch.Tensor:
        """Bernoulli(q) keep-mask from 16-bit lanes of 64-bit draws (q quantised to 1/65536)."""
        k = int(round(q * LANES))
        if k >= LANES or k <= 0:
            self._next_call()
            return (torch.ones_like(t, dtype=torch.bool) if k >= LANES else torch.zeros_like(t, dtype=torch.bool))
        lanes = self._fill(t, "lanes")
        return lanes < (k - LANES // 2)

    def _next_call(self) -> int:
        call = self.call
        self.call += 1
        return call

    def _fill(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        rows = t.shape[0]
        B = len(self.indices)
        if rows != B * self.T:
            raise RuntimeError(
                f"a dropout site drew noise for {rows} rows, expected {B}x{self.T}: the model mixes examples across the batch"
            )
        call = self._next_call()
        rest = tuple(t.shape[1:])
        dtype = t.dtype if t.dtype.is_floating_point else torch.float32
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if kind == "lanes":
            dtype = gen_dtype = torch.int16
        buf = torch.empty((B, self.T) + rest, dtype=gen_dtype)
        g = self._gen
        for i, idx in enumerate(self.indices):
            for b0 in range(self.t0, self.t1, SAMPLE_BLOCK):
                b1 = min(b0 + SAMPLE_BLOCK, self.t1)
                g.manual_seed(_key(self.seed, call, idx, b0 // SAMPLE_BLOCK))
                # always draw a full block so a shorter final chunk repeats the same prefix
                n = b1 - b0
                out = buf[i, b0 - self.t0 : b1 - self.t0]
                if kind == "lanes":
                    m = out.numel()
                    draws = torch.randint(-(2**63), 2**63 - 1, ((m + 3) // 4,), dtype=torch.int64, generator=g)
                    out.view(-1).copy_(draws.view(torch.int16)[:m])
                elif kind == "uniform":
                    torch.rand((n,) + rest, generator=g, dtype=gen_dtype, out=out)
                else:
                    torch.randn((n,) + rest, generator=g, dtype=gen_dtype, out=out)
        res = buf.reshape((B * self.T,) + rest)
        if res.dtype != dtype and kind != "lanes":
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
