"""`dropcli finetune`: learn dropout rates (concrete dropout, variational dropout) on data."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch
import typer
from rich.table import Table

from dropcli.backends import load_model
from dropcli.errors import DropcliError, UsageError
from dropcli.io.files import check_output_path
from dropcli.cli.common import (After, Arch, Exclude, Imports, InputShape, Json, Layers, ModelArg, STATE, TrustPickle, handle_errors,
                     load_opts, model_output, out, print_json, shown, write_report)

HELP = """Learn dropout rates on data, and write the model back with them.

Convention: p is the DROP probability (keep q = 1 - p).

concrete (Gal, Hron & Kendall 2017): each site gets a relaxed Bernoulli mask with its own learned p
(temperature 0.1) and the KL term  l^2 ||W||^2/(2q) + K (p log p + q log q),  W and K the weights and
input dimension of the Linear/Conv layer right after the site, l --length-scale. The output holds
dropcli's `standard` site at each learned p.

variational (Kingma, Salimans & Welling 2015): multiplicative Gaussian noise N(1, alpha) with a learned
alpha <= 1 per unit (or per weight of the following Linear with --per-weight, by local
reparameterisation) and the KL approximation  -KL ~ 0.5 log a + 1.16145 a - 1.50204 a^2 + 0.58630 a^3
(summed over weights). The output holds dropcli's `gaussian` site with the per-unit alpha
(--per-weight: folded per input unit, alpha_i = sum_j alpha_ji W_ji^2 / sum_j W_ji^2).

Objective: the negative ELBO per training example, N the training-set size. Classification: mean
cross-entropy + KL/N. Regression: mean squared error + 2 KL/(tau N), tau the model precision (for
concrete, the regulariser wr ||W||^2/q + dr K (p log p + q log q) with wr = l^2/(tau N), dr = 2/(tau N)).
--tau defaults to 1 / (the starting model's validation MSE); the regression NLL uses variance
MC variance + 1/tau. tau is stored in the written model, and `dropcli uncertainty` uses it.

Sites: the model's dropout (nn.Dropout, F.dropout, ONNX Dropout, dropcli standard/gaussian sites),
narrowed by --layers/--exclude; with --after, new sites after those layers. Each starts at its current p
(or --p, else 0.1). --train rates (default) freezes the weights; --train all fine-tunes them too.
Rates learn at 10x --lr. The report gives each site's start and learned rate, and validation MC NLL,
accuracy (RMSE) and ECE before and after, over --samples passes.

Examples:

  dropcli finetune mlp.pt --data train.npz --variant concrete -o mlp_learned.pt

  dropcli finetune mlp.onnx --data train.npz --val val.npz --variant variational --after relu -o out.onnx --json

  dropcli finetune reg.pt2 --data train.csv --task regression --variant concrete --train all -o reg_ft.pt2
"""

DEFAULTS = {"epochs": 20, "lr": 1e-3, "rate_lr_scale": 10.0, "batch_size": 64, "length_scale": 1e-2, "samples": 30,
            "start_p": 0.1}
FINETUNABLE = {"concrete": ("dropout", "standard"), "variational": ("dropout", "standard", "gaussian")}


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
        from dropcli.variants.base import check_p

        if variant not in ("concrete", "variational"):
            raise UsageError(f"unknown --variant {variant!r}", "choose concrete or variational")
        if train_what not in ("rates", "all"):
            raise UsageError(f"unknown --train {train_what!r}", "choose rates or all")
        if per_weight and variant != "variational":
            raise UsageError("--per-weight applies to --variant variational only")
        if epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {epochs}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        if samples < 2:
            raise UsageError(f"--samples must be at least 2, got {samples}")
        if not (np.isfinite(lr) and lr > 0):
            raise UsageError(f"--lr must be a positive number, got {lr}")
        if not (np.isfinite(length_scale) and length_scale > 0):
            raise UsageError(f"--length-scale must be a positive number, got {length_scale}")
        if tau is not None and not (np.isfinite(tau) and tau > 0):
            raise UsageError(f"--tau must be a positive number, got {tau}")
        if p is not None and check_p(p):
            raise UsageError(f"--p={p} is invalid: the drop probability p must be in [0, 1)")
        from dropcli.training.loop import resolve_device

        dev = resolve_device(device)
        inputs = [model_path] + [x for x in (data, val) if x]
        model_output(output, inputs, force=force, json_out=json_out, others={"--report": report_path})
        if report_path and report_path != "-":
            check_output_path(report_path, inputs + [output])
        report = run(model_path, output, data=data, val=val, variant=variant, after=after, layers=layers, exclude=exclude,
                     p=p, train_what=train_what, per_weight=per_weight, epochs=epochs, lr=lr, length_scale=length_scale, tau=tau,
                     batch_size=batch_size, task=task, samples=samples, device=dev, seed=seed, quiet=STATE.quiet,
                     load=load_opts(trust_pickle, imports, arch, input_shape))
        write_report(report, report_path)
        if json_out:
            print_json(report)
            return
        _print(report)


def run(model_path: str, output: str, *, data: str, val: str | None, variant: str, after=None, layers=None, exclude=None,
        p: float | None = None, train_what: str = "rates", per_weight: bool = False, epochs: int = DEFAULTS["epochs"],
        lr: float = DEFAULTS["lr"], length_scale: float = DEFAULTS["length_scale"], tau: float | None = None, batch_size: int = DEFAULTS["batch_size"],
        task: str = "auto", samples: int = DEFAULTS["samples"], device: str = "cpu", seed: int = 0, quiet: bool = True,
        load: dict | None = None) -> dict:
    """The whole flow (load, choose sites, train, evaluate, write); returns the report."""
    import copy

    from dropcli.training import learned
    from dropcli.backends.torch.model import TorchModel
    from dropcli.backends.torch.importer import to_modules
    from dropcli.backends.plan import apply_inject, apply_replace, plan_existing, plan_inject
    from dropcli.model.selection import Selection
    from dropcli.training.loop import check_import, fit, load_split, model_example, save_like_input
    from dropcli.variants import get_variant
    from dropcli.variants.base import check_p

    model = load_model(model_path, **(load or {}))
    example = model_example(model)
    gm = to_modules(model, keep_dropout=True)
    with torch.no_grad():
        ref = gm(*example)
    if not isinstance(ref, torch.Tensor):
        raise DropcliError("the model returns several outputs; dropcli finetune needs a model with one output")
    train, vsplit, task = load_split(data, val, example, tuple(ref.shape[1:]), task, seed)
    check_import(model, gm, vsplit.x[:64])
    tm = TorchModel(gm, model.format, tuple(example), model_path, getattr(model, "site_meta", None))
    standard = get_variant("standard")
    sel = Selection.from_options(after, layers, exclude, False)
    start: dict[str, float] = {}
    if sel.after:
        chosen = plan_inject(tm, standard, sel)
        p0 = DEFAULTS["start_p"] if p is None else p
        done = apply_inject(tm, standard, {"p": p0}, chosen)
        for d in done:
            start[d["site"]] = (d["at"], p0, "standard")
    else:
        drops = [l for l in tm.layers() if l.kind == "dropout"]
        if not drops:
            raise DropcliError("the model has no dropout sites and none were selected",
                               "choose where to learn rates with --after (e.g. --after relu), or pass a model with dropout")
        chosen = plan_existing(tm, sel)
        for l in chosen:
            kind = l.dropout_variant or "dropout"
            if kind not in FINETUNABLE[variant]:
                raise DropcliError(f"dropout site {l.name} is a {kind} site; {variant} fine-tuning takes "
                                   f"{' / '.join(FINETUNABLE[variant])} sites only",
                                   "leave it out with --exclude, or replace it first (dropcli inject --replace --variant standard)")
            lp = l.dropout_p if p is None else p
            if lp is None:
                lp = DEFAULTS["start_p"]
            if check_p(lp):
                raise DropcliError(f"dropout site {l.name} has p={lp}, outside [0, 1)", "pass a starting rate with --p")
        done = apply_replace(tm, standard, {"p": 0.5}, chosen, inherit_p=False)  # rates set below
        for d, l in zip(done, chosen):  # TorchModel: done is in the order of chosen
            lp = d["was_p"] if p is None else p
            was = "gaussian" if l.dropout_variant == "gaussian" else "standard"
            start[d["site"]] = (d["at"], DEFAULTS["start_p"] if lp is None else float(lp), was)
    gm = tm.gm
    sites = [learned.LearnedSite(name=s, at=at, following="", start_p=sp) for s, (at, sp, _) in start.items()]
    # "before": the model with stock sites (the variant each had, new ones standard) at the starting rates
    from dropcli.backends.torch.fx import set_module as _set_module

    for s in sites:
        _set_module(gm, s.name, get_variant(start[s.name][2]).torch_module(p=s.start_p))
    gm.recompile()
    tau = precision(gm, vsplit, task, tau)
    noise_var = 1.0 / tau if task == "regression" else 0.0
    before = learned.mc_metrics(gm, vsplit, task, samples, seed, noise_var=noise_var)
    work = copy.deepcopy(gm)
    learned.attach(work, sites, variant, per_weight)
    n = len(train)
    rate_params = [prm for s in sites for prm in s.rate_params()]
    rate_ids = {id(prm) for prm in rate_params}
    weights = [prm for prm in work.parameters() if id(prm) not in rate_ids]
    for prm in weights:
        prm.requires_grad_(train_what == "all")
    for prm in rate_params:
        prm.requires_grad_(True)
    groups = [{"params": rate_params, "lr": lr * DEFAULTS["rate_lr_scale"]}]
    if train_what == "all":
        groups.append({"params": weights, "lr": lr})
    mods = [s.module for s in sites]

    kl_w = learned.kl_weight(task, n, tau)

    def reg(progress: float):
        if variant == "concrete":
            return kl_w * sum(m.kl(length_scale) for m in mods), {}
        return kl_w * sum(m.kl() for m in mods), {}

    def describe() -> str:
        return " ".join(f"{s.name.removeprefix('dropcli_site_')}:{s.describe()}" for s in sites[:6])

    def on_step(_step: int) -> None:
        for m in mods:
            if hasattr(m, "clamp_"):
                m.clamp_()

    work.to(device)
    history = fit(work, train, task, params=groups, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                  regulariser=reg, train_modules=mods, describe=describe, on_step=on_step, quiet=quiet,
                  label=f"finetune ({variant})")
    work.to("cpu")
    rows = learned.finalize(work, sites)
    after_m = learned.mc_metrics(work, vsplit, task, samples, seed, noise_var=noise_var)
    meta = dict(model.model_meta)
    if task == "regression":
        meta["tau"] = tau  # `dropcli uncertainty` adds 1/tau to the predictive variance by default
    fmt, err = save_like_input(work, model, example, model_path, output, vsplit.x[:64], model_meta=meta)
    summary = {"input": model_path, "output": output, "format": fmt, "variant": variant, "task": task, "train": train_what,
               "per_weight": per_weight, "epochs": epochs, "lr": lr, "rate_lr": lr * DEFAULTS["rate_lr_scale"],
               "length_scale": length_scale, "tau": tau if task == "regression" else None, "kl_weight": kl_w,
               "batch_size": batch_size, "samples": samples, "seed": seed, "device": device,
               "n_train": n, "validation": vsplit.source, "max_abs_diff_saved": err,
               "final_loss": history[-1]["loss"], "final_reg": history[-1]["reg"]}
    for key, m in (("before", before), ("after", after_m)):
        for k, v in m.items():
            summary[f"val_{k}_{key}"] = v
    return {"summary": summary, "sites": rows}


def precision(gm: torch.nn.Module, vsplit, task: str, tau: float | None) -> float:
    """Regression's model precision tau: ``--tau``, else 1 / the deterministic MSE of the starting
    model on the validation split. It weighs the KL (2/(tau N)) and is the observation noise
    (variance 1/tau) added to the MC variance in the validation NLL. Held-out, because a trained
    model's training MSE understates the noise: on the diabetes benchmark model it is 0.13 against
    0.65 on held-out data, and a validation NLL built on it rewards MC spread for its own sake.
    1.0 (unused) for classification."""
    if task != "regression":
        return 1.0
    if tau is not None:
        return float(tau)
    from dropcli.training.loop import evaluate

    mse = float(evaluate(gm, vsplit, task)["loss"])
    return 1.0 / max(mse, 1e-12)


def _print(report: dict) -> None:
    s = report["summary"]
    t = Table(title=f"finetune ({s['variant']}, train {s['train']}): {shown(s['input'], 'stdin')} -> {shown(s['output'])} ({s['format']})")
    for c in ("site", "at", "next layer", "K", "output variant", "start p", "learned p", "alpha (mean / min / max)"):
        t.add_column(c, justify="left" if c in ("site", "at", "next layer", "output variant") else "right")
    for r in report["sites"]:
        alpha = f"{r['alpha_mean']:.3f} / {r['alpha_min']:.3f} / {r['alpha_max']:.3f}" if "alpha_mean" in r else ""
        t.add_row(r["site"], r["at"], r["following"], str(r["k"]), r["variant"], f"{r['start_p']:.4f}", f"{r['learned_p']:.4f}", alpha)
    out.print(t)
    title = f"validation ({s['validation']}), MC over {s['samples']} passes"
    if s.get("tau"):
        title += f"; regression NLL with noise variance 1/tau, tau = {s['tau']:.6g} (stored in the model for `dropcli uncertainty`)"
    m = Table(title=title)
    m.add_column("metric")
    m.add_column("before", justify="right")
    m.add_column("after", justify="right")
    for k in ("nll", "accuracy", "rmse", "ece"):
        if f"val_{k}_before" in s:
            m.add_row(k.upper() if k in ("nll", "ece", "rmse") else k, f"{s[f'val_{k}_before']:.4f}", f"{s[f'val_{k}_after']:.4f}")
    out.print(m)
