"""The engines of `dropcli uncertainty` that run in this process.

An *engine* turns inputs into per-example statistics: ``n_outputs(source)`` (K, from the
first input), ``run_all(sources, task, tau, temperature) -> [EngineResult]`` (one per source: the input,
then the ``--ood`` input), ``describe()`` for the log line; it is a context manager. The
engines are :class:`LocalEngine` (MC sampling here), :class:`MomentsEngine` (analytic
moments, no sampling) and ``dropcli.engines.ray.RayEngine`` (MC on a Ray actor pool).

Progress goes through ``progress(label, total)``, a context manager that yields
``advance(k)`` (:func:`dropcli.engines.runner.no_progress` by default): the CLI passes its
progress bar, a library user anything or nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dropcli.engines.keyed import stream_seed
from dropcli.engines.runner import no_progress


@dataclass
class EngineResult:
    per: dict  # per-example statistics (stats.per_example)
    eval: np.ndarray  # [N, K] deterministic outputs
    samples: np.ndarray | None  # [T, N, K] (local engine, or --keep-samples)


def run_source(runner: Any, xs, samples: int, seed: int, batch_size: int, budget: int | None, n: int, what: str,
               progress: Callable = no_progress):
    """run_mc over in-memory inputs, with a rows-done progress report."""
    from dropcli.engines.runner import run_mc

    with progress(what, n) as advance:
        return run_mc(runner, xs, samples, seed, batch_size, budget, progress=advance)


STATS_BYTES = 4 << 20  # float64 [T, rows, K] per block of the statistics: in cache, under glibc's mmap threshold


def per_example_blocks(samples: np.ndarray, task: str, tau, temperature, shape: tuple) -> dict:
    """``stats.per_example`` over blocks of examples, concatenated: the same numbers bit for bit
    (every statistic of example i depends on samples[:, i] alone, see ``stats.per_example``), but
    each block's float64 temporaries (softmax, entropies) stay in cache and are reused instead of
    being mapped in again (10,240 examples x T = 50 x 10 classes make 41 MB temporaries, each one
    page-faulted in anew). Whether the samples are probabilities is decided over all of them first,
    as ``stats.to_probs`` does (an AND over examples)."""
    from dropcli.analysis import stats

    T, N = samples.shape[:2]
    K = int(np.prod(samples.shape[2:])) or 1
    rows = max(2, STATS_BYTES // (8 * T * K))
    if N <= rows or task == "token-classification":  # per position: the probability check is per position
        return stats.per_example(samples, task, tau, temperature=temperature, shape=shape)
    as_probs = None
    if task == "classification":
        as_probs = bool(stats.looks_like_probs(np.asarray(samples[:, :1], dtype=np.float64)))
        for a in range(0, N, rows) if as_probs else ():
            if not stats.looks_like_probs(np.asarray(samples[:, a:a + rows], dtype=np.float64)):
                as_probs = False
                break
    parts = [stats.per_example(samples[:, a:a + rows], task, tau, as_probs=as_probs, temperature=temperature, shape=shape)
             for a in range(0, N, rows)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class LocalEngine:
    """This process: run_mc over the whole input, then the statistics."""

    def __init__(self, runner, T, seed, batch_size, budget, progress: Callable = no_progress):
        self.runner, self.T, self.seed, self.batch_size, self.budget = runner, T, seed, batch_size, budget
        self.progress = progress
        self.chunks = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def n_outputs(self, source) -> int:
        self._res = run_source(self.runner, source.read_all(), self.T, self.seed, self.batch_size, self.budget, source.n,
                               "MC dropout", self.progress)
        self._src = source
        self.out_shape = self._res.out_shape
        return self._res.samples.shape[-1]

    def run_all(self, sources, task, tau, temperature=None) -> list[EngineResult]:
        from dropcli.analysis import stats

        out = []
        for i, source in enumerate(sources):
            if source is self._src:
                res = self._res
            else:
                res = run_source(self.runner, source.read_all(), self.T, stream_seed(self.seed, i), self.batch_size,
                                 self.budget, source.n, "OOD" if i else "MC dropout", self.progress)
            self.chunks += res.chunks
            per = per_example_blocks(res.samples, task, tau, temperature, self.out_shape)
            out.append(EngineResult(per, res.eval, res.samples))
        return out

    def describe(self) -> str:
        return f"{self.chunks} chunk(s)"


def stream_blocks(runner, source, T: int, seed: int, batch_size: int, budget: int, keep_bytes: int, task: str,
                  tau, temperature, shape: tuple, on_block: Callable, progress: Callable = no_progress,
                  what: str = "MC dropout") -> int:
    """MC dropout over ``source`` in blocks of rows, with a memory budget that holds: each
    block's samples are turned into per-example statistics and handed to
    ``on_block(start_row, per, eval)`` (which writes them out and keeps what a summary needs),
    then dropped. ``keep_bytes``: what the caller keeps for the whole input (the summary's
    numbers per row); the rest of ``budget`` goes half to the MC chunks (run_mc) and half to a
    block's samples and their statistics. Results are bitwise those of one run over all rows
    (the noise is keyed by the global row index). Returns the number of MC chunks."""
    from dropcli.analysis import stats
    from dropcli.engines.runner import check_degenerate_examples, degenerate_examples, run_mc
    from dropcli.errors import DropcliError

    free = budget - keep_bytes
    K = int(np.prod(shape))
    # a block's [T, B, K] float32 samples, float64 probabilities and the statistics' temporaries
    per_row = T * K * 72 + K * 64
    floor = max(2 * per_row, 4 << 20)  # the MC chunks and one block of rows
    if free < floor:
        import math

        raise DropcliError(f"--max-memory {budget / 2**20:.3g} MiB is too small for {source.n} examples at T={T}: the summary "
                           f"keeps {keep_bytes / 2**20:.3g} MiB for them and the MC blocks need {floor / 2**20:.3g} MiB more",
                           f"give at least {math.ceil((keep_bytes + floor) / 2**20)}M, or split the input")
    block = max(1, min(source.n, (free // 2) // per_row))
    chunks = 0
    as_probs = None
    with progress(what, source.n) as advance:
        for k, a, b in source.ranges():
            for s in range(a, b, block):
                e = min(b, s + block)
                res = run_mc(runner, source.read(k, s, e), T, seed, batch_size, free // 2, progress=advance,
                             index_offset=s, check_degenerate=False)
                check_degenerate_examples(degenerate_examples(res.samples), T, s)
                flag = stats.looks_like_probs(res.samples) if task != "regression" else None
                if as_probs is None:
                    as_probs = flag
                elif flag != as_probs:
                    raise DropcliError("the model's outputs look like probabilities on some examples and not on others",
                                       "pass --task regression, or make the model end in logits or in a softmax")
                per = stats.per_example(res.samples, task, tau, as_probs=as_probs, temperature=temperature, shape=shape)
                chunks += res.chunks
                on_block(s, per, res.eval)
                del res, per
    return chunks


class MomentsEngine:
    """--method moments: analytic per-example moments (dropcli.engines.moments), no sampling."""

    def __init__(self, runner, batch_size, progress: Callable = no_progress):
        self.runner, self.batch_size = runner, batch_size
        self.progress = progress
        self.steps: list[dict] = []
        self.probs = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _moments(self, source):
        from dropcli.engines.moments import run_moments

        xs = source.read_all()
        with self.progress("moments", source.n) as advance:
            mean, var, probs, steps = run_moments(self.runner.model, xs, self.batch_size, self.runner.device_name)
            advance(source.n)
        self.steps = self.steps or steps
        self.probs = probs
        return mean, var, probs, self.runner.run_eval(xs)

    def n_outputs(self, source) -> int:
        self._first = (source, self._moments(source))
        return self._first[1][0].shape[-1]

    def run_all(self, sources, task, tau, temperature=None) -> list[EngineResult]:
        from dropcli.engines.moments import per_example

        out = []
        for source in sources:
            mean, var, probs, ev = self._first[1] if source is self._first[0] else self._moments(source)
            out.append(EngineResult(per_example(mean, var, probs, task, tau, temperature), ev, None))
        return out

    def describe(self) -> str:
        return "no sampling"

    def report(self, task: str) -> dict:
        """Which layers are approximated, and what the output statistics are."""
        from dropcli.engines.moments import METHOD_NOTE, NOT_AVAILABLE

        approx = [s for s in self.steps if not s["exact"]]
        rec = {"note": METHOD_NOTE, "layers": self.steps, "approximated": [f"{s['node']}: {s['op']}" for s in approx]}
        if task == "classification":
            rec["output"] = ("probabilities from the model's softmax (its moments above)" if self.probs else
                             "class probabilities from Gaussian logits: mean-field softmax(m / sqrt(1 + pi v/8)), "
                             "variance by the delta method (approximate)")
            rec["not_available"] = {k: "needs the distribution of the probabilities, not two moments; "
                                       "var/std of the probabilities is the epistemic measure reported" for k in NOT_AVAILABLE}
        else:
            rec["output"] = "mean and variance of the outputs (+ 1/tau with --tau)"
        return rec
