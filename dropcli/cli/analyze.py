"""`dropcli analyze`: how well does the deterministic pass stand in for the dropout ensemble?"""

from __future__ import annotations

import sys
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from dropcli.io import data as D
from dropcli.errors import DropcliError, UsageError
from dropcli.cli.common import (
    After, Arch, Exclude, Imports, InputShape, Layers, ModelArg, STATE, TrustPickle, err, handle_errors, load_opts, log,
    out, print_json,
)

HELP = """Ensemble vs weight scaling (Baldi & Sadowski 2013) on your own inputs.

Per dropout site, for the units of the layer after it (pre-activations S, outputs O), over T
MC masks: E (ensemble mean), G, G' and NWGM (for units in (0,1): logistic units and the
softmax output), O* (deterministic pass), Std(O), |E - NWGM|, |E - O*|, and the bounds
V <= E(1-E), G <= E, |E - NWGM| <= 2E(1-E)|1-2E| and Var(S) = sum w^2 I^2 Var(delta) with the
fraction of units violating each. For logistic units, the distance of the sampled NWGM from
the exact sigmoid(E[S]). For the output: MC mean, softmax NWGM and the deterministic pass side
by side (accuracy and NLL with labels, pairwise disagreement). Regularisation view: the
implicit penalty 0.5 * sum w^2 I^2 Var(delta) per layer at the current p.

p is the DROP probability, q = 1 - p the keep probability. --seed is bitwise reproducible.

Examples:

  dropcli analyze examples/digits_mlp.pt --input examples/digits_test.npz

  dropcli analyze model.pt2 --input x.npy --labels y.npy -T 200 --json > analysis.json

  dropcli analyze model.pt --input x.npz --layers 'fc*'

Exit codes: 0 ok, 1 error (e.g. no dropout sites), 2 usage error, 130 interrupted.
"""


def register(app: typer.Typer) -> None:
    @app.command("analyze", help=HELP)
    @handle_errors
    def analyze_cmd(
        model_path: str = ModelArg,
        input_path: str = typer.Option(..., "--input", "-i", help="Inputs: .npy, .npz (x/y), .pt, .csv, or - for stdin."),
        labels_path: Optional[str] = typer.Option(None, "--labels", help="Labels file (else the 'y' array of an .npz input)."),
        samples: int = typer.Option(100, "--samples", "-T", help="Number of MC masks T per example."),
        seed: int = typer.Option(0, "--seed", help="Random seed (bitwise reproducible on CPU)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
        batch_size: int = typer.Option(64, "--batch-size", help="Examples per chunk (results do not depend on it)."),
        task: str = typer.Option("auto", "--task", help="auto, classification or regression (the output section needs classification)."),
        after: Optional[List[str]] = After,
        layers: Optional[List[str]] = Layers,
        exclude: Optional[List[str]] = Exclude,
        json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        if samples < 2:
            raise UsageError(f"--samples must be >= 2 (variances need two masks), got {samples}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        if task not in ("auto", "classification", "regression"):
            raise UsageError(f"unknown --task {task!r}", "choose auto, classification or regression")
        from dropcli.backends import load_model
        from dropcli.training.loop import resolve_device
        from dropcli.cli.uncertainty import _class_labels, make_runner

        dev = resolve_device(device)
        model = load_model(model_path, **load_opts(trust_pickle, imports, arch, input_shape))
        runner = make_runner(model, dev)
        if runner.n_sites == 0:
            raise DropcliError(f"{model_path} has no stochastic dropout sites, so there is no ensemble to analyse",
                               "inject some first, e.g. `dropcli inject MODEL --variant standard --p 0.2 -o OUT`")
        specs = runner.input_specs()
        arrays = D.read_arrays(input_path)
        xs = D.bind(arrays, specs, "stdin" if input_path == "-" else input_path)
        n = len(xs[0])
        labels = D.read_labels(labels_path) if labels_path else next(
            (np.asarray(arrays[k]) for k in D.LABEL_KEYS if k in arrays and len(arrays) > 1), None)
        if labels is not None and len(labels) != n:
            raise DropcliError(f"labels have {len(labels)} rows but the input has {n} examples", "give one label per example")
        K = int(np.prod(runner.run_eval([x[:1] for x in xs]).shape[1:]))
        if task == "auto":
            task = "classification" if K >= 2 and (labels is None or labels.ndim == 1) else "regression"
        if labels is not None and task == "classification":
            labels = _class_labels(labels, K)
        if model.backend == "onnx":
            from dropcli.analysis.ensemble_onnx import analyze_onnx as analyze_fn
        else:
            from dropcli.analysis.ensemble_torch import analyze_torch as analyze_fn

        sel_names = _selected(model, after, layers, exclude)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        show = not STATE.quiet and sys.stderr.isatty()
        with Progress(TextColumn("[bold]analyze[/]"), BarColumn(), MofNCompleteColumn(), console=err, transient=True,
                      disable=not show) as prog:
            tid = prog.add_task("analyze", total=n)
            rep = analyze_fn(model, xs, labels if task == "classification" else None, samples, seed, batch_size, dev,
                                task == "classification", progress=lambda k: prog.advance(tid, k))
        rep.pop("_samples", None)
        if sel_names is not None:
            rep["sites"] = [s for s in rep["sites"] if sel_names(s["site"])]
            if not rep["sites"]:
                raise DropcliError("no dropout site matches the selection", "run `dropcli inspect MODEL` to see the site names")
        rep = {"model": model_path, "backend": model.backend, "n": n, "samples": samples, "seed": seed, "task": task, **rep}
        log(f"[dim]{model_path}: {len(rep['sites'])} site(s), {n} examples x T={samples}[/]")
        if json_out:
            print_json(rep)
        else:
            _print(rep)


def _selected(model, after, layers, exclude):
    """A predicate on site names from --layers/--exclude globs (None: all sites)."""
    if not (after or layers or exclude):
        return None
    import fnmatch

    pats = [p for v in (layers or []) for p in v.split(",") if p]
    ex = [p for v in (exclude or []) for p in v.split(",") if p]
    if after:
        raise UsageError("--after selects where to inject; analyze selects existing sites with --layers/--exclude")

    def keep(name: str) -> bool:
        ok = not pats or any(fnmatch.fnmatch(name, p) for p in pats)
        return ok and not any(fnmatch.fnmatch(name, p) for p in ex)

    return keep


def _fmt(d: dict | None, key: str = "mean") -> str:
    return "" if not d else f"{d[key]:.4g}"


def _print(rep: dict) -> None:
    cols = ["E", "O*", "Std(O)", "|E-O*|", "G", "G'", "NWGM", "|E-NWGM|", "|E-G-V|"]
    t = Table(title=f"Ensemble vs deterministic pass: {rep['n']} examples, T={rep['samples']} (means over units and examples)")
    t.add_column("site")
    t.add_column("units")
    t.add_column("q", justify="right")
    for c in cols:
        t.add_column(c, justify="right")
    for s in rep["sites"]:
        q = s.get("quantities", {})
        t.add_row(s["site"], f"{s.get('units')} ({s['unit_kind']}, {s.get('n_units', '-')})",
                  "" if s["keep_q"] is None else f"{s['keep_q']:.3g}",
                  *((_fmt(q.get(c)) if c in q else ("n/a" if "quantities" in s else "")) for c in cols))
    out.print(t)
    b = Table(title="Bounds (fraction of unit-examples violating)")
    b.add_column("site")
    b.add_column("bound")
    b.add_column("violations", justify="right")
    b.add_column("fraction", justify="right")
    for s in rep["sites"]:
        if s.get("skipped"):
            b.add_row(s["site"], f"skipped: {s['skipped']}", "", "")
        for k, v in s.get("bounds", {}).items():
            b.add_row(s["site"], k, str(v["violations"]), f"{v['fraction']:.4f}")
        for k in ("|NWGM - sigmoid(E[S])|", "|NWGM - sigmoid(mean S)|"):
            if k in s.get("quantities", {}):
                b.add_row(s["site"], f"logistic: mean {k}", "", f"{s['quantities'][k]['mean']:.3g}")
        if "Var(S) formula" in s.get("quantities", {}):
            q = s["quantities"]
            b.add_row(s["site"], "Var(S): sampled / formula (means)", "",
                      f"{q['Var(S) sampled']['mean']:.4g} / {q['Var(S) formula']['mean']:.4g}")
    out.print(b)
    r = Table(title="Regularisation view: implicit penalty 0.5 * sum w^2 I^2 Var(delta) per layer (mean over examples)")
    r.add_column("site")
    r.add_column("layer")
    r.add_column("penalty", justify="right")
    r.add_column("note")
    for s in rep["sites"]:
        r.add_row(s["site"], str(s.get("layer")), f"{s['penalty']:.4g}" if "penalty" in s else "n/a", s.get("penalty_note", ""))
    out.print(r)
    if "output" in rep:
        o = Table(title="Output: three prediction rules")
        o.add_column("rule")
        o.add_column("accuracy", justify="right")
        o.add_column("NLL", justify="right")
        for k, v in rep["output"]["rules"].items():
            o.add_row(k, f"{v['accuracy']:.4f}" if "accuracy" in v else "-", f"{v['nll']:.4f}" if "nll" in v else "-")
        out.print(o)
        d = Table(title="Disagreement between rules")
        d.add_column("pair")
        d.add_column("argmax differs", justify="right")
        d.add_column("mean |prob diff|", justify="right")
        for k, v in rep["output"]["disagreement"].items():
            d.add_row(k, f"{v['argmax']:.4f}", f"{v['mean_abs_prob']:.4g}")
        out.print(d)
