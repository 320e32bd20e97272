"""`dropcli uncertainty --engine ray`: the MC engine on a Ray Data actor pool.

The dataset is a list of *work units*, each a row range of one shard (or of the in-memory
input): ``{"src", "shard", "start", "stop"}`` with global row numbers (``src`` 0 is the
input, 1 the ``--ood`` input: both run on the same pool). ``map_batches`` sends the
units to a pool of :class:`MCWorker` actors. Each actor loads the model ONCE (its bytes
come from the object store, put there once by the driver), builds the same runner the
local engine uses (:class:`dropcli.mc.TorchRunner` / ``dropcli.mc_onnx.OnnxRunner``), reads
its units itself and runs :func:`dropcli.mc.run_mc` on them with ``index_offset`` = the
unit's first GLOBAL row, so every example draws the noise keyed by (seed, site call,
global index, sample block), exactly as in one process. The actor then computes the
per-example statistics with :func:`dropcli.stats.per_example` (the function the local
engine calls) and returns them with the global indices. The driver gathers the
per-example columns in input order, checks that every index appears exactly once, and the
CLI computes the summary over the whole dataset with the local engine's code.

Faults: Ray restarts a dead actor (``max_restarts=-1``) and re-runs its unit
(``max_task_retries=-1``); a unit's result is only returned when it is complete, so every
example is reported exactly once.

:class:`RayEngine` is the engine interface of :mod:`dropcli.engines.local` on top of
:func:`run`. ``UNIT_HOOKS`` is a registry of callables ``hook(src, start, stop)`` that every
actor calls before it runs a unit (they travel to the actors with the pool's constructor
arguments, so they must pickle): instrumentation, and the fault injection of the tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dropcli.errors import DropcliError, UsageError

INSTALL = 'pip install "dropcli[ray]"'
MAX_UNIT_ROWS = 65536
UNIT_HOOKS: list[Callable[[int, int, int], None]] = []  # hook(src, start, stop), called in the actor before each unit


def require_ray():
    """Import Ray Data, or a one-line error with the install command."""
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        what = getattr(e, "name", None) or "ray"
        raise DropcliError(f"--engine ray needs Ray Data, which is not installed (no module {what!r})",
                           f"install it with: {INSTALL}") from None
    return ray


# ------------------------------------------------------------------------------ the session


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise DropcliError(f"--address {address} is not 'auto' or HOST:PORT", "e.g. --address auto or --address 10.0.0.5:6379")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise DropcliError(f"cannot reach a Ray cluster at --address {address}: {reason}",
                           "start one with `ray start --head`, check the address, or leave out --address to run on this machine") from None


@contextlib.contextmanager
def session(address: str | None, workers: int, debug: bool = False) -> Iterator[dict]:
    """Ray joined (``--address``) or started locally; a local instance is shut down at the end.

    In a process where Ray is already initialised (a library user, the tests), that
    instance is used and left running."""
    ray = require_ray()
    if address:
        _check_reachable(address)
    started = False
    level = logging.INFO if debug else logging.ERROR
    if not debug:
        # the driver's core worker logs Ray Data's own actor set-up at error level on stderr
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if not ray.is_initialized():
        kw: dict[str, Any] = dict(logging_level=level, log_to_driver=debug, include_dashboard=False)
        try:
            with _quiet_fd2(not debug):
                if address:
                    ray.init(address=address, **kw)
                else:
                    # this machine's cores, no more: the actors share them out (plan_workers)
                    ray.init(num_cpus=os.cpu_count() or 1, **kw)
                started = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            where = f"--address {address}" if address else "this machine"
            raise DropcliError(f"cannot start or reach Ray at {where}: {text}",
                               "start a cluster with `ray start --head`, check the address, or leave out --address") from None
    _quiet_ray_data(debug)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        yield {"cluster_cpus": cpus, "started": started}
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _quiet_fd2(on: bool) -> Iterator[None]:
    """Ray's C++ core announces its log level on file descriptor 2 while it starts; keep
    that (and the stderr of the processes it spawns, which log to files) off dropcli's stderr."""
    if not on:
        yield
        return
    try:
        import sys

        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_ray_data(debug: bool) -> None:
    """Ray Data's own progress bars and notices stay off stderr: dropcli draws one bar."""
    if debug:
        return
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # "Progress bars disabled" would be logged once
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # worker errors come back as dropcli's one line


def plan_workers(workers: int, cluster_cpus: int, local: bool) -> tuple[int, int]:
    """(actors, CPUs per actor). On a local instance the cores are shared out; on a cluster one CPU each."""
    if local:
        n = max(1, min(workers, cluster_cpus))
        return n, max(1, cluster_cpus // n)
    return max(1, workers), 1


def unit_rows(n: int, workers: int, batch_size: int) -> int:
    """Rows per work unit: about 4 units per actor, at least a batch, at most MAX_UNIT_ROWS."""
    want = -(-n // (4 * workers))
    return int(min(MAX_UNIT_ROWS, max(batch_size, want)))


# ------------------------------------------------------------------------------ the actor


class MCWorker:
    """One actor of the pool: loads the model once, then runs units of rows."""

    def __init__(self, model: dict, sources: list[dict], mc: dict, threads: int, hooks: list | None = None):
        import ray
        import torch

        torch.set_num_threads(max(1, int(threads)))
        from dropcli.engines.factory import build_runner
        from dropcli.io.shards import Source

        blob = ray.get(model["ref"][0])
        suffix = Path(model["name"]).suffix
        with tempfile.TemporaryDirectory(prefix="dropcli-ray-") as d:
            path = os.path.join(d, "model" + suffix)
            Path(path).write_bytes(blob)
            self.runner = build_runner(path, model["load_opts"], mc["device"], model["inject"])
        specs = self.runner.input_specs()
        self.sources = []
        for src in sources:
            arrays = ray.get(src["arrays_ref"][0]) if src.get("arrays_ref") else None
            self.sources.append(Source(src["name"], specs, shards=src["shards"], arrays=arrays))
        self.mc = mc
        self.hooks = list(hooks or [])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            parts = [self._unit(int(i), int(k), int(a), int(b))
                     for i, k, a, b in zip(batch["src"], batch["shard"], batch["start"], batch["stop"])]
        except DropcliError as e:
            # Ray Data keeps only the text of a worker's exception; send the error back as data
            err = {"error": type(e).__name__, "message": e.message, "hint": e.hint}
            return {"index": np.array([-1]), "error": np.array([json.dumps(err)])}
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def _unit(self, src: int, shard: int, start: int, stop: int) -> dict[str, np.ndarray]:
        for hook in self.hooks:
            hook(src, start, stop)
        xs = self.sources[src].read(shard, start, stop)
        from dropcli.engines.keyed import stream_seed

        mc = self.mc if src == 0 else dict(self.mc, seed=stream_seed(self.mc["seed"], src))  # the OOD input's own stream
        cols = unit_columns(self.runner, xs, start, mc)
        cols["src"] = np.full(len(cols["index"]), src, dtype=np.int16)
        return cols


def unit_columns(runner: Any, xs: list[np.ndarray], offset: int, mc: dict) -> dict[str, np.ndarray]:
    """Per-example columns of one unit: global index, statistics, eval outputs, checks."""
    from dropcli.analysis import stats
    from dropcli.engines.runner import degenerate_examples, run_mc

    res = run_mc(runner, xs, mc["T"], mc["seed"], mc["batch_size"], mc["budget"], index_offset=offset,
                 check_degenerate=False)
    n = res.samples.shape[1]
    flag = None
    if mc["task"] == "classification":
        flag = stats.looks_like_probs(np.asarray(res.samples, dtype=np.float64)) if mc["as_probs"] is None else mc["as_probs"]
    per = stats.per_example(res.samples, mc["task"], mc["tau"], flag, mc.get("temperature"))
    cols: dict[str, np.ndarray] = {"index": np.arange(offset, offset + n, dtype=np.int64), "eval": res.eval,
                                   "degenerate": degenerate_examples(res.samples),
                                   "as_probs": np.full(n, bool(flag))}
    for k, v in per.items():
        cols["per_" + k] = v
    if mc["keep_samples"]:
        cols["samples"] = np.ascontiguousarray(np.swapaxes(res.samples, 0, 1))  # [n, T, K]
    return cols


# ------------------------------------------------------------------------------ the driver


def run(sources: list[Any], model: dict, mc: dict, workers: int, threads: int, progress: Callable[[int], None],
        units: list[dict] | None = None) -> list[dict[str, np.ndarray]]:
    """Run the units (default: all rows of every source) on ONE actor pool; per source, the
    columns in input order."""
    import ray
    import ray.data

    srcs: list[dict[str, Any]] = []
    refs = []
    for source in sources:
        src: dict[str, Any] = {"name": source.name, "shards": source.shards}
        if source.arrays is not None:
            ref = ray.put(source.arrays)
            refs.append(ref)
            src["arrays_ref"] = [ref]  # in a list: Ray does not resolve it, the actor fetches it once
        srcs.append(src)
    if units is None:
        units = [dict(u, src=i) for i, source in enumerate(sources)
                 for u in source.units(unit_rows(source.n, workers, mc["batch_size"]))]
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order, getattr(ctx, "print_on_execution_start", None))
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    if saved[2] is not None:
        ctx.print_on_execution_start = False
    remote: dict[str, Any] = {"max_restarts": -1, "max_task_retries": -1}
    if str(mc["device"]).startswith("cuda"):
        remote["num_gpus"] = 1
    parts: list[dict[str, np.ndarray]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = max(1, min(len(units), 200))
            try:
                ds = ray.data.from_items(units, override_num_blocks=blocks)
            except TypeError:  # Ray < 2.10 calls it parallelism
                ds = ray.data.from_items(units, parallelism=blocks)
            ds = ds.map_batches(
                MCWorker, batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                fn_constructor_kwargs={"model": model, "sources": srcs, "mc": mc, "threads": threads, "hooks": list(UNIT_HOOKS)},
                num_cpus=threads, **remote,
            )
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if "error" in b:
                    err = json.loads(str(b["error"][0]))
                    cls = UsageError if err["error"] == "UsageError" else DropcliError
                    raise cls(err["message"], err["hint"])
                parts.append(b)
                progress(len(b["index"]))
    except KeyboardInterrupt:
        raise
    except DropcliError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _from_ray(e) from None
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved[0], saved[1]
        if saved[2] is not None:
            ctx.print_on_execution_start = saved[2]
        del refs
    out = []
    for i in range(len(sources)):
        mine = [{c: v[b["src"] == i] for c, v in b.items()} for b in parts]
        mine = [m for m in mine if len(m["index"])]
        out.append(gather(mine, sum(u["stop"] - u["start"] for u in units if u["src"] == i)) if mine else None)
    return out


def gather(parts: list[dict[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """Concatenate the units' columns, in index order; each example exactly once."""
    if not parts:
        raise DropcliError("the Ray run returned no results")
    cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    idx = cols["index"]
    order = np.argsort(idx, kind="stable")
    if not np.array_equal(order, np.arange(len(idx))):
        cols = {c: v[order] for c, v in cols.items()}
        idx = cols["index"]
    if len(idx) != n or len(np.unique(idx)) != len(idx):
        raise DropcliError(f"the Ray run returned {len(idx)} results ({len(np.unique(idx))} distinct) for {n} examples",
                           "this is a bug in dropcli's Ray engine; run with --engine local")
    return cols


def _from_ray(e: BaseException) -> DropcliError:
    """The one-line error inside a Ray failure (a DropcliError raised in a worker), or a summary."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, DropcliError):
            return DropcliError(x.message, x.hint)
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    text = str(e).strip().splitlines()
    line = next((t for t in reversed(text) if t.strip()), type(e).__name__)
    return DropcliError(f"the Ray run failed: {type(e).__name__}: {line.strip()[:300]}", "run with --debug for details")


def model_payload(model_path: str, load_opts: dict, inject: dict | None) -> dict:
    """What every actor gets: the model's bytes (put in the object store once) and how to load them."""
    import ray

    from dropcli.io.files import model_file

    blob = model_file(model_path).read_bytes()  # `-`: the copy of stdin
    opts = dict(load_opts)
    opts["imports"] = [str(Path(i).resolve()) if i.endswith(".py") and Path(i).exists() else i for i in opts.get("imports") or []]
    arch = opts.get("arch")
    if arch and ":" in arch:
        mod, _, fn = arch.rpartition(":")
        if mod.endswith(".py") and Path(mod).exists():
            opts["arch"] = f"{Path(mod).resolve()}:{fn}"
    return {"ref": [ray.put(blob)], "name": model_path, "load_opts": opts, "inject": inject}



# ------------------------------------------------------------------------------ the engine


class RayEngine:
    """A Ray Data actor pool; the statistics come back per example (the engine interface of
    :mod:`dropcli.engines.local`). ``log(text)`` hears about the pool's size."""

    def __init__(self, session, runner, model_path, load_kw, inject_opts, dev, T, seed, batch_size, budget, tau,
                 keep_samples, workers, address, progress: Callable | None = None, log: Callable[[str], None] | None = None):
        from dropcli.engines.runner import no_progress

        self.session, self.runner = session, runner
        self.model_path, self.load_kw, self.inject_opts, self.dev = model_path, load_kw, inject_opts, dev
        self.mc = {"T": T, "seed": seed, "batch_size": batch_size, "budget": budget, "device": dev, "tau": tau,
                   "keep_samples": keep_samples}
        self.workers, self.address = workers, address
        self.progress = progress or no_progress
        self.log = log or (lambda text: None)

    def __enter__(self):
        info = self.session.__enter__()
        try:
            self.actors, self.threads = plan_workers(self.workers, info["cluster_cpus"], not self.address)
            if self.actors < self.workers:
                self.log(f"--workers {self.workers}: this machine has {info['cluster_cpus']} CPU(s), using {self.actors} worker(s)")
            if self.mc["budget"] is None and not self.address:
                # the actors of a local run share this machine's memory (results do not depend on it)
                from dropcli.engines.runner import default_budget

                self.mc["budget"] = max(64 << 20, default_budget(self.dev) // self.actors)
            self.model = model_payload(self.model_path, self.load_kw, self.inject_opts)
        except BaseException:
            self.session.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        self.model = None
        return self.session.__exit__(*exc)

    def n_outputs(self, source) -> int:
        """K from the deterministic pass on the first row, read and run on the driver."""
        k, a, _ = source.ranges()[0]
        ev = self.runner.run_eval(source.read(k, a, a + 1))
        return int(np.prod(ev.shape[1:]))

    def _unit_rows(self, source) -> int:
        return unit_rows(source.n, self.actors, self.mc["batch_size"])

    def run_all(self, sources, task, tau, temperature=None) -> list:
        """Every source on one actor pool (the model is loaded once per actor for all of them)."""
        from dropcli.engines.local import EngineResult
        from dropcli.engines.keyed import stream_seed
        from dropcli.engines.runner import check_degenerate_examples

        mc = dict(self.mc, task=task, as_probs=None, temperature=temperature)
        total = sum(src.n for src in sources)
        with self.progress("MC dropout" if len(sources) == 1 else "MC dropout (input + OOD)", total) as advance:
            results = run(sources, self.model, mc, self.actors, self.threads, advance)
        out = []
        for i, (source, cols) in enumerate(zip(sources, results)):
            check_degenerate_examples(cols["degenerate"], self.mc["T"])
            if task == "classification":
                # to_probs decides over ALL samples (an AND over examples): redo the units that decided otherwise alone
                flags = cols["as_probs"]
                decision = bool(flags.all())
                redo = [dict(u, src=0) for u in source.units(self._unit_rows(source))
                        if bool(flags[u["start"]]) != decision]
                if redo:
                    again = run([source], self.model, dict(mc, as_probs=decision, seed=stream_seed(mc["seed"], i)),
                                self.actors, self.threads,
                                lambda k: None, redo)[0]
                    rows = again["index"]
                    for c in cols:
                        cols[c][rows] = again[c]
            per = {k[4:]: v for k, v in cols.items() if k.startswith("per_")}
            samples = np.ascontiguousarray(np.swapaxes(cols["samples"], 0, 1)) if "samples" in cols else None
            out.append(EngineResult(per, cols["eval"], samples))
        self.n_units = sum(len(src.units(self._unit_rows(src))) for src in sources)
        return out

    def describe(self) -> str:
        return f"Ray: {self.actors} worker(s) x {self.threads} CPU(s), {self.n_units} unit(s)"
