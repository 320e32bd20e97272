"""`dropcli uncertainty`: Monte-Carlo dropout inference with per-example uncertainty."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from dropcli.io import data as D
from dropcli.io import report
from dropcli.analysis import stats
from dropcli.errors import DropcliError, UsageError
from dropcli.io.files import check_output_path
from dropcli.cli.common import (
    After, AllowOutput, Arch, Exclude, Imports, InputShape, Layers, ModelArg, TrustPickle, STATE,
    err, handle_errors, load_opts, log, out,
)

EXIT_GATE = 3  # --fail-above tripped

HELP = f"""Monte-Carlo dropout: T stochastic passes per example; predictive mean, variance,
entropy, mutual information (BALD), variation ratio; with labels, accuracy, NLL, Brier,
ECE/MCE, risk-coverage and error-detection AUROC, side by side with the deterministic pass.

Only the dropout sites sample; BatchNorm and every other layer stay in inference mode.
The deterministic part before the first site is computed once per example.
--seed gives bitwise-identical results on CPU, whatever --batch-size or --max-memory.

Examples:

  dropcli uncertainty examples/digits_mlp.pt --input examples/digits_test.npz

  dropcli uncertainty model.onnx --input x.npy --labels y.npy -T 100 --output report.json

  cat x.npy | dropcli uncertainty model.pt2 --input - --format jsonl --output - | head

  dropcli uncertainty model.pt --input x.npz --fail-above mutual_info=0.05 || echo "too uncertain"

  dropcli uncertainty plain.onnx --input x.npy --inject standard --p 0.2 --after relu

  dropcli uncertainty model.pt2 --input 'shards/part-*.npz' --engine ray --workers 2 --output out/

--method moments (fastdropout models, torch backend): no sampling; the MC mode's predictive
mean and variance are propagated analytically through the graph (fastdropout sites, Linear/Conv,
relu/sigmoid/tanh, BatchNorm, reshapes, a final softmax). The report lists every layer where an
approximation is used; ops with no moment rule stop with an error naming them (use --method mc).
Mutual information, expected entropy and the variation ratio need samples and are left out.

  dropcli inject model.pt2 --variant fastdropout --p 0.2 -o fd.pt2
  dropcli uncertainty fd.pt2 --input x.npy --method moments

Sharded inputs: a folder, a quoted glob or a comma list of .npy/.npz/.parquet files, ordered
by name (numbers as numbers); an example's index is its position in that order. With
--engine ray, --output DIR writes a folder of shards (--format jsonl or parquet) plus
summary.json; the results are bitwise identical to --engine local.

Exit codes: 0 ok, 1 error, 2 usage error, {EXIT_GATE} --fail-above tripped, 130 interrupted.
"""

GATE_METRICS = ("entropy", "expected_entropy", "mutual_info", "variation_ratio", "confidence", "var", "std")


def _parse_gate(text: Optional[str]) -> tuple[str, float] | None:
    if not text:
        return None
    if "=" not in text:
        raise UsageError(f"--fail-above {text!r} must look like METRIC=VALUE", f"metrics: {', '.join(GATE_METRICS)}")
    name, _, val = text.partition("=")
    name = name.strip()
    if name not in GATE_METRICS:
        raise UsageError(f"unknown metric {name!r} in --fail-above", f"choose one of {', '.join(GATE_METRICS)}")
    try:
        return name, float(val)
    except ValueError:
        raise UsageError(f"--fail-above value {val!r} is not a number") from None


def make_runner(model, device: str):
    if model.backend == "onnx":
        from dropcli.engines.onnx_mc import OnnxRunner

        return OnnxRunner(model, device)
    from dropcli.engines.runner import TorchRunner

    return TorchRunner(model, device)


def register(app: typer.Typer) -> None:
    @app.command("uncertainty", help=HELP)
    @handle_errors
    def uncertainty_cmd(
        model_path: str = ModelArg,
        input_path: str = typer.Option(..., "--input", "-i", help="Inputs: .npy, .npz (arrays named after the model inputs; x/y), .pt, .csv, or - for stdin."),
        labels_path: Optional[str] = typer.Option(None, "--labels", help="Labels file (else the 'y' array of an .npz input)."),
        samples: int = typer.Option(50, "--samples", "-T", help="Number of stochastic passes T."),
        method: str = typer.Option("mc", "--method", help="mc (T stochastic passes) or moments (analytic mean and variance through fastdropout sites; torch models)."),
        seed: int = typer.Option(0, "--seed", help="Random seed (bitwise reproducible on CPU)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
        batch_size: int = typer.Option(256, "--batch-size", help="Examples per chunk (results do not depend on it)."),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for one chunk, e.g. 512M (default: a quarter of free RAM)."),
        task: str = typer.Option("auto", "--task", help="auto, classification or regression."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Write per-example results here ('-' = stdout)."),
        fmt: Optional[str] = typer.Option(None, "--format", help="table, json, jsonl, csv or npz (default: from --output's extension)."),
        keep_samples: bool = typer.Option(False, "--keep-samples", help="With npz: include the raw [T, N, K] samples."),
        plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG: uncertainty histograms, reliability diagram, risk-coverage."),
        tau: Optional[float] = typer.Option(None, "--tau", help="Regression: model precision; adds 1/tau to the variance (default: the tau `dropcli finetune` stored in the model, if any)."),
        ood: Optional[str] = typer.Option(None, "--ood", help="Out-of-distribution inputs: adds AUROC and FPR95 per measure."),
        fail_above: Optional[str] = typer.Option(None, "--fail-above", help=f"METRIC=VALUE: exit {EXIT_GATE} when the mean of METRIC exceeds VALUE."),
        inject: Optional[str] = typer.Option(None, "--inject", help="Inject this variant on the fly (not saved) when the model has no dropout."),
        p: Optional[float] = typer.Option(None, "--p", help="With --inject: drop probability."),
        after: Optional[List[str]] = After,
        layers: Optional[List[str]] = Layers,
        exclude: Optional[List[str]] = Exclude,
        allow_output: bool = AllowOutput,
        json_out: bool = typer.Option(False, "--json", help="Same as --format json --output - (JSON on stdout)."),
        engine: str = typer.Option("local", "--engine", help="local (this process) or ray (a Ray Data actor pool; pip install \"dropcli[ray]\")."),
        address: Optional[str] = typer.Option(None, "--address", help="With --engine ray: 'auto' or HOST:PORT joins a running cluster (default: start Ray on this machine)."),
        workers: int = typer.Option(1, "--workers", help="With --engine ray: actors in the pool (each loads the model once)."),
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        if samples < 1:
            raise UsageError(f"--samples must be >= 1, got {samples}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        if task not in ("auto", "classification", "regression"):
            raise UsageError(f"unknown --task {task!r}", "choose auto, classification or regression")
        if tau is not None and not tau > 0:
            raise UsageError("--tau must be positive")
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
        gate = _parse_gate(fail_above)
        out_dir = None  # --engine ray: a folder of per-example shards
        if engine == "ray" and output and output != "-" and not report.format_from_path(output):
            out_dir, output = output, None
            shard_fmt = fmt or "jsonl"
            if shard_fmt not in report.SHARD_FORMATS:
                raise UsageError(f"--format {shard_fmt} does not write a folder of shards", "use jsonl or parquet with --output DIR")
            if keep_samples:
                raise UsageError("--keep-samples needs --format npz and a file --output")
            fmt = "json" if json_out else "table"
            report.check_output_dir(out_dir, [model_path, input_path, labels_path, ood])
        else:
            if json_out:
                fmt, output = "json", output or "-"
            fmt = fmt or report.format_from_path(output) or ("table" if not output else None)
            if fmt is None:
                raise UsageError(f"can't tell the format of --output {output}", "pass --format json|jsonl|csv|npz")
            if fmt not in report.FORMATS:
                hint = " (parquet: with --engine ray and --output DIR)" if fmt == "parquet" else ""
                raise UsageError(f"unknown --format {fmt!r}{hint}", f"choose one of {', '.join(report.FORMATS)}")
            if fmt != "table" and not output:
                output = "-"
            if fmt == "table" and output:
                raise UsageError("--format table goes to the terminal", "use json, jsonl, csv or npz with --output")
            if keep_samples and fmt != "npz":
                raise UsageError("--keep-samples needs --format npz")
        if input_path == "-" and ood == "-":
            raise UsageError("only one of --input and --ood can read stdin")
        targets = [t for t in (output, plot) if t and t != "-"]
        for t in targets:
            check_output_path(t, [model_path, input_path, labels_path, ood])
        from dropcli.training.loop import resolve_device

        dev = resolve_device(device)
        budget = None
        if max_memory:
            from dropcli.engines.runner import parse_size

            budget = parse_size(max_memory)
        if engine == "ray":
            from dropcli.engines.ray import require_ray

            require_ray()
        if not inject and (p is not None or after or layers):
            raise UsageError("--p/--after/--layers apply only with --inject")

        from dropcli.io.shards import open_source

        load_kw = load_opts(trust_pickle, imports, arch, input_shape)
        inject_opts = {"variant": inject, "p": p, "after": after, "layers": layers, "exclude": exclude,
                       "allow_output": allow_output} if inject else None
        runner = build_runner(model_path, load_kw, dev, inject_opts, log_inject=True)
        model = runner.model
        if method == "moments" and model.backend != "torch":
            raise UsageError("--method moments propagates moments through torch graphs; this is an ONNX model",
                             "use --method mc, or run --method moments on the torch model it was exported from")
        if runner.n_sites == 0:
            raise DropcliError(
                f"{model_path} has no dropout sites, so MC dropout has nothing to sample",
                "inject some on the fly with --inject standard --p 0.1 (or save one with `dropcli inject`)",
            )
        tau_from = "--tau"
        if tau is None and model.model_meta.get("tau"):
            tau, tau_from = float(model.model_meta["tau"]), "the model (dropcli finetune)"  # regression only
        specs = runner.input_specs()
        source = open_source(input_path, specs)
        n = source.n
        labels = D.read_labels(labels_path) if labels_path else source.labels
        if labels is not None and len(labels) != n:
            raise DropcliError(f"labels have {len(labels)} rows but the input has {n} examples", "give one label per example")
        ood_source = open_source(ood, specs, "OOD input") if ood else None

        if method == "moments":
            eng = _MomentsEngine(runner, batch_size)
        elif engine == "local":
            eng = _LocalEngine(runner, samples, seed, batch_size, budget)
        else:
            from dropcli.engines.ray import session

            ray_session = session(address, workers, STATE.debug)
            eng = _RayEngine(ray_session, runner, model_path, load_kw, inject_opts, dev, samples, seed, batch_size, budget,
                             tau, keep_samples, workers, address)
        with eng:
            K = eng.n_outputs(source)
            if task == "auto":
                int_labels = labels is None or (np.issubdtype(labels.dtype, np.integer) or np.all(labels == np.round(labels)))
                task = "classification" if K >= 2 and int_labels and labels is not None and labels.ndim == 1 or (K >= 2 and labels is None) else "regression"
            with_ood = ood_source is not None and task == "classification"
            results = eng.run_all([source, ood_source] if with_ood else [source], task, tau)
            res, ood_res = results[0], (results[1] if with_ood else None)
        log(f"[dim]{model_path}: {model.backend}/{model.format}, {runner.n_sites} dropout site(s); "
            f"{n} examples x {'analytic moments' if method == 'moments' else f'T={samples}'} on {dev}, {eng.describe()}[/]")
        per, eval_out = res.per, res.eval
        summary: dict = {"model": model_path, "backend": model.backend, "task": task, "method": method,
                         "samples": samples if method == "mc" else None, "seed": seed if method == "mc" else None,
                         "sites": runner.n_sites, "device": dev}
        if method == "moments":
            summary["moments"] = eng.report(task)
        arrays_out: dict[str, np.ndarray] = {}
        if task == "classification":
            if labels is not None:
                labels = _class_labels(labels, K)
            eval_probs = stats.to_probs(eval_out[None])[0]
            summary.update(stats.summary(per, labels, eval_probs=eval_probs, ood_per=ood_res.per if ood_res else None))
            cols = report.columns(task, per, labels, eval_probs)
        else:
            summary["variance"] = (f"sample variance over passes + 1/tau, tau = {tau:.6g} from {tau_from}" if tau else
                                   "sample variance over passes (no --tau: model precision not included)")
            summary["tau"] = tau
            summary["distribution"] = {"std": stats.distribution(per["std"].mean(-1))}
            if labels is not None:
                lab = labels.reshape(n, -1).astype(np.float64)
                if lab.shape[1] != K:
                    raise DropcliError(f"labels have {lab.shape[1]} columns but the model has {K} outputs")
                err_mc = per["mean"] - lab
                err_ev = eval_out.astype(np.float64) - lab
                var = np.maximum(per["var"], 1e-12)
                summary["mc"] = {"rmse": float(np.sqrt(np.mean(err_mc ** 2))), "mae": float(np.mean(np.abs(err_mc))),
                                 "gaussian_nll": float(np.mean(0.5 * np.log(2 * np.pi * var) + err_mc ** 2 / (2 * var)))}
                summary["eval"] = {"rmse": float(np.sqrt(np.mean(err_ev ** 2))), "mae": float(np.mean(np.abs(err_ev)))}
            cols = report.columns(task, per, labels, eval_out)
        if keep_samples:
            arrays_out["samples"] = res.samples
        gate_tripped = None
        if gate:
            name, limit = gate
            vals = per.get(name)
            if vals is None and method == "moments" and task == "classification":
                raise UsageError(f"--fail-above {name} needs samples; --method moments has no {name}",
                                 "gate on entropy, confidence, var or std, or use --method mc")
            if vals is None:
                raise UsageError(f"--fail-above {name} does not apply to a {task} task", f"choose from {', '.join(k for k in GATE_METRICS if k in per)}")
            mean_val = float(np.mean(vals))
            summary["gate"] = {"metric": name, "mean": mean_val, "limit": limit, "tripped": mean_val > limit}
            gate_tripped = mean_val > limit
        if plot:
            from dropcli.io.plot import write_plot

            write_plot(plot, task, per, labels, summary)
        if out_dir:
            parts = report.write_shards(out_dir, shard_fmt, summary, cols, [(a, b) for _, a, b in source.ranges()])
            log(f"wrote {shard_fmt} shards for {n} examples to {out_dir} ({parts} shard(s) + summary.json)")
        if fmt == "table":
            _print_table(summary, per, task)
            if method == "moments":
                _print_moments(summary["moments"])
        elif out_dir:
            sys.stdout.write(json.dumps(report._clean({"summary": summary}), indent=1) + "\n")
        else:
            report.write(output, fmt, summary, cols, arrays_out)
            if output != "-":
                log(f"wrote {fmt} report for {n} examples to {output}")
        if gate_tripped:
            g = summary["gate"]
            err.print(f"gate: mean {g['metric']} = {g['mean']:.4g} > {g['limit']:.4g}", highlight=False)
            raise typer.Exit(EXIT_GATE)


@dataclass
class EngineResult:
    per: dict  # per-example statistics (stats.per_example)
    eval: np.ndarray  # [N, K] deterministic outputs
    samples: np.ndarray | None  # [T, N, K] (local engine, or --keep-samples)


class _LocalEngine:
    """This process: run_mc over the whole input, then the statistics."""

    def __init__(self, runner, T, seed, batch_size, budget):
        self.runner, self.T, self.seed, self.batch_size, self.budget = runner, T, seed, batch_size, budget
        self.chunks = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def n_outputs(self, source) -> int:
        self._res = _run(self.runner, source.read_all(), self.T, self.seed, self.batch_size, self.budget, source.n, "MC dropout")
        self._src = source
        return self._res.samples.shape[-1]

    def run_all(self, sources, task, tau) -> list[EngineResult]:
        out = []
        for i, source in enumerate(sources):
            if source is self._src:
                res = self._res
            else:
                res = _run(self.runner, source.read_all(), self.T, self.seed, self.batch_size, self.budget, source.n,
                           "OOD" if i else "MC dropout")
            self.chunks += res.chunks
            out.append(EngineResult(stats.per_example(res.samples, task, tau), res.eval, res.samples))
        return out

    def describe(self) -> str:
        return f"{self.chunks} chunk(s)"


class _RayEngine:
    """A Ray Data actor pool (dropcli.ray_engine); the statistics come back per example."""

    def __init__(self, session, runner, model_path, load_kw, inject_opts, dev, T, seed, batch_size, budget, tau,
                 keep_samples, workers, address):
        self.session, self.runner = session, runner
        self.model_path, self.load_kw, self.inject_opts, self.dev = model_path, load_kw, inject_opts, dev
        self.mc = {"T": T, "seed": seed, "batch_size": batch_size, "budget": budget, "device": dev, "tau": tau,
                   "keep_samples": keep_samples}
        self.workers, self.address = workers, address

    def __enter__(self):
        from dropcli.engines.ray import model_payload, plan_workers

        info = self.session.__enter__()
        try:
            self.actors, self.threads = plan_workers(self.workers, info["cluster_cpus"], not self.address)
            if self.actors < self.workers:
                log(f"[dim]--workers {self.workers}: this machine has {info['cluster_cpus']} CPU(s), using {self.actors} worker(s)[/]")
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

    def run_all(self, sources, task, tau) -> list[EngineResult]:
        """Every source on one actor pool (the model is loaded once per actor for all of them)."""
        from dropcli.engines.runner import check_degenerate_examples
        from dropcli.engines.ray import run

        mc = dict(self.mc, task=task, as_probs=None)
        total = sum(src.n for src in sources)
        with _progress("MC dropout" if len(sources) == 1 else "MC dropout (input + OOD)", total) as advance:
            results = run(sources, self.model, mc, self.actors, self.threads, advance)
        out = []
        for i, (source, cols) in enumerate(zip(sources, results)):
            check_degenerate_examples(cols["degenerate"], self.mc["T"])
            if task == "classification":
                # to_probs decides over ALL samples (an AND over examples): redo the units that decided otherwise alone
                flags = cols["as_probs"]
                decision = bool(flags.all())
                redo = [dict(u, src=0) for u in source.units(_unit_rows(source, self.actors, self.mc["batch_size"]))
                        if bool(flags[u["start"]]) != decision]
                if redo:
                    again = run([source], self.model, dict(mc, as_probs=decision), self.actors, self.threads,
                                lambda k: None, redo)[0]
                    rows = again["index"]
                    for c in cols:
                        cols[c][rows] = again[c]
            per = {k[4:]: v for k, v in cols.items() if k.startswith("per_")}
            samples = np.ascontiguousarray(np.swapaxes(cols["samples"], 0, 1)) if "samples" in cols else None
            out.append(EngineResult(per, cols["eval"], samples))
        self.n_units = sum(len(src.units(_unit_rows(src, self.actors, self.mc["batch_size"]))) for src in sources)
        return out

    def describe(self) -> str:
        return f"Ray: {self.actors} worker(s) x {self.threads} CPU(s), {self.n_units} unit(s)"


class _MomentsEngine:
    """--method moments: analytic per-example moments (dropcli.moments), no sampling."""

    def __init__(self, runner, batch_size):
        self.runner, self.batch_size = runner, batch_size
        self.steps: list[dict] = []
        self.probs = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _moments(self, source):
        from dropcli.engines.moments import run_moments

        xs = source.read_all()
        with _progress("moments", source.n) as advance:
            mean, var, probs, steps = run_moments(self.runner.model, xs, self.batch_size, self.runner.device_name)
            advance(source.n)
        self.steps = self.steps or steps
        self.probs = probs
        return mean, var, probs, self.runner.run_eval(xs)

    def n_outputs(self, source) -> int:
        self._first = (source, self._moments(source))
        return self._first[1][0].shape[-1]

    def run_all(self, sources, task, tau) -> list[EngineResult]:
        from dropcli.engines.moments import per_example

        out = []
        for source in sources:
            mean, var, probs, ev = self._first[1] if source is self._first[0] else self._moments(source)
            out.append(EngineResult(per_example(mean, var, probs, task, tau), ev, None))
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


def _print_moments(rec: dict) -> None:
    t = Table(title="--method moments: the rule at each layer")
    for c in ("node", "op", "rule", "exact", "note"):
        t.add_column(c)
    from rich.markup import escape

    for s in rec["layers"]:
        t.add_row(escape(s["node"]), escape(s["op"]), escape(s["rule"]), "yes" if s["exact"] else "[bold]approx[/]",
                  escape(s["note"]))
    t.caption = rec["output"]
    out.print(t)


def _unit_rows(source, actors, batch_size) -> int:
    from dropcli.engines.ray import unit_rows

    return unit_rows(source.n, actors, batch_size)


def build_runner(model_path: str, load_kw: dict, dev: str, inject_opts: dict | None, log_inject: bool = False):
    """Load a model and its MC runner (injecting sites on the fly if asked); both engines use it."""
    from dropcli.backends import load_model

    from dropcli.variants.weightdrop import refuse_per_pass

    model = load_model(model_path, **load_kw)
    if inject_opts:
        _inject_on_the_fly(model, **inject_opts, quiet=not log_inject)
    refuse_per_pass(model)
    return make_runner(model, dev)


def _class_labels(labels: np.ndarray, K: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise DropcliError(f"classification labels must be one class index per example, got shape {list(lab.shape)}")
    if not np.all(lab == np.round(lab)):
        raise DropcliError("classification labels must be integers", "or pass --task regression")
    lab = lab.astype(np.int64)
    if lab.min() < 0 or lab.max() >= K:
        raise DropcliError(f"labels range over [{lab.min()}, {lab.max()}] but the model has {K} classes")
    return lab


@contextlib.contextmanager
def _progress(what: str, n: int):
    """A rows-done bar on stderr (only on a terminal, not with --quiet); yields advance(k)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    show = not STATE.quiet and sys.stderr.isatty()
    with Progress(TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not show) as prog:
        task_id = prog.add_task(what, total=n)
        yield lambda k: prog.advance(task_id, k)


def _run(runner, xs, samples, seed, batch_size, budget, n, what):
    from dropcli.engines.runner import run_mc

    with _progress(what, n) as advance:
        return run_mc(runner, xs, samples, seed, batch_size, budget, progress=advance)


def _inject_on_the_fly(model, variant, p, after, layers, exclude, allow_output, quiet=False):
    from dropcli.backends.plan import apply_inject, plan_inject
    from dropcli.model.selection import Selection
    from dropcli.variants import get_variant

    spec = get_variant(variant)
    params = spec.resolve_params({"p": p})
    sel = Selection.from_options(after, layers, exclude, allow_output)
    done = apply_inject(model, spec, params, plan_inject(model, spec, sel))
    if not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
    log(f"[dim]injected {spec.name} ({shown}) at {len(done)} site(s), not saved[/]")


def _print_table(summary: dict, per: dict, task: str) -> None:
    how = f"T={summary['samples']}" if summary.get("samples") else "analytic moments"
    t = Table(title=f"{'MC dropout' if summary.get('samples') else 'Fast dropout'}: "
                    f"{summary['n'] if 'n' in summary else len(per['mean'])} examples, {how}, "
                    f"{summary['sites']} site(s), task={task}")
    if task == "classification":
        t.add_column("measure")
        for c in ("mean", "std", "median", "p95", "max"):
            t.add_column(c, justify="right")
        for m, d in summary["distribution"].items():
            t.add_row(m, *(f"{d[c]:.4f}" for c in ("mean", "std", "median", "p95", "max")))
        out.print(t)
        if "mc" in summary:
            mc_name = "MC" if summary.get("samples") else "moments"
            c = Table(title=f"with labels: {mc_name} vs deterministic pass")
            c.add_column("metric")
            c.add_column(mc_name, justify="right")
            c.add_column("eval", justify="right")
            for k in ("accuracy", "nll", "brier", "ece", "mce"):
                c.add_row(k, f"{summary['mc'][k]:.4f}", f"{summary['eval'][k]:.4f}" if "eval" in summary else "")
            for k, v in summary["accuracy_at_coverage"].items():
                c.add_row(f"accuracy @ {k} coverage", f"{v:.4f}", "")
            for k, v in summary["error_auroc"].items():
                c.add_row(f"error AUROC ({k})", f"{v:.4f}", "")
            out.print(c)
        if "ood" in summary:
            o = Table(title="OOD detection")
            o.add_column("measure")
            o.add_column("AUROC", justify="right")
            o.add_column("FPR95", justify="right")
            for k, v in summary["ood"].items():
                o.add_row(k, f"{v['auroc']:.4f}", f"{v['fpr95']:.4f}")
            out.print(o)
    else:
        t.add_column("quantity")
        t.add_column("value", justify="right")
        d = summary["distribution"]["std"]
        for c in ("mean", "median", "p95", "max"):
            t.add_row(f"predictive std ({c})", f"{d[c]:.4g}")
        for part in ("mc", "eval"):
            for k, v in summary.get(part, {}).items():
                t.add_row(f"{part} {k}", f"{v:.4g}")
        t.caption = summary["variance"]
        out.print(t)
