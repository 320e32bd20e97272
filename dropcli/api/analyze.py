"""Ensemble vs weight scaling: ``dropcli.analyze`` (and `dropcli analyze`, which renders it)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from dropcli.api.common import Log, as_arrays, is_path, load_opts, no_log, no_progress, read_labels, resolve_model

Names = Optional[Sequence[str] | str]


def check_analyze_args(*, T: int = 100, batch_size: int = 64, task: str = "auto", **_: Any) -> None:
    from dropcli.analysis.task import check_task
    from dropcli.errors import UsageError

    if T < 2:
        raise UsageError(f"--samples must be >= 2 (variances need two masks), got {T}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    check_task(task)


def selected_sites(after: Names, layers: Names, exclude: Names):
    """A predicate on site names from ``layers``/``exclude`` globs (None: all sites)."""
    if not (after or layers or exclude):
        return None
    import fnmatch

    from dropcli.errors import UsageError

    def split(v: Names) -> list[str]:
        vals = [v] if isinstance(v, str) else list(v or [])
        return [p for x in vals for p in x.split(",") if p]

    pats, ex = split(layers), split(exclude)
    if after:
        raise UsageError("--after selects where to inject; analyze selects existing sites with --layers/--exclude")

    def keep(name: str) -> bool:
        ok = not pats or any(fnmatch.fnmatch(name, p) for p in pats)
        return ok and not any(fnmatch.fnmatch(name, p) for p in ex)

    return keep


def analyze(model: Any, x: Any, labels: Any = None, *, T: int = 100, seed: int = 0, device: str = "cpu",
            batch_size: int = 64, task: str = "auto", after: Names = None, layers: Names = None, exclude: Names = None,
            trust_pickle: bool = False, imports: Optional[Sequence[str]] = None, arch: Optional[str] = None,
            input_shape: Optional[str] = None, progress: Callable | None = None, log: Log | None = None) -> dict:
    """Baldi & Sadowski's ensemble vs weight-scaling analysis of every dropout site of ``model``
    (a path or a loaded model) on the inputs ``x`` (a path, an array, a list or dict of arrays;
    labels from ``labels`` or a ``y`` array beside the inputs), over ``T`` MC masks. Returns the
    report of `dropcli analyze --json`; ``layers``/``exclude`` narrow the sites reported."""
    import numpy as np

    from dropcli.analysis.task import check_labels, class_labels, infer_task
    from dropcli.engines.factory import make_runner
    from dropcli.errors import DropcliError
    from dropcli.io import data as D
    from dropcli.api.common import resolve_device

    log = log or no_log
    progress = progress or no_progress
    check_analyze_args(T=T, batch_size=batch_size, task=task)
    dev = resolve_device(device)
    mdl, name = resolve_model(model, load_opts(trust_pickle, imports, arch, input_shape, example_data=x))
    runner = make_runner(mdl, dev)
    if getattr(runner, "note", None):  # a model saved with a fixed batch that bakes it in
        raise DropcliError(f"{name} runs only at the batch size it was saved with ({runner.batch}): the analysis "
                           "runs all T masks of a batch in one pass",
                           "analyze the model exported with a dynamic batch (dynamic_axes / dynamic_shapes); "
                           "`dropcli uncertainty` runs this one")
    mdl = runner.model  # an ONNX model saved at a fixed batch that runs at any: its copy with a free batch
    if runner.n_sites == 0:
        raise DropcliError(f"{name} has no stochastic dropout sites, so there is no ensemble to analyse",
                           "inject some first, e.g. `dropcli inject MODEL --variant standard --p 0.2 -o OUT`")
    specs = runner.input_specs()
    if is_path(x):
        arrays = D.read_arrays(str(x))
        where = "stdin" if str(x) == "-" else str(x)
    else:
        arrays, where = as_arrays(x, specs), "input"
    xs = D.bind(arrays, specs, where)
    n = len(xs[0])
    labels = read_labels(labels) if labels is not None else next(
        (np.asarray(arrays[k]) for k in D.LABEL_KEYS if k in arrays and len(arrays) > 1), None)
    if labels is not None and len(labels) != n:
        raise DropcliError(f"labels have {len(labels)} rows but the input has {n} examples", "give one label per example")
    K = int(np.prod(runner.run_eval([x[:1] for x in xs]).shape[1:]))
    task = infer_task(task, labels, K)
    if labels is not None:  # before the MC run: range, integers, one class (or K columns) per example
        check_labels(labels, task, K)
        if task == "classification":
            labels = class_labels(labels, K)
    _check_sites_vary(runner, xs, T, seed, batch_size)
    if mdl.backend == "onnx":
        from dropcli.analysis.ensemble_onnx import analyze_onnx as analyze_fn
    else:
        from dropcli.analysis.ensemble_torch import analyze_torch as analyze_fn

    sel_names = selected_sites(after, layers, exclude)
    with progress("analyze", n) as advance:
        rep = analyze_fn(mdl, xs, labels if task == "classification" else None, T, seed, batch_size, dev,
                         task == "classification", progress=advance)
    rep.pop("_samples", None)
    if sel_names is not None:
        rep["sites"] = [s for s in rep["sites"] if sel_names(s["site"])]
        if not rep["sites"]:
            raise DropcliError("no dropout site matches the selection", "run `dropcli inspect MODEL` to see the site names")
    rep = {"model": name, "backend": mdl.backend, "n": n, "samples": T, "seed": seed, "task": task, **rep}
    log(f"{name}: {len(rep['sites'])} site(s), {n} examples x T={T}")
    return rep


def _check_sites_vary(runner, xs, T: int, seed: int, batch_size: int) -> None:
    """Before the MC run: T masks of example 0 that all give the same output mean sites that
    produce no randomness (p = 0, a deterministic variant): the analysis would measure nothing."""
    from dropcli.engines.runner import degenerate_examples, run_mc
    from dropcli.errors import DropcliError

    res = run_mc(runner, [x[:1] for x in xs], T, seed, batch_size, check_degenerate=False)
    if degenerate_examples(res.samples)[0]:
        raise DropcliError(f"degenerate sampling: the {T} masks of example 0 give identical outputs; the sites produce no "
                           "randomness (p = 0, or a deterministic variant such as maxdrop), so there is no ensemble to analyse",
                           "use p > 0 or another variant")
