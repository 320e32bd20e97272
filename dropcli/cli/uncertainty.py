"""`dropcli uncertainty`: Monte-Carlo dropout inference with per-example uncertainty."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from dropcli.errors import UsageError
from dropcli.cli.common import (
    After, AllowOutput, Arch, Exclude, Imports, InputShape, Layers, ModelArg, TrustPickle, STATE,
    err, handle_errors, log, out,
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

Output kinds (--task auto; the report's "output" says which and why): a vector of K logits
per example is one classification per example. Outputs [N, S, V] (a language model's logits)
are classified per position: a softmax over the last axis, statistics per position, summaries
per sequence (mean and max entropy, mutual information... over its positions); labels [N, S]
with -100 at positions not scored. JSON/JSONL write per-position fields as lists, NPZ as
[N, S] arrays, CSV one row per position. Feature vectors (rows of unit L2 norm such as sentence
embeddings, or a LayerNorm's output) are not soft-maxed: they are reported per dimension as
regression, with a warning (--task classification forces a softmax).

Exit codes: 0 ok, 1 error, 2 usage error, {EXIT_GATE} --fail-above tripped, 130 interrupted.
"""

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
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 512M (default: a quarter of free RAM). With --format jsonl or csv to a file or '-', records are written as computed and the peak RSS stays within the model's baseline + this budget + 10%, whatever the number of examples; other formats hold all results in memory."),
        task: str = typer.Option("auto", "--task", help="auto, classification, token-classification ([N, S, V] outputs: a softmax over the last axis per position) or regression. auto decides from the output's shape, the layer that makes it and its values (see the output kinds below)."),
        output: Optional[str] = typer.Option(None, "--output", "-o", help="Write per-example results here ('-' = stdout)."),
        fmt: Optional[str] = typer.Option(None, "--format", help="table, json, jsonl, csv, npz or parquet (default: from --output's extension). jsonl, csv and parquet are written as computed (see --max-memory)."),
        keep_samples: bool = typer.Option(False, "--keep-samples", help="With npz: include the raw [T, N, K] samples."),
        plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG: uncertainty histograms, reliability diagram, risk-coverage."),
        tau: Optional[float] = typer.Option(None, "--tau", help="Regression: model precision; adds 1/tau to the variance (default: the tau `dropcli finetune` stored in the model, if any)."),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="Classification: divide each pass's logits by this before the softmax (default: the temperature `dropcli finetune --calibrate` stored in the model, if any)."),
        calibration: bool = typer.Option(True, "--calibration/--no-calibration", help="Use the temperature stored in the model (--no-calibration: the raw MC predictive)."),
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
        from dropcli.api.uncertainty import check_uncertainty_args, uncertainty
        from dropcli.io import report
        from dropcli.io.files import check_output_path

        check_uncertainty_args(T=samples, batch_size=batch_size, task=task, tau=tau, engine=engine, method=method,
                               keep_samples=keep_samples, address=address, workers=workers, fail_above=fail_above,
                               temperature=temperature, calibration=calibration)
        if samples == 1 and method == "mc":
            log("[yellow]warning:[/] -T 1 is one pass per example, so there is no spread over passes: mutual "
                "information, variation ratio and std come out 0 (use -T 2 or more)")
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
                raise UsageError(f"can't tell the format of --output {output}", "pass --format json|jsonl|csv|npz|parquet")
            if fmt not in report.FORMATS:
                raise UsageError(f"unknown --format {fmt!r}", f"choose one of {', '.join(report.FORMATS)}")
            if fmt != "table" and not output:
                output = "-"
            if fmt == "parquet" and output == "-":
                raise UsageError("--format parquet is written to a file, not to stdout",
                                 "give --output FILE.parquet, or use --format jsonl or csv for a stream")
            if fmt == "table" and output:
                raise UsageError("--format table goes to the terminal", "use json, jsonl, csv or npz with --output")
            if keep_samples and fmt != "npz":
                raise UsageError("--keep-samples needs --format npz")
        if input_path == "-" and ood == "-":
            raise UsageError("only one of --input and --ood can read stdin")
        targets = [t for t in (output, plot) if t and t != "-"]
        for t in targets:
            check_output_path(t, [model_path, input_path, labels_path, ood])

        from dropcli.cli.render import log_dim, progress

        r = uncertainty(model_path, input_path, labels=labels_path, T=samples, method=method, seed=seed, device=device,
                        batch_size=batch_size, max_memory=max_memory, task=task, tau=tau, temperature=temperature,
                        calibration=calibration, ood=ood or None,
                        fail_above=fail_above, inject=inject, p=p, after=after, layers=layers, exclude=exclude,
                        allow_output=allow_output, engine=engine, address=address, workers=workers,
                        keep_samples=keep_samples, trust_pickle=trust_pickle, imports=imports, arch=arch,
                        input_shape=input_shape, debug=STATE.debug, progress=progress, log=log_dim,
                        output=None if plot or out_dir else output, output_format=fmt)
        summary, per, task = r.summary, r.per, r.task
        n = r.n
        if plot:
            from dropcli.analysis.plot import write_plot

            write_plot(plot, task, per, r.labels, summary)
        if out_dir:
            parts = report.write_shards(out_dir, shard_fmt, summary, r.columns, [(a, b) for _, a, b in r.source.ranges()])
            log(f"wrote {shard_fmt} shards for {n} examples to {out_dir} ({parts} shard(s) + summary.json)")
        if fmt == "table":
            _print_table(summary, per, task)
            if method == "moments":
                _print_moments(summary["moments"])
        elif out_dir:
            sys.stdout.write(json.dumps({"summary": r.to_json(examples=False)["summary"]}, indent=1) + "\n")
        elif r.streamed:
            if output != "-":
                log(f"wrote {fmt} records for {n} examples to {output} (streamed as computed)")
        else:
            report.write(output, fmt, summary, r.columns, {"samples": r.samples} if keep_samples else {})
            if output != "-":
                log(f"wrote {fmt} report for {n} examples to {output}")
        if r.tripped:
            g = summary["gate"]
            err.print(f"gate: mean {g['metric']} = {g['mean']:.4g} > {g['limit']:.4g}", highlight=False)
            raise typer.Exit(EXIT_GATE)


def _print_moments(rec: dict) -> None:
    from rich.table import Table

    t = Table(title="--method moments: the rule at each layer")
    for c in ("node", "op", "rule", "exact", "note"):
        t.add_column(c)
    from rich.markup import escape

    for s in rec["layers"]:
        t.add_row(escape(s["node"]), escape(s["op"]), escape(s["rule"]), "yes" if s["exact"] else "[bold]approx[/]",
                  escape(s["note"]))
    t.caption = rec["output"]
    out.print(t)


def _print_table(summary: dict, per: dict, task: str) -> None:
    from rich.table import Table

    how = f"T={summary['samples']}" if summary.get("samples") else "analytic moments"
    t = Table(title=f"{'MC dropout' if summary.get('samples') else 'Fast dropout'}: "
                    f"{summary['n'] if 'n' in summary else len(per['mean'])} examples, {how}, "
                    f"{summary['sites']} site(s), task={task}"
                    + (" (output: embedding)" if summary.get("output", {}).get("kind") == "embedding" else ""))
    if task == "token-classification":
        t.title += f"; per position: {summary['positions_per_example']} positions x {summary['output']['shape'][1]} classes"
    if task in ("classification", "token-classification"):
        t.add_column("measure" if task == "classification" else f"measure (per position, {summary['n_positions']} scored)")
        for c in ("mean", "std", "median", "p95", "max"):
            t.add_column(c, justify="right")
        for m, d in summary["distribution"].items():
            t.add_row(m, *(f"{d[c]:.4f}" for c in ("mean", "std", "median", "p95", "max")))
        if "calibration" in summary:
            cal = summary["calibration"]
            t.caption = f"calibrated: logits / {cal['temperature']:.4g} (temperature from {cal['from']})"
        out.print(t)
        if "sequence_distribution" in summary:
            q = Table(title="per sequence: over its scored positions")
            q.add_column("measure")
            for c in ("mean", "std", "median", "p95", "max"):
                q.add_column(c, justify="right")
            for m, d in summary["sequence_distribution"].items():
                q.add_row(m, *(f"{d[c]:.4f}" for c in ("mean", "std", "median", "p95", "max")))
            out.print(q)
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
