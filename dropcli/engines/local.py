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

from dropcli.engines.noise import stream_seed
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
            per = stats.per_example(res.samples, task, tau, temperature=temperature, shape=self.out_shape)
            out.append(EngineResult(per, res.eval, res.samples))
        return out

    def describe(self) -> str:
        return f"{self.chunks} chunk(s)"


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
