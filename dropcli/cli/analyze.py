"""`dropcli analyze`: how well does the deterministic pass stand in for the dropout ensemble?"""

from __future__ import annotations

from typing import List, Optional

import typer

from dropcli.cli.common import (
    After, Arch, Exclude, Imports, InputShape, Layers, ModelArg, TrustPickle, handle_errors, out, print_json,
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
        from dropcli.api.analyze import analyze
        from dropcli.cli.render import log_dim, progress

        rep = analyze(model_path, input_path, labels_path, T=samples, seed=seed, device=device, batch_size=batch_size,
                      task=task, after=after, layers=layers, exclude=exclude, trust_pickle=trust_pickle, imports=imports,
                      arch=arch, input_shape=input_shape, progress=progress, log=log_dim)
        if json_out:
            print_json(rep)
        else:
            _print(rep)


def _fmt(d: dict | None, key: str = "mean") -> str:
    return "" if not d else f"{d[key]:.4g}"


def _print(rep: dict) -> None:
    from rich.table import Table

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
