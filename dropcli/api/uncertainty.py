"""MC-dropout uncertainty: ``dropcli.uncertainty`` (and `dropcli uncertainty`, which renders it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from dropcli.api.common import Log, is_path, load_opts, no_log, no_progress, open_input, read_labels

Names = Optional[Sequence[str] | str]


@dataclass
class UncertaintyResult:
    """What `dropcli uncertainty` reports, as arrays.

    ``per``: per-example statistics, each an array over the N examples: ``mean`` and ``var`` /
    ``std`` [N, K] (of the probabilities for classification), and for classification ``pred``,
    ``confidence``, ``entropy`` (of the predictive mean), ``expected_entropy``, ``mutual_info``
    (BALD), ``variation_ratio``. They are also attributes: ``r.mean``, ``r.mutual_info``...
    ``summary``: the statistics the CLI reports (``--json``'s ``summary``). ``eval``: the
    deterministic pass [N, K]; ``samples``: the raw [T, N, K] outputs (local engine, or
    ``keep_samples``); ``columns``: the per-example columns the CLI writes; ``ood``: the
    per-example statistics of the ``ood`` input."""

    task: str
    summary: dict
    per: dict
    eval: Any
    samples: Any = None
    labels: Any = None
    columns: dict = field(default_factory=dict)
    ood: Optional[dict] = None
    source: Any = field(default=None, repr=False)

    def __getattr__(self, name: str) -> Any:
        per = self.__dict__.get("per")
        if not name.startswith("_") and per is not None and name in per:
            return per[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    streamed: bool = False

    @property
    def n(self) -> int:
        return len(next(iter(self.per.values())))

    @property
    def tripped(self) -> bool:
        """Whether the ``fail_above`` gate tripped (False without one)."""
        return bool(self.summary.get("gate", {}).get("tripped", False))

    def to_json(self, examples: bool = True) -> dict:
        """The report of `dropcli uncertainty --json`: ``{"summary": ..., "examples": [...]}``
        (JSON types: NaN is None); ``examples=False``: the summary only."""
        from dropcli.io import report

        return json.loads(report.to_json(self.summary, self.columns if examples else {}))


def check_uncertainty_args(*, T: int = 50, batch_size: int = 256, task: str = "auto", tau: Optional[float] = None,
                           engine: str = "local", method: str = "mc", keep_samples: bool = False,
                           address: Optional[str] = None, workers: int = 1, fail_above: Any = None,
                           temperature: Optional[float] = None, calibration: bool = True, **_: Any):
    """The option checks of `dropcli uncertainty` (UsageError); the parsed ``fail_above`` gate."""
    from dropcli.analysis.summary import parse_gate
    from dropcli.analysis.task import OUTPUT_TASKS, check_task
    from dropcli.errors import UsageError

    if T < 1:
        raise UsageError(f"--samples must be >= 1, got {T}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    check_task(task, OUTPUT_TASKS)
    if tau is not None and not tau > 0:
        raise UsageError("--tau must be positive")
    if temperature is not None and not (temperature > 0 and temperature < float("inf")):
        raise UsageError(f"--temperature must be a positive number, got {temperature}")
    if temperature is not None and not calibration:
        raise UsageError("--temperature and --no-calibration contradict each other", "pass one of them")
    if engine not in ("local", "ray"):
        raise UsageError(f"unknown --engine {engine!r}", "choose local or ray")
    if method not in ("mc", "moments"):
        raise UsageError(f"unknown --method {method!r}", "choose mc or moments")
    if method == "moments" and (engine != "local" or keep_samples):
        raise UsageError("--method moments draws no samples: it runs with --engine local and without --keep-samples")
    if engine == "local" and (address or workers != 1):
        raise UsageError("--address and --workers apply only with --engine ray")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    return parse_gate(fail_above)


def _check_before_run(runner: Any, source: Any, labels: Any, task: str, method: str, T: int, seed: int,
                      batch_size: int, budget: Optional[int], inject_opts: Optional[dict], gate: Any = None):
    """What one example tells before the MC run over all of them: the output's shape and kind
    (:func:`dropcli.analysis.task.output_kind`; the labels and the ``--fail-above`` metric are
    checked against it) and, with T > 1, whether the sites vary at all. Example 0's T samples
    are those of the full run (seeded by example and pass), so an error here is the one the run
    would end with. Returns the output kind."""
    import numpy as np

    from dropcli.analysis.summary import check_gate
    from dropcli.analysis.task import check_output_labels, output_kind
    from dropcli.engines.runner import final_op
    from dropcli.errors import DropcliError

    k, a, _ = source.ranges()[0]
    first = source.read(k, a, a + 1)
    if method == "mc" and T > 1:
        from dropcli.engines.runner import degenerate_examples, run_mc

        res = run_mc(runner, first, T, seed, batch_size, budget, check_degenerate=False)
        if degenerate_examples(res.samples)[0]:
            p0 = bool(inject_opts) and inject_opts.get("p") == 0
            raise DropcliError(
                f"degenerate sampling: the {T} samples of example 0 are identical; the sites produce no randomness "
                "(p = 0, or a deterministic variant such as maxdrop), so MC dropout would measure nothing",
                "--p 0 drops nothing: give --p > 0" if p0 else "use p > 0 or another variant")
        shape, ev = res.out_shape, res.eval
    else:
        ev = np.asarray(runner.run_eval(first))
        shape = tuple(ev.shape[1:]) or (1,)
    kind = output_kind(task, labels, shape, final_op(runner), np.asarray(ev).reshape((len(ev),) + tuple(shape)))
    if labels is not None:
        check_output_labels(labels, kind)
    check_gate(gate, kind.task, method)
    return kind


def uncertainty(model: Any, x: Any, *, labels: Any = None, T: int = 50, method: str = "mc", seed: int = 0,
                device: str = "cpu", batch_size: int = 256, max_memory: Optional[str | int] = None, task: str = "auto",
                tau: Optional[float] = None, temperature: Optional[float] = None, calibration: bool = True, ood: Any = None, fail_above: Any = None, inject: Optional[str] = None,
                p: Optional[float] = None, after: Names = None, layers: Names = None, exclude: Names = None,
                allow_output: bool = False, engine: str = "local", address: Optional[str] = None, workers: int = 1,
                keep_samples: bool = False, trust_pickle: bool = False, imports: Optional[Sequence[str]] = None,
                arch: Optional[str] = None, input_shape: Optional[str] = None, debug: bool = False,
                progress: Callable | None = None, log: Log | None = None, output: Optional[str] = None,
                output_format: Optional[str] = None) -> UncertaintyResult:
    """Monte-Carlo dropout: ``T`` stochastic passes per example of ``x``, and the per-example
    predictive mean, variance, entropy, mutual information... with the summary `dropcli
    uncertainty` reports (accuracy, NLL, Brier, ECE, risk-coverage, AUROC with labels).

    ``model``: a path or a loaded model (``dropcli.load``) with dropout sites, or without them
    and ``inject="standard", p=0.1, after="relu"`` (sites on the fly, on a copy). ``x``: a path
    (file, folder or glob of shards, ``-``), an array, a list of arrays (one per model input) or
    a dict of named arrays (a ``y`` array holds the labels). ``labels``: a path or an array.
    ``method="moments"``: analytic moments through fastdropout sites (torch). ``engine="ray"``
    (a model path) runs on a Ray actor pool with the same results. ``progress(label, total)`` is
    a context manager yielding ``advance(k)``; ``log(text)`` gets the CLI's log lines.
    Classification: each pass's logits are divided by ``temperature``, by default the one
    `dropcli finetune --calibrate` stored in the model (``calibration=False``: none).
    ``output`` (a path or ``-``) with ``output_format`` ``jsonl`` or ``csv``: per-example records
    are written there as they are computed (MC, local engine, one class or regression per
    example), so memory stays within ``max_memory`` whatever N; the result's ``per`` then holds
    only the per-example numbers the summary needs (no [N, K] ``mean``), ``columns`` is empty
    and ``streamed`` is True.
    Raises :class:`dropcli.errors.DropcliError` (``UsageError`` for bad arguments)."""
    from dropcli.analysis import stats
    from dropcli.analysis import summary as S
    from dropcli.analysis.task import IGNORE_INDEX, class_labels, token_labels
    from dropcli.errors import DropcliError, UsageError
    from dropcli.io import report

    log = log or no_log
    progress = progress or no_progress
    gate = check_uncertainty_args(T=T, batch_size=batch_size, task=task, tau=tau, engine=engine, method=method,
                                  keep_samples=keep_samples, address=address, workers=workers, fail_above=fail_above,
                                  temperature=temperature, calibration=calibration)
    from dropcli.api.common import resolve_device

    dev = resolve_device(device)
    budget = None
    if max_memory:
        from dropcli.engines.runner import parse_size

        budget = max_memory if isinstance(max_memory, int) else parse_size(max_memory)
    if engine == "ray":
        from dropcli.engines.ray import require_ray

        require_ray()
        if not is_path(model):
            raise UsageError("engine='ray' sends the model file to its workers: give the model as a path")
    if not inject and (p is not None or after or layers):
        raise UsageError("--p/--after/--layers apply only with --inject")

    from dropcli.engines.factory import build_runner

    load_kw = load_opts(trust_pickle, imports, arch, input_shape, example_data=x)
    inject_opts = {"variant": inject, "p": p, "after": after, "layers": layers, "exclude": exclude,
                   "allow_output": allow_output} if inject else None

    def injected(name: str, params: dict, done: list) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        log(f"injected {name} ({shown}) at {len(done)} site(s), not saved")

    if is_path(model):
        model_name = str(model)
    else:
        from dropcli.api.common import copy_model, resolve_model

        model, model_name = resolve_model(model, load_kw)
        if inject_opts:
            model = copy_model(model)  # the caller's model keeps no on-the-fly sites
    runner = build_runner(model if not is_path(model) else str(model), load_kw, dev, inject_opts, on_inject=injected)
    mdl = runner.model
    if getattr(runner, "note", None):
        log(f"note: {runner.note}")
    if method == "moments" and mdl.backend != "torch":
        raise UsageError("--method moments propagates moments through torch graphs; this is an ONNX model",
                         "use --method mc, or run --method moments on the torch model it was exported from")
    if runner.n_sites == 0:
        raise DropcliError(
            f"{model_name} has no dropout sites, so MC dropout has nothing to sample",
            "inject some on the fly with --inject standard --p 0.1 (or save one with `dropcli inject`)",
        )
    tau_from = "--tau"
    if tau is None and mdl.model_meta.get("tau"):
        tau, tau_from = float(mdl.model_meta["tau"]), "the model (dropcli finetune)"  # regression only
    temp_from = "--temperature"
    if temperature is None and calibration and mdl.model_meta.get("temperature"):
        temperature, temp_from = float(mdl.model_meta["temperature"]), "the model (dropcli finetune --calibrate)"
    specs = runner.input_specs()
    source = open_input(x, specs)
    n = source.n
    labels = read_labels(labels) if labels is not None else source.labels
    if labels is not None and len(labels) != n:
        raise DropcliError(f"labels have {len(labels)} rows but the input has {n} examples", "give one label per example")
    ood_source = open_input(ood, specs, "OOD input") if (ood if is_path(ood) else ood is not None) else None
    kind = _check_before_run(runner, source, labels, task, method, T, seed, batch_size, budget, inject_opts, gate)
    if kind.task == "token-classification" and (method != "mc" or engine != "local"):
        raise UsageError(f"per-position outputs ({kind.why}) run with --method mc --engine local",
                         "drop --method moments / --engine ray, or pass --task regression")
    if kind.warning:
        log(f"warning: {kind.warning}")
    elif kind.task == "token-classification":
        log(f"output: {kind.kind}, {kind.why}")

    if (output is not None and output_format in report.STREAM_FORMATS and method == "mc" and engine == "local"
            and not keep_samples and kind.task != "token-classification"):
        return _streamed(runner, mdl, model_name, source, ood_source, labels, kind, output, output_format, T, seed,
                         batch_size, budget, tau, tau_from, temperature, temp_from, gate, dev, progress, log)
    if method == "moments":
        from dropcli.engines.local import MomentsEngine

        eng = MomentsEngine(runner, batch_size, progress)
    elif engine == "local":
        from dropcli.engines.local import LocalEngine

        eng = LocalEngine(runner, T, seed, batch_size, budget, progress)
    else:
        from dropcli.engines.ray import RayEngine, session

        eng = RayEngine(session(address, workers, debug), runner, str(model), load_kw, inject_opts, dev, T, seed,
                        batch_size, budget, tau, keep_samples, workers, address, progress=progress, log=log)
    with eng:
        K = eng.n_outputs(source)
        task = kind.task
        with_ood = ood_source is not None and task != "regression"
        if task == "regression" or (method == "moments" and getattr(eng, "probs", False)):
            temperature = None  # classification logits only (a model that outputs probabilities has none for moments)
        results = eng.run_all([source, ood_source] if with_ood else [source], task, tau, temperature)
        res, ood_res = results[0], (results[1] if with_ood else None)
    log(f"{model_name}: {mdl.backend}/{mdl.format}, {runner.n_sites} dropout site(s); "
        f"{n} examples x {'analytic moments' if method == 'moments' else f'T={T}'} on {dev}, {eng.describe()}")
    per, eval_out = res.per, res.eval
    summary: dict = {"model": model_name, "backend": mdl.backend, "task": task, "method": method,
                     "samples": T if method == "mc" else None, "seed": seed if method == "mc" else None,
                     "sites": runner.n_sites, "device": dev, "output": kind.record()}
    if method == "moments":
        summary["moments"] = eng.report(task)
    if temperature is not None:
        summary["calibration"] = {"temperature": temperature, "from": temp_from,
                                  "applied": ("the Gaussian logits divided by it (mean / T, variance / T^2)" if method == "moments"
                                              else "each pass's logits divided by it before the softmax")}
        log(f"calibrated predictive: logits / {temperature:.4g} (temperature from {temp_from}; "
            "--no-calibration switches it off)")
    if task == "token-classification":
        seq_len, vocab = kind.shape
        if labels is not None:
            labels = token_labels(labels, seq_len, vocab)
        eval_probs = stats.to_probs(eval_out.reshape(1, n * seq_len, vocab))[0].reshape(n, seq_len, vocab)
        summary.update(stats.token_summary(per, labels, eval_probs, ood_per=ood_res.per if ood_res else None,
                                           ignore_index=IGNORE_INDEX))
        seq = stats.sequence_means(per, None if labels is None else labels != IGNORE_INDEX)
        cols = report.token_columns(per, seq, labels, eval_probs, IGNORE_INDEX)
    elif task == "classification":
        if labels is not None:
            labels = class_labels(labels, K)
        eval_probs = stats.to_probs(eval_out[None])[0]
        summary.update(stats.summary(per, labels, eval_probs=eval_probs, ood_per=ood_res.per if ood_res else None))
        cols = report.columns(task, per, labels, eval_probs)
    else:
        summary["variance"] = (f"sample variance over passes + 1/tau, tau = {tau:.6g} from {tau_from}" if tau else
                               "sample variance over passes (no --tau: model precision not included)")
        summary["tau"] = tau
        summary["distribution"] = {"std": stats.distribution(per["std"].mean(-1))}
        if labels is not None:
            summary.update(S.regression_metrics(per, eval_out, labels, K))
        cols = report.columns(task, per, labels, eval_out)
    if gate:
        summary["gate"] = S.gate(per, gate, task, method)
    return UncertaintyResult(task=task, summary=summary, per=per, eval=eval_out,
                             samples=res.samples, labels=labels, columns=cols,
                             ood=ood_res.per if ood_res else None, source=source)


def _streamed(runner, mdl, model_name, source, ood_source, labels, kind, output, fmt, T, seed, batch_size, budget, tau,
              tau_from, temperature, temp_from, gate, dev, progress, log) -> UncertaintyResult:
    """`uncertainty` with per-example records written as they are computed (see ``output``):
    memory is the budget's, whatever the number of examples."""
    import numpy as np

    from dropcli.analysis import stats
    from dropcli.analysis import summary as S
    from dropcli.analysis.task import class_labels
    from dropcli.engines.local import stream_blocks
    from dropcli.engines.keyed import stream_seed
    from dropcli.engines.runner import default_budget
    from dropcli.io import report

    task, n = kind.task, source.n
    K = int(np.prod(kind.shape))
    if task == "regression":
        temperature = None
    lab = None if labels is None else (class_labels(labels, K) if task == "classification" else np.asarray(labels))
    with_ood = ood_source is not None and task == "classification"
    bud = budget or default_budget(dev)
    keep = (n + (ood_source.n if with_ood else 0)) * S.Accumulator.ROW_BYTES
    acc = S.Accumulator(n, task, lab, K, gate[0] if gate else None)
    writer = report.RowWriter(output, fmt)

    def on_block(a: int, per: dict, ev: np.ndarray) -> None:
        b = a + len(ev)
        probs = stats.to_probs(ev[None])[0] if task == "classification" else None
        acc.add(a, per, ev, probs)
        cols = report.columns(task, per, None if lab is None else lab[a:b], probs if probs is not None else ev)
        cols["index"] = cols["index"] + a
        writer.write(cols)

    try:
        chunks = stream_blocks(runner, source, T, seed, batch_size, bud, keep, task, tau, temperature, kind.shape,
                               on_block, progress)
        ood_per = None
        if with_ood:
            acc_o = S.Accumulator(ood_source.n, task, None, K)
            chunks += stream_blocks(runner, ood_source, T, stream_seed(seed, 1), batch_size, bud, keep, task, tau,
                                    temperature, kind.shape, lambda a, per, ev: acc_o.add(a, per, ev), progress, "OOD")
            ood_per = acc_o.per()
        log(f"{model_name}: {mdl.backend}/{mdl.format}, {runner.n_sites} dropout site(s); {n} examples x T={T} on {dev}, "
            f"{chunks} chunk(s), records streamed to {output}")
        per = acc.per()
        summary: dict = {"model": model_name, "backend": mdl.backend, "task": task, "method": "mc", "samples": T,
                         "seed": seed, "sites": runner.n_sites, "device": dev, "output": kind.record(),
                         "memory": {"budget_bytes": int(bud), "streamed": True,
                                    "kept_per_example_bytes": S.Accumulator.ROW_BYTES}}
        if temperature is not None:
            summary["calibration"] = {"temperature": temperature, "from": temp_from,
                                      "applied": "each pass's logits divided by it before the softmax"}
            log(f"calibrated predictive: logits / {temperature:.4g} (temperature from {temp_from}; "
                "--no-calibration switches it off)")
        if task == "classification":
            summary.update(stats.summary(per, lab, ood_per=ood_per, scores=acc.scores()))
        else:
            summary["variance"] = (f"sample variance over passes + 1/tau, tau = {tau:.6g} from {tau_from}" if tau else
                                   "sample variance over passes (no --tau: model precision not included)")
            summary["tau"] = tau
            summary["distribution"] = {"std": stats.distribution(per["std_mean"])}
            if lab is not None:
                summary.update(acc.regression_metrics())
        if gate:
            summary["gate"] = S.gate_from_mean(gate, acc.gate_mean())
    except BaseException as e:
        writer.abort(e)
        raise
    writer.close()
    return UncertaintyResult(task=task, summary=summary, per=per, eval=None, samples=None, labels=lab, columns={},
                             ood=ood_per, source=source, streamed=True)
