"""`dropcli prune`: compress a trained model by variational-dropout scores, and shrink it for real."""

from __future__ import annotations

import statistics
import time
from typing import List, Optional

import numpy as np
import torch
import typer
from rich.table import Table

from dropcli.backends import load_model
from dropcli.errors import DropcliError, UsageError
from dropcli.io.files import check_output_path, file_size
from dropcli.cli.common import (Arch, Imports, InputShape, Json, ModelArg, STATE, TrustPickle, handle_errors, load_opts, model_output,
                     out, print_json, shown, write_report)

HELP = """Prune a trained model with sparse variational dropout (default) or structured Bayesian pruning,
then remove dead neurons and channels for real.

sparse-vd (Molchanov et al. 2017): every Linear / Conv1d / Conv2d gets a learned per-weight noise
variance (log sigma^2 starts at -10); fine-tuning minimises  mean loss + beta * sum KL / N  with beta
ramped from 0 to --kl-weight over the first half of the epochs; weights with log alpha > --threshold
become 0, and the kept weights are fine-tuned without noise for --retrain-epochs (pruned ones stay 0). sbp (Neklyudov et al. 2017): log-normal noise per neuron / channel; units with SNR <= 1 go.

Then every hidden unit with no live inputs (its constant output is folded into the next layer's bias
where that is exact) or no live outputs is removed, with Torch-Pruning's dependency graph slicing the
layers around it. The output is a plain model (nn.Linear / nn.Conv, no dropcli classes) in the input's
format. Accuracy before/after comes from --val, or from a seeded 20% held-out split of --data.

Data: .npz with x and y, a .pt dict / tuple (x, y), or a .csv whose last column is the label.

Examples:

  dropcli prune mlp.pt --data train.npz --val val.npz -o mlp_pruned.pt

  dropcli prune cnn.onnx --data train.npz --method sbp -o cnn_pruned.onnx --json

  dropcli prune reg.pt2 --data train.csv --task regression -o small.pt2 --plot log_alpha.png
"""


def _latency(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds per forward pass, the models timed in turn (side by side)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


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
        threshold: float = typer.Option(3.0, "--threshold", help="sparse-vd: zero weights with log alpha above this (3 = drop rate 0.95)."),
        kl_weight: float = typer.Option(1.0, "--kl-weight", help="Final KL weight beta (ramped up from 0 over the first half of training)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate for the weights (the noise parameters get 10x). Default 3e-3."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Training batch size (default 64)."),
        retrain_epochs: Optional[int] = typer.Option(None, "--retrain-epochs", help="Then fine-tune only the kept weights, without noise, for this many epochs (default 10; 0 skips)."),
        task: str = typer.Option("auto", "--task", help="classification (cross-entropy), regression (MSE) or auto (integer labels = classification)."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (training only; the output is a CPU model)."),
        seed: int = typer.Option(0, "--seed", help="Random seed: split, shuffling and noise (bitwise reproducible on CPU)."),
        report_path: Optional[str] = typer.Option(None, "--report", help="Also write the report as JSON to this file."),
        plot: Optional[str] = typer.Option(None, "--plot", help="Write a PNG histogram of log alpha (sbp: log SNR) per layer."),
        force: bool = typer.Option(False, "--force", help="Allow -o to be the input path (overwrites it)."),
        json_out: bool = Json,
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        from dropcli.prune.sites import modules_with_sparse_vd
        from dropcli.prune.core import DEFAULTS, METHODS, PruneConfig, count_params, prune
        from dropcli.prune.shrink import prunable_layers
        from dropcli.training.loop import check_import, evaluate, load_split, model_example, resolve_device, save_like_input

        if method not in METHODS:
            raise UsageError(f"unknown --method {method!r}", f"choose one of {', '.join(METHODS)}")
        epochs = DEFAULTS["epochs"] if epochs is None else epochs
        lr = DEFAULTS["lr"] if lr is None else lr
        batch_size = DEFAULTS["batch_size"] if batch_size is None else batch_size
        retrain_epochs = DEFAULTS["retrain_epochs"] if retrain_epochs is None else retrain_epochs
        if retrain_epochs < 0:
            raise UsageError(f"--retrain-epochs must be 0 or more, got {retrain_epochs}")
        if epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {epochs}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        if not (np.isfinite(lr) and lr > 0):
            raise UsageError(f"--lr must be a positive number, got {lr}")
        if not (np.isfinite(kl_weight) and kl_weight >= 0):
            raise UsageError(f"--kl-weight must be a non-negative number, got {kl_weight}")
        if not np.isfinite(threshold):
            raise UsageError(f"--threshold must be a finite number, got {threshold}")
        if task not in ("auto", "classification", "regression"):
            raise UsageError(f"unknown --task {task!r}", "choose auto, classification or regression")
        dev = resolve_device(device)
        if plot:
            from dropcli.io.plot import _import_pyplot

            _import_pyplot()  # fail before training when matplotlib is missing
        inputs = [model_path] + [p for p in (data, val) if p]
        model_output(output, inputs, force=force, json_out=json_out, others={"--report": report_path, "--plot": plot})
        for extra in (report_path, plot):
            if extra and extra != "-":
                check_output_path(extra, inputs + [output])
        model = load_model(model_path, **load_opts(trust_pickle, imports, arch, input_shape))
        example = model_example(model)
        # sparse-VD sites (`dropcli inject --variant sparse-vd`, then the user's training) come back as
        # sparse-VD layers, pruned by their own scores
        gm, _ = modules_with_sparse_vd(model, threshold)
        has_svd = any(getattr(type(m), "dropcli_leaf", False) for m in gm.modules())
        if not prunable_layers(gm) and not has_svd:
            raise DropcliError("the model has no prunable layers (Linear, Conv1d or Conv2d with stored weights)",
                               "dropcli prune works on models built from Linear / Conv layers")
        with torch.no_grad():
            ref = gm(*example)
        if not isinstance(ref, torch.Tensor):
            raise DropcliError("the model returns several outputs; dropcli prune needs a model with one output")
        train = vsplit = None
        if data is None and not has_svd:
            raise UsageError("--data is required", "give training data (.npz with x and y, .pt or .csv)")
        if data is not None:
            train, vsplit, task = load_split(data, val, example, tuple(ref.shape[1:]), task, seed)
            # the importer must not change the function: check it on real inputs before training
            check_import(model, gm, vsplit.x[:64])
        cfg = PruneConfig(method=method, epochs=epochs, threshold=threshold, kl_weight=kl_weight, lr=lr,
                          batch_size=batch_size, seed=seed, device=dev, quiet=STATE.quiet, retrain_epochs=retrain_epochs)
        before_metrics = evaluate(gm, vsplit, task) if vsplit is not None else None
        result = prune(gm, example, train, task, cfg)
        pruned = result.model
        after_metrics = evaluate(pruned, vsplit, task) if vsplit is not None else None
        xlat = vsplit.x[:256] if vsplit is not None else torch.cat([example[0]] * 32)
        lat = _latency({"before": gm, "after": pruned}, xlat)
        p_before, nz_before = count_params(gm)
        p_after, nz_after = count_params(pruned)
        w_before = sum(r["weights_before"] for r in result.layers)
        w_after = sum(r["weights_kept"] for r in result.layers)
        # write: the input's format (ONNX stays ONNX), checked with its stock loader before it lands
        fmt, err = save_like_input(pruned, model, example, model_path, output, xlat[:64])
        summary = {
            "input": model_path, "output": output, "format": fmt, "method": method, "task": task,
            "epochs": epochs, "retrain_epochs": retrain_epochs, "threshold": threshold, "kl_weight": kl_weight, "lr": lr, "batch_size": batch_size,
            "seed": seed, "device": dev, "validation": vsplit.source if vsplit is not None else None,
            "weights_before": w_before, "weights_after": w_after,
            "compression": w_before / max(w_after, 1),
            "params_before": p_before, "params_after": p_after, "nonzero_params_before": nz_before,
            "nonzero_params_after": nz_after, "param_compression": nz_before / max(nz_after, 1),
            "size_before": file_size(model_path), "size_after": file_size(output, output=True),
            "latency_ms_before": lat["before"], "latency_ms_after": lat["after"], "latency_batch": int(len(xlat)),
            "units_folded": result.shrink.folded if result.shrink else 0,
            "max_abs_diff_saved": err,
        }
        for key, m in (("before", before_metrics), ("after", after_metrics)):
            if m is not None:
                for k, v in m.items():
                    summary[f"val_{k}_{key}"] = v
        report = {"summary": summary, "layers": result.layers}
        if plot:
            from dropcli.io.plot import write_log_alpha_plot

            write_log_alpha_plot(plot, result.log_alpha, threshold if method == "sparse-vd" else 0.0,
                                 "log alpha" if method == "sparse-vd" else "log SNR")
        write_report(report, report_path)
        if json_out:
            print_json(report)
            return
        _print(report)


def _print(report: dict) -> None:
    s = report["summary"]
    t = Table(title=f"prune ({s['method']}): {shown(s['input'], 'stdin')} -> {shown(s['output'])} ({s['format']})")
    for c in ("layer", "type", "shape before", "shape after", "weights kept", "sparsity", "units removed"):
        t.add_column(c, justify="left" if c in ("layer", "type") else "right")
    for r in report["layers"]:
        t.add_row(r["layer"], r["type"], "x".join(map(str, r["shape_before"])),
                  "x".join(map(str, r["shape_after"])) if r["shape_after"] else "-",
                  f"{r['weights_kept']}/{r['weights_before']}", f"{r['sparsity']:.1%}",
                  f"{r['units_removed']}/{r['units_before']}")
    out.print(t)
    tot = Table(title="totals", show_header=True)
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
