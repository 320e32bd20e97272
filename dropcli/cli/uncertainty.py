"""`dropcli uncertainty`: Monte-Carlo dropout inference with per-example uncertainty."""

from __future__ import annotations

import sys
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from .. import data as D
from .. import report, stats
from ..errors import DropcliError, UsageError
from ..fsutil import check_output_path
from .common import (
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
        from ..mc_onnx import OnnxRunner

        return OnnxRunner(model, device)
    from ..mc import TorchRunner

    return TorchRunner(model, device)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DropcliError("--device cuda was asked for, but no CUDA GPU is available", "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r}", "choose cpu, cuda or auto")
    return device


def register(app: typer.Typer) -> None:
    @app.command("uncertainty", help=HELP)
    @handle_errors
    def uncertainty_cmd(
        model_path: str = ModelArg,
        input_path: str = typer.Option(..., "--input", "-i", help="Inputs: .npy, .npz (arrays named after the model inputs; x/y), .pt, .csv, or - for stdin."),
        labels_path: Optional[str] = typer.Option(None, "--labels", help="Labels file (else the 'y' array of an .npz input)."),
        samples: int = typer.Option(50, "--samples", "-T", help="Number of stochastic passes T."),
        seed: int = typer.Option(0, "--seed", help="Random seed (bitwise reproducible on CPU)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
        batch_size: int = typer.Option(256, "--batch-size", help="Examples per chunk (results do not depend on it)."),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for one chunk, e.g. 512M (default: a quarter of free RAM)."),
        task: str = typer.Option("auto", "--task", help="auto, classification or regression."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Write per-example results here ('-' = stdout)."),
        fmt: Optional[str] = typer.Option(None, "--format", help="table, json, jsonl, csv or npz (default: from --output's extension)."),
        keep_samples: bool = typer.Option(False, "--keep-samples", help="With npz: include the raw [T, N, K] samples."),
        plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG: uncertainty histograms, reliability diagram, risk-coverage."),
        tau: Optional[float] = typer.Option(None, "--tau", help="Regression: model precision; adds 1/tau to the variance."),
        ood: Optional[str] = typer.Option(None, "--ood", help="Out-of-distribution inputs: adds AUROC and FPR95 per measure."),
        fail_above: Optional[str] = typer.Option(None, "--fail-above", help=f"METRIC=VALUE: exit {EXIT_GATE} when the mean of METRIC exceeds VALUE."),
        inject: Optional[str] = typer.Option(None, "--inject", help="Inject this variant on the fly (not saved) when the model has no dropout."),
        p: Optional[float] = typer.Option(None, "--p", help="With --inject: drop probability."),
        after: Optional[List[str]] = After,
        layers: Optional[List[str]] = Layers,
        exclude: Optional[List[str]] = Exclude,
        allow_output: bool = AllowOutput,
        json_out: bool = typer.Option(False, "--json", help="Same as --format json --output - (JSON on stdout)."),
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
        gate = _parse_gate(fail_above)
        if json_out:
            fmt, output = "json", output or "-"
        fmt = fmt or report.format_from_path(output) or ("table" if not output else None)
        if fmt is None:
            raise UsageError(f"can't tell the format of --output {output}", "pass --format json|jsonl|csv|npz")
        if fmt not in report.FORMATS:
            raise UsageError(f"unknown --format {fmt!r}", f"choose one of {', '.join(report.FORMATS)}")
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
        dev = resolve_device(device)
        budget = None
        if max_memory:
            from ..mc import parse_size

            budget = parse_size(max_memory)

        from ..backends import load_model
        from ..mc import run_mc

        model = load_model(model_path, **load_opts(trust_pickle, imports, arch, input_shape))
        runner = make_runner(model, dev)
        if inject:
            _inject_on_the_fly(model, inject, p, after, layers, exclude, allow_output)
            runner = make_runner(model, dev)
        elif p is not None or after or layers:
            raise UsageError("--p/--after/--layers apply only with --inject")
        if runner.n_sites == 0:
            raise DropcliError(
                f"{model_path} has no dropout sites, so MC dropout has nothing to sample",
                "inject some on the fly with --inject standard --p 0.1 (or save one with `dropcli inject`)",
            )
        specs = runner.input_specs()
        arrays = D.read_arrays(input_path)
        src = "stdin" if input_path == "-" else input_path
        xs = D.bind(arrays, specs, src)
        n = len(xs[0])
        labels = None
        if labels_path:
            labels = D.read_labels(labels_path)
        else:
            for k in D.LABEL_KEYS:
                if k in arrays and len(arrays) > 1:
                    labels = np.asarray(arrays[k])
                    break
        if labels is not None and len(labels) != n:
            raise DropcliError(f"labels have {len(labels)} rows but the input has {n} examples", "give one label per example")

        result = _run(runner, xs, samples, seed, batch_size, budget, n, "MC dropout")
        log(f"[dim]{model_path}: {model.backend}/{model.format}, {runner.n_sites} dropout site(s); "
            f"{n} examples x T={samples} on {dev}, {result.chunks} chunk(s)[/]")
        probs_like = result.samples
        K = probs_like.shape[-1]
        if task == "auto":
            int_labels = labels is None or (np.issubdtype(labels.dtype, np.integer) or np.all(labels == np.round(labels)))
            task = "classification" if K >= 2 and int_labels and labels is not None and labels.ndim == 1 or (K >= 2 and labels is None) else "regression"
        summary: dict = {"model": model_path, "backend": model.backend, "task": task, "samples": samples, "seed": seed,
                         "sites": runner.n_sites, "device": dev}
        arrays_out: dict[str, np.ndarray] = {}
        if task == "classification":
            if labels is not None:
                labels = _class_labels(labels, K)
            probs = stats.to_probs(result.samples)
            per = stats.classification(probs)
            eval_probs = stats.to_probs(result.eval[None])[0]
            ood_per = None
            if ood:
                oxs = D.bind(D.read_arrays(ood), specs, ood)
                ores = _run(runner, oxs, samples, seed, batch_size, budget, len(oxs[0]), "OOD")
                ood_per = stats.classification(stats.to_probs(ores.samples))
            summary.update(stats.summary(per, labels, eval_probs=eval_probs, ood_per=ood_per))
            cols = report.columns(task, per, labels, eval_probs)
        else:
            per = stats.regression(result.samples, tau)
            summary["variance"] = "sample variance over passes + 1/tau" if tau else "sample variance over passes (no --tau: model precision not included)"
            summary["distribution"] = {"std": stats.distribution(per["std"].mean(-1))}
            if labels is not None:
                lab = labels.reshape(n, -1).astype(np.float64)
                if lab.shape[1] != K:
                    raise DropcliError(f"labels have {lab.shape[1]} columns but the model has {K} outputs")
                err_mc = per["mean"] - lab
                err_ev = result.eval.astype(np.float64) - lab
                var = np.maximum(per["var"], 1e-12)
                summary["mc"] = {"rmse": float(np.sqrt(np.mean(err_mc ** 2))), "mae": float(np.mean(np.abs(err_mc))),
                                 "gaussian_nll": float(np.mean(0.5 * np.log(2 * np.pi * var) + err_mc ** 2 / (2 * var)))}
                summary["eval"] = {"rmse": float(np.sqrt(np.mean(err_ev ** 2))), "mae": float(np.mean(np.abs(err_ev)))}
            cols = report.columns(task, per, labels, result.eval)
        if keep_samples:
            arrays_out["samples"] = result.samples
        gate_tripped = None
        if gate:
            name, limit = gate
            vals = per.get(name)
            if vals is None:
                raise UsageError(f"--fail-above {name} does not apply to a {task} task", f"choose from {', '.join(k for k in GATE_METRICS if k in per)}")
            mean_val = float(np.mean(vals))
            summary["gate"] = {"metric": name, "mean": mean_val, "limit": limit, "tripped": mean_val > limit}
            gate_tripped = mean_val > limit
        if plot:
            from ..plot import write_plot

            write_plot(plot, task, per, labels, summary)
        if fmt == "table":
            _print_table(summary, per, task)
        else:
            report.write(output, fmt, summary, cols, arrays_out)
            if output != "-":
                log(f"wrote {fmt} report for {n} examples to {output}")
        if gate_tripped:
            g = summary["gate"]
            err.print(f"gate: mean {g['metric']} = {g['mean']:.4g} > {g['limit']:.4g}", highlight=False)
            raise typer.Exit(EXIT_GATE)


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


def _run(runner, xs, samples, seed, batch_size, budget, n, what):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..mc import run_mc

    show = not STATE.quiet and sys.stderr.isatty()
    with Progress(TextColumn(f"[bold]{what}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not show) as prog:
        task_id = prog.add_task(what, total=n)
        return run_mc(runner, xs, samples, seed, batch_size, budget, progress=lambda k: prog.advance(task_id, k))


def _inject_on_the_fly(model, variant, p, after, layers, exclude, allow_output):
    from ..plan import apply_inject, plan_inject
    from ..sites import Selection
    from ..variants import get_variant

    spec = get_variant(variant)
    params = spec.resolve_params({"p": p})
    sel = Selection.from_options(after, layers, exclude, allow_output)
    done = apply_inject(model, spec, params, plan_inject(model, spec, sel))
    log(f"[dim]injected {spec.name} (p={params['p']}) at {len(done)} site(s), not saved[/]")


def _print_table(summary: dict, per: dict, task: str) -> None:
    t = Table(title=f"MC dropout: {summary['n'] if 'n' in summary else len(per['mean'])} examples, T={summary['samples']}, "
                    f"{summary['sites']} site(s), task={task}")
    if task == "classification":
        t.add_column("measure")
        for c in ("mean", "std", "median", "p95", "max"):
            t.add_column(c, justify="right")
        for m, d in summary["distribution"].items():
            t.add_row(m, *(f"{d[c]:.4f}" for c in ("mean", "std", "median", "p95", "max")))
        out.print(t)
        if "mc" in summary:
            c = Table(title="with labels: MC vs deterministic pass")
            c.add_column("metric")
            c.add_column("MC", justify="right")
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
