"""`dropcli prune`: compress a trained model by variational-dropout scores, and shrink it for real."""

from __future__ import annotations

from typing import List, Optional

import typer

from dropcli.cli.common import (Arch, Imports, InputShape, Json, ModelArg, TrustPickle, handle_errors, log, model_output, out,
                                print_json, report_output, shown, write_report)

HELP = """Prune a trained model with sparse variational dropout (default) or structured Bayesian pruning,
then remove dead neurons and channels for real.

sparse-vd (Molchanov et al. 2017): every Linear / Conv1d / Conv2d gets a learned per-weight noise
variance (log sigma^2 starts at -10); fine-tuning minimises  mean loss + beta * sum KL / N  with beta
ramped from 0 to --kl-weight (default 0.5) over the first half of the epochs; weights with log alpha > --threshold
become 0, and the kept weights are fine-tuned without noise for --retrain-epochs (pruned ones stay 0). sbp (Neklyudov et al. 2017): log-normal noise per neuron / channel; units with SNR <= 1 go.

Then every hidden unit with no live inputs (its constant output is folded into the next layer's bias
where that is exact) or no live outputs is removed, with Torch-Pruning's dependency graph slicing the
layers around it. The output is a plain model (nn.Linear / nn.Conv, no dropcli classes) in the input's
format. Accuracy before/after comes from --val, or from a seeded 20% held-out split of --data.

Accuracy budget: --max-drop PTS bounds what the pruned model may lose on that validation data
(accuracy points for classification, percent of the validation loss for regression), at 1.5
standard errors of the measured drop. Without --threshold, prune then cuts the trained log alphas at
a sweep of thresholds, scores each cut on validation, retrains the promising ones and keeps the most
compressive model within the budget; when none fits, it trains once more with half the KL weight.
The report (--json, --plot) carries the trade-off curve it walked (docs/prune.md).

Exit codes: 0 written, 1 error, 2 usage error, 4 nothing written because no pruned model stays within
--max-drop or the pruned model would not be smaller than the input (on disk and in parameters),
130 interrupted. With 4, --json and --report still carry what was measured; --allow-larger writes a
model that is not smaller anyway.

Data: .npz with x and y, a .pt dict / tuple (x, y), or a .csv whose last column is the label.

Examples:

  dropcli prune mlp.pt --data train.npz --val val.npz --max-drop 1 -o mlp_pruned.pt

  dropcli prune cnn.onnx --data train.npz --method sbp -o cnn_pruned.onnx --json

  dropcli prune reg.pt2 --data train.csv --task regression -o small.pt2 --plot log_alpha.png
"""


def register(app: typer.Typer) -> None:
    @app.command("prune", help=HELP)
    @handle_errors
    def prune_cmd(
        model_path: str = ModelArg,
        output: str = typer.Option(..., "-o", "--output", help="Output model path (written atomically, in the input's format; - = stdout)."),
        data: Optional[str] = typer.Option(None, "--data", help="Training data: .npz (x, y), .pt or .csv (last column = label)."),
        val: Optional[str] = typer.Option(None, "--val", help="Validation data (default: a seeded 20% split held out of --data)."),
        method: str = typer.Option("sparse-vd", "--method", help="sparse-vd (per weight) or sbp (per neuron / channel)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Fine-tuning epochs (default 100)."),
        max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Most validation accuracy the pruned model may lose, in points (regression: % of the loss); prune picks the most compressive cut within it. Exit 4 when nothing fits."),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="sparse-vd: zero weights with log alpha above this (3 = drop rate 0.95). Default: chosen within --max-drop, else 3. Not with sbp."),
        kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Final KL weight beta (ramped up from 0 over the first half of training). Default 0.5."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate for the weights (the noise parameters get 10x). Default 3e-3."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size (default 64)."),
        retrain_epochs: Optional[int] = typer.Option(None, "--retrain-epochs", help="Then fine-tune only the kept weights, without noise, for this many epochs (default 10, or --epochs if fewer; 0 skips)."),
        task: str = typer.Option("auto", "--task", help="classification (cross-entropy), regression (MSE) or auto (integer labels = classification)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (training only; the output is a CPU model)."),
        seed: int = typer.Option(0, "--seed", help="Random seed: split, shuffling and noise (bitwise reproducible on CPU)."),
        report_path: Optional[str] = typer.Option(None, "--report", help="Also write the report as JSON to this file."),
        plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG histogram of log alpha (sbp: log SNR) per layer."),
        force: bool = typer.Option(False, "--force", help="Allow -o to be the input path (overwrites it)."),
        allow_larger: bool = typer.Option(False, "--allow-larger", help="Write the pruned model even when it is not smaller than the input (exit 0, with a warning) instead of exit 4."),
        json_out: bool = Json,
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        from dropcli.api.prune import check_prune_args, prune
        from dropcli.cli.render import progress
        from dropcli.io.files import check_output_path

        from dropcli.errors import NotMet

        check_prune_args(method=method, epochs=epochs, threshold=threshold, kl_weight=kl_weight, lr=lr,
                         batch_size=batch_size, retrain_epochs=retrain_epochs, task=task, device=device, plot=plot,
                         max_drop=max_drop)
        inputs = [model_path] + [p for p in (data, val) if p]
        model_output(output, inputs, force=force, json_out=json_out, others={"--report": report_path, "--plot": plot})
        report_output(report_path, json_out)
        for extra in (report_path, plot):
            if extra and extra != "-":
                check_output_path(extra, inputs + [output])
        try:
            report = prune(model_path, data, output, val=val, method=method, epochs=epochs, threshold=threshold,
                           max_drop=max_drop, kl_weight=kl_weight, lr=lr, batch_size=batch_size, retrain_epochs=retrain_epochs,
                           task=task, device=device, seed=seed, plot=plot, force=force, allow_larger=allow_larger, trust_pickle=trust_pickle,
                           imports=imports, arch=arch, input_shape=input_shape, progress=progress)
        except NotMet as e:
            # exit 4 with the one-line reason; the report still says what was measured
            if e.report is not None:
                write_report(e.report, report_path)
                if json_out:
                    print_json(e.report)
                else:
                    _print(e.report)
            raise
        write_report(report, report_path)
        for w in report["summary"].get("warnings", []):
            log(f"[yellow]warning:[/] {w}")
        if json_out:
            print_json(report)
            return
        _print(report)


def _print(report: dict) -> None:
    from rich.table import Table

    s = report["summary"]
    _print_curve(report.get("curve") or [], s)
    if not report["layers"]:
        return
    t = Table(title=f"prune ({s['method']}): {shown(s['input'], 'stdin')} -> {shown(s['output'])} ({s['format']})")
    for c in ("layer", "type", "shape before", "shape after", "weights kept", "sparsity", "units removed"):
        t.add_column(c, justify="left" if c in ("layer", "type") else "right")
    for r in report["layers"]:
        t.add_row(r["layer"], r["type"], "x".join(map(str, r["shape_before"])),
                  "x".join(map(str, r["shape_after"])) if r["shape_after"] else "-",
                  f"{r['weights_kept']}/{r['weights_before']}", f"{r['sparsity']:.1%}",
                  f"{r['units_removed']}/{r['units_before']}")
    out.print(t)
    note = {"not_smaller": " (NOT WRITTEN: not smaller than the input)", "written_not_smaller": " (written: not smaller than the input)"}
    tot = Table(title="totals" + note.get(s["outcome"], ""), show_header=True)
    tot.add_column("")
    tot.add_column("before", justify="right")
    tot.add_column("after", justify="right")
    tot.add_column("ratio", justify="right")
    tot.add_row("nonzero weights (Linear/Conv)", str(s["weights_before"]), str(s["weights_after"]), f"{s['compression']:.1f}x")
    tot.add_row("parameters (all)", str(s["params_before"]), str(s["params_after"]), f"{s['params_before'] / max(s['params_after'], 1):.1f}x")
    tot.add_row("nonzero parameters", str(s["nonzero_params_before"]), str(s["nonzero_params_after"]), f"{s['param_compression']:.1f}x")
    tot.add_row("size on disk (bytes)", str(s["size_before"]), str(s["size_after"]), f"{s['size_before'] / max(s['size_after'], 1):.1f}x")
    if "val_accuracy_before" in s:
        tot.add_row("val accuracy", f"{s['val_accuracy_before']:.4f}", f"{s['val_accuracy_after']:.4f}",
                    f"{100 * (s['val_accuracy_after'] - s['val_accuracy_before']):+.2f} pt")
    if "val_loss_before" in s:
        tot.add_row("val loss", f"{s['val_loss_before']:.4f}", f"{s['val_loss_after']:.4f}", "")
    tot.add_row(f"CPU latency, batch {s['latency_batch']} (ms)", f"{s['latency_ms_before']:.3f}", f"{s['latency_ms_after']:.3f}",
                f"{s['latency_ms_before'] / max(s['latency_ms_after'], 1e-9):.2f}x")
    out.print(tot)
    thr = f"log alpha > {s['threshold']:g} removed" if s.get("threshold") is not None else "units with SNR <= 1 removed"
    out.print(f"{thr} ({s['threshold_chosen_by']}); saved model checked by {s['saved_check']}"
              + (f" (max abs diff {s['max_abs_diff_saved']:.2g})" if s.get("max_abs_diff_saved") is not None else ""),
              highlight=False)
    if s.get("pruned_on"):
        out.print(f"pruned on {s['pruned_on']}; the model's other outputs are kept (checked too)", highlight=False)


def _print_curve(curve: list, s: dict) -> None:
    """The trade-off curve prune walked: compression against validation drop, before and after retraining."""
    if not curve:
        return
    from rich.table import Table

    unit = "pt" if s["task"] == "classification" else "% loss"
    budget = f", --max-drop {s['max_drop']:g}" if s.get("max_drop") is not None else ""
    t = Table(title=f"trade-off walked (validation: {shown(s['validation'] or '-', 'stdin')}{budget})")
    rounds = max(p.get("round", 1) for p in curve) > 1
    if rounds:
        t.add_column("round (--kl-weight)", justify="right")
    for c in ("log alpha cut", "weights kept", "compression", f"drop ± se ({unit})", f"retrained: drop ± se ({unit})", ""):
        t.add_column(c, justify="right")
    for p in curve:
        r = p.get("retrained")
        if not isinstance(r, dict):
            rtxt = "yes" if r else ""
        elif r.get("drop") is not None:
            rtxt = _pm(r)
        else:
            rtxt = r.get("note") or ""
        t.add_row(*([f"{p['round']} ({p['kl_weight']:g})"] if rounds else []), "-" if p["threshold"] is None else f"{p['threshold']:g}", str(p["weights_kept"]), f"{p['compression']:.1f}x",
                  p.get("note") or (_pm(p) if p.get("drop") is not None else "-"), rtxt,
                  ("chosen" + {True: " (retrained)", False: " (as cut)"}.get(p.get("chosen_retrained"), "")) if p.get("chosen") else "")
    out.print(t)


def _pm(p: dict) -> str:
    return f"{p['drop']:+.2f}" + (f" ± {p['drop_se']:.2f}" if p.get("drop_se") is not None else "")
