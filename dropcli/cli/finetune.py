"""`dropcli finetune`: learn dropout rates (concrete dropout, variational dropout) on data."""

from __future__ import annotations

from typing import List, Optional

import typer

from dropcli.cli.common import (After, Arch, Exclude, Imports, InputShape, Json, Layers, ModelArg, TrustPickle, handle_errors,
                                log, model_output, out, print_json, report_output, shown,
                                write_report)

HELP = """Learn dropout rates on data, and write the model back with them.

Convention: p is the DROP probability (keep q = 1 - p).

concrete (Gal, Hron & Kendall 2017): each site gets a relaxed Bernoulli mask with its own learned p
(temperature 0.1) and the KL term  l^2 ||W||^2/(2q) + K (p log p + q log q),  W and K the weights and
input dimension of the Linear/Conv layer right after the site, l --length-scale. The output holds
dropcli's `standard` site at each learned p.

variational (Kingma, Salimans & Welling 2015): multiplicative Gaussian noise N(1, alpha) with a learned
alpha per unit (or per weight of the following Linear with --per-weight, by local
reparameterisation) and the KL to the log-uniform prior by Molchanov et al. (2017)'s approximation,
-KL ~ 0.63576 sigmoid(1.87320 + 1.48695 log a) - 0.5 log(1 + 1/a), valid for every alpha
(summed over weights; log alpha in [-10, 8]). The output holds dropcli's `gaussian` site with the per-unit alpha
(--per-weight: folded per input unit, alpha_i = sum_j alpha_ji W_ji^2 / sum_j W_ji^2).

Objective: the negative ELBO per training example, N the training-set size. Classification: mean
cross-entropy + KL/N. Regression: mean squared error + 2 KL/(tau N), tau the model precision (for
concrete, the regulariser wr ||W||^2/q + dr K (p log p + q log q) with wr = l^2/(tau N), dr = 2/(tau N)).
--tau defaults to 1 / (the starting model's validation MSE); the regression NLL uses variance
MC variance + 1/tau. tau is stored in the written model, and `dropcli uncertainty` uses it.

Validation: --val, or a seeded 20% split held out of --data. For a model that was trained on --data
that split is training data: the model is near-perfect on it, and validation NLL then rewards less
noise and sharper probabilities whatever new data would say. finetune says which it used, and warns
(recommending --val) when the starting model misclassifies fewer than 5 validation examples.

Rates for held-out quality (--select val, the default): after the ELBO fit, every site's noise variance
(alpha = p/q for Bernoulli sites, alpha for gaussian ones) is scaled by each factor in
1/16 .. 4 (steps of sqrt 2) and scored by validation MC NLL (with --calibrate, by the temperature
fit's objective at each factor's own temperature). Kept: the factor with the lowest score (every
factor runs on the same noise draws, so the curve is smooth). A factor whose passes leave a
validation example unchanged is too little noise to sample and is skipped. The report gives the
whole curve. --select elbo keeps the ELBO's rates.

Calibration (--calibrate, classification): a temperature T on the validation MC predictive (each
pass's logits divided by T before the softmax): the MAP estimate under a prior log T ~ N(0, 0.3^2),
i.e. the minimiser of NLL + (log T)^2 / (0.18 N) on N validation examples, which keeps a few
hundred examples from over-sharpening it; none when the validation predictive has fewer than 5
errors or the minimiser is at the end of [0.05, 20]. It is stored in the written model, and
`dropcli uncertainty` applies it by default (--no-calibration switches it off).

Sites: the model's dropout (nn.Dropout, F.dropout, ONNX Dropout, dropcli standard/gaussian sites),
narrowed by --layers/--exclude; with --after, new sites after those layers; in a model with no dropout,
new sites where `dropcli inject` puts them by default (after each hidden activation). Each starts at its current p
(or --p, else 0.1). --train rates (default) freezes the weights; --train all fine-tunes them too.
Rates learn at 10x --lr. The report gives each site's start and learned rate, and validation MC NLL,
accuracy (RMSE) and ECE before and after, over --samples passes.

Examples:

  dropcli finetune mlp.pt --data train.npz --val val.npz --variant concrete --calibrate -o mlp_learned.pt

  dropcli finetune mlp.onnx --data train.npz --val val.npz --variant variational --after relu -o out.onnx --json

  dropcli finetune reg.pt2 --data train.csv --task regression --variant concrete --train all -o reg_ft.pt2
"""

# the defaults of dropcli.training.finetune.DEFAULTS (the options are declared without importing torch)
DEFAULTS = {"epochs": 20, "lr": 1e-3, "batch_size": 64, "length_scale": 1e-2, "samples": 30, "select": "val"}


def register(app: typer.Typer) -> None:
    @app.command("finetune", help=HELP)
    @handle_errors
    def finetune_cmd(
        model_path: str = ModelArg,
        output: str = typer.Option(..., "-o", "--output", help="Output model path (written atomically, in the input's format; - = stdout)."),
        data: str = typer.Option(..., "--data", help="Training data: .npz (x, y), .pt or .csv (last column = label)."),
        val: Optional[str] = typer.Option(None, "--val", help="Validation data (default: a seeded 20% split held out of --data)."),
        variant: str = typer.Option(..., "--variant", help="concrete (learned p per site) or variational (learned alpha)."),
        after: Optional[List[str]] = After,
        layers: Optional[List[str]] = Layers,
        exclude: Optional[List[str]] = Exclude,
        p: Optional[float] = typer.Option(None, "--p", help="Starting drop probability of every site (default: its current p, else 0.1)."),
        train_what: str = typer.Option("rates", "--train", help="rates (weights frozen) or all (weights fine-tuned too)."),
        per_weight: bool = typer.Option(False, "--per-weight", help="variational: one alpha per weight of the following Linear."),
        epochs: int = typer.Option(DEFAULTS["epochs"], "--epochs", help="Training epochs."),
        lr: float = typer.Option(DEFAULTS["lr"], "--lr", help="Adam learning rate of the weights (the rates get 10x)."),
        length_scale: float = typer.Option(DEFAULTS["length_scale"], "--length-scale", help="concrete: prior length-scale l (weight term l^2/N)."),
        tau: Optional[float] = typer.Option(None, "--tau", help="Regression: model precision (default: 1 / the starting model's validation MSE)."),
        batch_size: int = typer.Option(DEFAULTS["batch_size"], "--batch-size", help="Training batch size."),
        task: str = typer.Option("auto", "--task", help="classification, regression or auto (integer labels = classification)."),
        samples: int = typer.Option(DEFAULTS["samples"], "--samples", help="MC passes for the validation metrics."),
        select: str = typer.Option(DEFAULTS["select"], "--select", help="val (scale the ELBO's rates to the best validation MC NLL) or elbo."),
        calibrate: bool = typer.Option(False, "--calibrate", help="Classification: fit a temperature on the validation MC predictive and store it in the model."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (training only; the output is a CPU model)."),
        seed: int = typer.Option(0, "--seed", help="Random seed: split, shuffling and noise (bitwise reproducible on CPU)."),
        report_path: Optional[str] = typer.Option(None, "--report", help="Also write the report as JSON to this file."),
        force: bool = typer.Option(False, "--force", help="Allow -o to be the input path (overwrites it)."),
        json_out: bool = Json,
        trust_pickle: bool = TrustPickle,
        imports: Optional[List[str]] = Imports,
        arch: Optional[str] = Arch,
        input_shape: Optional[str] = InputShape,
    ) -> None:
        from dropcli.api.finetune import check_finetune_args, finetune
        from dropcli.cli.render import progress
        from dropcli.io.files import check_output_path

        check_finetune_args(variant=variant, train_what=train_what, per_weight=per_weight, epochs=epochs,
                            batch_size=batch_size, samples=samples, lr=lr, length_scale=length_scale, tau=tau, p=p,
                            device=device, select=select)
        inputs = [model_path] + [x for x in (data, val) if x]
        model_output(output, inputs, force=force, json_out=json_out, others={"--report": report_path})
        report_output(report_path, json_out)
        if report_path and report_path != "-":
            check_output_path(report_path, inputs + [output])
        report = finetune(model_path, data, output, variant=variant, val=val, after=after, layers=layers,
                          exclude=exclude, p=p, train=train_what, per_weight=per_weight, epochs=epochs, lr=lr,
                          length_scale=length_scale, tau=tau, batch_size=batch_size, task=task, samples=samples,
                          device=device, seed=seed, force=force, trust_pickle=trust_pickle, imports=imports, arch=arch,
                          input_shape=input_shape, progress=progress, select=select, calibrate=calibrate)
        s = report["summary"]
        log(f"validation data: {s['validation']} ({s['validation_origin']})")
        for note in s["notes"]:
            log(f"[yellow]warning:[/] {note}")
        write_report(report, report_path)
        if json_out:
            print_json(report)
            return
        _print(report)


def _print(report: dict) -> None:
    from rich.table import Table

    s = report["summary"]
    t = Table(title=f"finetune ({s['variant']}, train {s['train']}): {shown(s['input'], 'stdin')} -> {shown(s['output'])} ({s['format']})")
    for c in ("site", "at", "next layer", "K", "output variant", "start p", "learned p", "alpha (mean / min / max)"):
        t.add_column(c, justify="left" if c in ("site", "at", "next layer", "output variant") else "right")
    elbo = any("elbo_p" in r for r in report["sites"])
    if elbo:
        t.add_column("ELBO p", justify="right")
    for r in report["sites"]:
        alpha = f"{r['alpha_mean']:.3f} / {r['alpha_min']:.3f} / {r['alpha_max']:.3f}" if "alpha_mean" in r else ""
        t.add_row(r["site"], r["at"], r["following"], str(r["k"]), r["variant"], f"{r['start_p']:.4f}", f"{r['learned_p']:.4f}", alpha,
                  *([f"{r['elbo_p']:.4f}"] if elbo else []))
    out.print(t)
    title = f"validation ({s['validation']}), MC over {s['samples']} passes"
    if s.get("tau"):
        title += f"; regression NLL with noise variance 1/tau, tau = {s['tau']:.6g} (stored in the model for `dropcli uncertainty`)"
    if "selection" in report:
        c = Table(title=f"validation curve: the ELBO's noise variances x scale (chosen: x{s['chosen_scale']:g})")
        keys = [k for k in ("nll", "accuracy", "rmse", "ece", "temperature", "nll_calibrated") if k in report["selection"][0]]
        c.add_column("scale", justify="right")
        for k in keys:
            c.add_column({"nll_calibrated": "val NLL, calibrated", "temperature": "temperature"}.get(
                k, f"val {k.upper() if k != 'accuracy' else k}"), justify="right")
        for r in report["selection"]:
            mark = " *" if r["scale"] == s["chosen_scale"] else ""
            c.add_row(f"{r['scale']:g}{mark}", *(f"{r[k]:.4f}" for k in keys))
        out.print(c)
    calibrated = s.get("temperature") is not None
    if calibrated:
        title += f"; after: calibrated, temperature {s['temperature']:.4g} (stored in the model)"
    m = Table(title=title)
    m.add_column("metric")
    m.add_column("before", justify="right")
    if calibrated:
        m.add_column("after, uncalibrated", justify="right")
    m.add_column("after", justify="right")
    for k in ("nll", "accuracy", "rmse", "ece"):
        if f"val_{k}_before" in s:
            mid = [f"{s[f'val_{k}_uncalibrated']:.4f}"] if calibrated else []
            m.add_row(k.upper() if k in ("nll", "ece", "rmse") else k, f"{s[f'val_{k}_before']:.4f}", *mid, f"{s[f'val_{k}_after']:.4f}")
    out.print(m)
