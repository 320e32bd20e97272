"""Keyed random words in numpy, bit for bit those of :class:`dropcli.engines.noise.KeyedNoise`
(no torch: the ONNX engine draws its keep-masks here, so an ONNX run never imports torch).

Every (seed, call, example index, sample block) keys one generator: torch's CPU generator,
MT19937 seeded with the low 32 bits of the key (``torch.Generator.manual_seed``), whose 64-bit
draws ``torch.randint(-2**63, 2**63 - 1, dtype=torch.int64)`` become the mask bits. Here the
same MT19937 streams come from numpy's MT19937 (seeded the same way, run in C), one generator
after the other, their outputs turned into words for many generators at once; that is faster
than seeding torch generators one by one, and than running the seeding recurrence, the state
twist and the tempering as numpy operations across generators (kept for a numpy without the
legacy seeding). ``KeyedNoise`` (the torch engine's noise source) draws its masks here too.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from typing import Sequence

import numpy as np

SAMPLE_BLOCK = 32  # samples drawn from one generator; chunking over T happens at multiples of this
LANES = 1 << 16
MIN_ROWS = 32  # both engines pad smaller batches to this many rows (BLAS takes other paths below it)

_N, _M = 624, 397
_MATRIX_A = np.uint32(0x9908B0DF)
_UPPER = np.uint32(0x80000000)
_LOWER = np.uint32(0x7FFFFFFF)
_TOP = np.uint64(1 << 63)
_ALL = np.uint64((1 << 64) - 1)


def key(*parts: int) -> int:
    """The 63-bit key of a generator: a hash of (seed, call, example index, block)."""
    h = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


_PAIR = struct.Struct("<2q")


def keys(seed: int, call: int, indices: Sequence[int], block: int) -> list[int]:
    """``[key(seed, call, i, block) for i in indices]``: the hash of (seed, call) is computed once
    and copied for each example (hashing is incremental, so the digests are the same)."""
    base = hashlib.blake2b(_PAIR.pack(int(seed), int(call)), digest_size=8)
    pack, from_bytes, out = _PAIR.pack, int.from_bytes, []
    for i in indices:
        h = base.copy()
        h.update(pack(int(i), block))
        out.append(from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return out


def _seeded(seeds: np.ndarray) -> np.ndarray:
    """MT19937 states [624, G] (one column per generator), init_genrand(seed & 0xffffffff)."""
    s = np.empty((_N, len(seeds)), dtype=np.uint32)
    s[0] = seeds.astype(np.uint64) & np.uint64(0xFFFFFFFF)
    tmp = np.empty(len(seeds), dtype=np.uint32)
    mul = np.uint32(1812433253)
    for j in range(1, _N):
        prev = s[j - 1]
        np.right_shift(prev, 30, out=tmp)
        np.bitwise_xor(prev, tmp, out=tmp)
        np.multiply(tmp, mul, out=tmp)
        np.add(tmp, np.uint32(j), out=s[j])
    return s


def _mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    y = (a & _UPPER) | (b & _LOWER)
    y >>= np.uint32(1)
    y ^= (b & np.uint32(1)) * _MATRIX_A
    return y


def _twist(s: np.ndarray) -> None:
    """The MT19937 state update, in place on [624, G] (vectorised in slices whose inputs are ready)."""
    k = _N - _M  # 227
    s[:k] = s[_M:] ^ _mix(s[:k], s[1:k + 1])
    for lo in range(k, _N - 1, k):  # [227, 454), [454, 623): each reads rows the slice before wrote
        hi = min(lo + k, _N - 1)
        s[lo:hi] = s[lo - k:hi - k] ^ _mix(s[lo:hi], s[lo + 1:hi + 1])
    s[_N - 1] = s[_M - 1] ^ _mix(s[_N - 1], s[0])


def _temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint32(11))
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


VECTOR_MAX = _N // 2  # up to this many words per generator (one state twist), seeding dominates
_LOOP = hasattr(np.random.MT19937, "_legacy_seeding")  # numpy's MT19937 seeds as torch's generator does
_STAGE_WORDS = 1 << 18  # 32-bit outputs staged at once (2 MiB) by the numpy path
_LONG = 4096  # from this many 32-bit outputs a generator, the numpy path converts each generator's own


def mt_words(seeds: np.ndarray, count: int, how: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """[G, count] uint64: the first ``count`` draws of ``torch.randint(-2**63, 2**63 - 1)`` (int64,
    seen as unsigned) of G CPU generators seeded with ``seeds`` (written into ``out`` if given: a
    [G, count] uint64 array whose rows are contiguous).

    ``how``: "numpy" runs numpy's MT19937 (seeded the same way, in C) one generator after the other
    and turns all their outputs into words at once: the fastest, for short and long streams alike
    (measured: 512 generators of 256 words take a third of the time of "vector"). "vector" runs all
    generators at once in numpy operations across generators (one Python step per state word);
    "torch" runs torch's own generators one after the other. "auto": numpy where this numpy has
    its MT19937's legacy seeding, else vector up to VECTOR_MAX words, else torch if this process
    has already imported it, else vector. All give the same words."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    if how == "auto":
        how = "numpy" if _LOOP else ("vector" if count <= VECTOR_MAX or "torch" not in sys.modules else "torch")
    if out is None:
        out = np.empty((len(seeds), count), dtype=np.uint64)
    if how == "torch":
        _torch_words(seeds, count, out)
    elif how == "numpy" and _LOOP:
        _numpy_words(seeds, count, out)
    else:
        out[...] = _vector_words(seeds, count)
    return out


def _torch_words(seeds: np.ndarray, count: int, out: np.ndarray) -> None:
    import torch

    g = torch.Generator(device="cpu")
    for i, s in enumerate(seeds.tolist()):
        g.manual_seed(int(s))
        row = torch.from_numpy(out[i].view(np.int64))
        torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=g, out=row)


def _numpy_words(seeds: np.ndarray, count: int, out: np.ndarray) -> None:
    """numpy's MT19937 with init_genrand seeding (what RandomState(seed) does) gives the same 32-bit
    outputs. Each generator's 2 * count outputs are staged as they come (one C call to seed, one
    to draw, one row copy per generator); then, for a group of them at once, pairs become
    (first << 32) | second and the randint transform is applied. Long streams skip the staging
    copy (each generator's outputs are converted as they come)."""
    if count == 0 or len(seeds) == 0:
        return
    bg = np.random.MT19937()
    reseed, draw = bg._legacy_seeding, bg.random_raw
    n2 = 2 * count
    low = (seeds & np.uint64(0xFFFFFFFF)).tolist()
    if n2 >= _LONG:  # long streams: the per-generator calls cost little beside the words; no staging copy
        for k, s in enumerate(low):
            reseed(s)
            raw = draw(n2)
            row = out[k]
            o32 = row.view(np.uint32)
            o32[0::2] = raw[1::2]
            o32[1::2] = raw[0::2]
            _randint_transform(row)
        return
    per = max(1, _STAGE_WORDS // n2)  # generators per staging pass (bounds the temporary)
    for g0 in range(0, len(low), per):
        part = low[g0:g0 + per]
        stage = np.empty((len(part), n2), dtype=np.uint64)  # 32-bit outputs, one per uint64
        for k, s in enumerate(part):
            reseed(s)
            stage[k] = draw(n2)
        rows = out[g0:g0 + len(part)]
        o32 = rows.view(np.uint32)  # little-endian: the second output is the low word
        o32[:, 0::2] = stage[:, 1::2]
        o32[:, 1::2] = stage[:, 0::2]
        _randint_transform(rows)  # while the rows are in cache


def _randint_transform(r: np.ndarray) -> None:
    """In place, 64-bit outputs -> torch.randint(-2**63, 2**63 - 1) seen as uint64: r % (2**64 - 1),
    then + (-2**63), which flips the top bit."""
    if r.size and r.max() == _ALL:  # one word in 2**64: look before paying for a masked write
        r[r == _ALL] = 0
    r ^= _TOP


def _vector_words(seeds: np.ndarray, count: int) -> np.ndarray:
    s = _seeded(seeds)
    need = 2 * count  # two 32-bit outputs per 64-bit draw: (first << 32) | second
    out32 = np.empty((len(seeds), need), dtype=np.uint32)
    done = 0
    while done < need:
        _twist(s)
        take = min(_N, need - done)  # even: need and _N are
        y = _temper(s[:take])
        # little-endian uint64 = low word first: the second output goes first
        out32[:, done:done + take:2] = y[1::2].T
        out32[:, done + 1:done + take:2] = y[0::2].T
        done += take
    r = out32.view(np.uint64)
    _randint_transform(r)
    return r


def raw_words_many(seed: int, indices: Sequence[int], t0: int, t1: int,
                   requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray | None]:
    """For each request (call, rest, per_word): the random 64-bit words (int64), ``per_word``
    masks each, of a [len(indices) * (t1 - t0), rest] draw laid out example-major (row = i*T + t),
    or None when a block's mask count is not a multiple of ``per_word``. Each generator writes its
    words straight into its example's row (:func:`mt_words`, numpy's path); without numpy's
    legacy seeding, all the generators of all the requests run in one vectorised pass."""
    blocks = [(b0, min(b0 + SAMPLE_BLOCK, t1) - b0) for b0 in range(t0, t1, SAMPLE_BLOCK)]
    B = len(indices)
    seeds: list[int] = []
    plans: list[list[tuple[int, int]] | None] = []
    most = 0
    for call, rest, per_word in requests:
        if any((n * rest) % per_word for _, n in blocks):
            plans.append(None)
            continue
        plan = []
        for b0, n in blocks:
            plan.append((len(seeds), n * rest // per_word))
            seeds.extend(keys(seed, call, indices, b0 // SAMPLE_BLOCK))
            most = max(most, plan[-1][1])
        plans.append(plan)
    out: list[np.ndarray | None] = []
    if most > VECTOR_MAX or _LOOP:  # one generator after the other, each writing straight into its rows
        for plan in plans:
            if plan is None:
                out.append(None)
                continue
            res = np.empty((B, sum(c for _, c in plan)), dtype=np.uint64)
            pos = 0
            for off, cnt in plan:
                mt_words(np.array(seeds[off:off + B], dtype=np.uint64), cnt, out=res[:, pos:pos + cnt])
                pos += cnt
            out.append(res.view(np.int64).reshape(-1))
        return out
    words = mt_words(np.array(seeds, dtype=np.uint64), most) if seeds else None
    for plan in plans:
        if plan is None:
            out.append(None)
            continue
        assert words is not None
        if len(plan) == 1 and plan[0][1] == most:
            res = words[plan[0][0]:plan[0][0] + B]
        else:
            res = np.empty((B, sum(c for _, c in plan)), dtype=np.uint64)
            pos = 0
            for off, cnt in plan:
                res[:, pos:pos + cnt] = words[off:off + B, :cnt]
                pos += cnt
        out.append(np.ascontiguousarray(res).view(np.int64).reshape(-1))
    return out


def raw_words(seed: int, call: int, indices: Sequence[int], t0: int, t1: int, rest: int, per_word: int) -> np.ndarray | None:
    """One request of :func:`raw_words_many`."""
    return raw_words_many(seed, indices, t0, t1, [(call, rest, per_word)])[0]


def keep_masks(seed: int, indices: Sequence[int], t0: int, t1: int,
               requests: Sequence[tuple[int, tuple[int, ...], float]],
               scales: Sequence[float | None] | None = None,
               outs: Sequence[np.ndarray | None] | None = None) -> list[np.ndarray | None]:
    """For each request (call, rest shape, q): the bool keep-mask [len(indices) * (t1 - t0), *rest]
    that ``KeyedNoise.keep_mask_like`` draws for that call (same bits: 1 bit per mask at q = 1/2,
    8-bit lanes when q is a multiple of 1/256, else 16-bit lanes), or None where that one falls
    back to uniform draws (a block not word-aligned). All requests share one generator pass.
    ``scales[r]`` (not None): that mask as float32 {0, scale} instead (at q = 1/2 each random
    byte becomes 8 values through one table lookup). ``outs[r]`` (not None): a contiguous float32
    array of that mask's shape that the q = 1/2 float mask is written into (and returned): a caller
    that reuses one array per chunk saves the kernel mapping and zeroing fresh pages every chunk."""
    rows = len(indices) * (t1 - t0)
    scales = list(scales) if scales is not None else [None] * len(requests)
    out: list[np.ndarray | None] = [None] * len(requests)
    asks: list[tuple[int, int, int]] = []
    how: list[tuple[int, tuple[int, ...], str, int]] = []  # (request, shape, kind, threshold)
    for r, (call, rest, q) in enumerate(requests):
        shape = (rows,) + tuple(int(d) for d in rest)
        if q >= 1.0 or q <= 0.0:
            out[r] = np.full(shape, q >= 1.0, dtype=bool)
            if scales[r] is not None:
                out[r] = np.where(out[r], np.float32(scales[r]), np.float32(0))
            continue
        n = int(np.prod(shape[1:], dtype=np.int64))
        per_word, kind, thr = 4, "16", max(1, min(LANES - 1, int(round(q * LANES)))) - LANES // 2
        if q == 0.5 and raw_words_fit(t0, t1, n, 64):
            per_word, kind, thr = 64, "bits", 0
        elif q * 256 == int(q * 256) and raw_words_fit(t0, t1, n, 8):
            per_word, kind, thr = 8, "8", int(q * 256)
        if not raw_words_fit(t0, t1, n, per_word):
            continue
        asks.append((call, n, per_word))
        how.append((r, shape, kind, thr))
    for (r, shape, kind, thr), raw in zip(how, raw_words_many(seed, indices, t0, t1, asks)):
        assert raw is not None
        scale = scales[r]
        if kind == "bits" and scale is not None:
            dst = outs[r] if outs is not None else None
            if dst is not None and dst.shape == shape and dst.dtype == np.float32 and dst.flags.c_contiguous:
                # mode="clip": a uint8 index is always in the 256-row table; the default "raise"
                # would write to a temporary first and copy it into ``out``
                np.take(_bit_table(scale), raw.view(np.uint8), axis=0, out=dst.reshape(-1, 8), mode="clip")
                out[r] = dst
            else:
                out[r] = np.take(_bit_table(scale), raw.view(np.uint8), axis=0).reshape(shape)
            continue
        if kind == "bits":
            keep = np.unpackbits(raw.view(np.uint8), bitorder="little").view(bool)
        elif kind == "8":
            keep = raw.view(np.uint8) < thr
        else:
            keep = raw.view(np.int16) < thr
        keep = keep.reshape(shape)
        out[r] = keep if scale is None else np.where(keep, np.float32(scale), np.float32(0))
    return out


_TABLES: dict[float, np.ndarray] = {}


def _bit_table(scale: float) -> np.ndarray:
    """[256, 8] float32: row b holds the 8 bits of b (least significant first) times ``scale``."""
    if scale not in _TABLES:
        bits = (np.arange(256)[:, None] >> np.arange(8)) & 1
        _TABLES[scale] = (bits * np.float32(scale)).astype(np.float32)
    return _TABLES[scale]


def raw_words_fit(t0: int, t1: int, rest: int, per_word: int) -> bool:
    """Whether every sample block's mask count is a multiple of ``per_word``."""
    return not any((min(b0 + SAMPLE_BLOCK, t1) - b0) * rest % per_word for b0 in range(t0, t1, SAMPLE_BLOCK))


def padded_indices(indices: Sequence[int]) -> list[int]:
    """The example indices of a chunk as the engines key it: a chunk under MIN_ROWS examples is
    padded with rows keyed -1, -2, ... (their samples are dropped)."""
    idx = [int(i) for i in indices]
    return idx + [-1 - k for k in range(MIN_ROWS - len(idx))]


class DrawAhead:
    """Draws the next chunk's noise in a background thread while this chunk runs.

    ``submit(key, fn, *args)`` starts ``fn(*args)`` (one job at a time, replacing any that was
    not taken); ``take(key)`` returns its result if the job was for ``key``, else None (the
    caller then draws itself). The noise is a pure function of the key, so where it was drawn
    changes no bit of it. numpy and onnxruntime/torch release the GIL while they compute, so
    the draw overlaps the chunk's matrix products (it shortens the serial part of a chunk: on
    2 threads the products keep both cores busy, the draw does not). An exception in the
    drawing thread is raised by ``take``."""

    def __init__(self) -> None:
        self._pool = None
        self._pending: tuple[object, object] | None = None  # (key, future)

    def submit(self, key: object, fn, *args) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dropcli-noise")
        self.drop()
        self._pending = (key, self._pool.submit(fn, *args))

    def take(self, key: object):
        if self._pending is None or self._pending[0] != key:
            self.drop()
            return None
        fut = self._pending[1]
        self._pending = None
        return fut.result()  # type: ignore[attr-defined]

    def drop(self) -> None:
        """Forget a pending draw (it finishes in the background; its result is discarded)."""
        if self._pending is not None:
            self._pending[1].cancel()  # type: ignore[attr-defined]
            self._pending = None

    def __getstate__(self):  # pragma: no cover - threads don't pickle (Ray ships runners)
        return {"_pool": None, "_pending": None}


STREAM_SALT = 0x00D5_7EA3  # keys the streams of the inputs after the first (see stream_seed)


def stream_seed(seed: int, stream: int) -> int:
    """The noise seed of input ``stream`` of a run seeded ``seed``: the seed itself for stream 0
    (results of the main input do not change), a hash of (seed, stream) for the others."""
    return int(seed) if stream == 0 else key(int(seed), STREAM_SALT, int(stream))
