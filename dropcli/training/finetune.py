"""Learned dropout rates (`dropcli finetune`, ``dropcli.finetune``): concrete dropout and
variational dropout, trained on data, written back as stock sites at the learned rates.

:func:`check_args` validates the options (the CLI calls it before it touches any file);
:func:`run` is the whole flow; :func:`precision` is regression's model precision tau.
The objectives are described in `dropcli finetune --help`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from dropcli.backends import load_model
from dropcli.errors import DropcliError, UsageError
from dropcli.model import naming

DEFAULTS = {"epochs": 20, "lr": 1e-3, "rate_lr_scale": 10.0, "batch_size": 64, "length_scale": 1e-2, "samples": 30,
            "start_p": 0.1, "select": "val"}
SELECT = ("val", "elbo")
# Fewer misclassified validation examples than this and validation NLL cannot choose rates or a
# temperature: with none, NLL falls monotonically as the predictive sharpens (p -> 0, T -> 0), so
# its minimiser is degenerate; with a handful it is decided by those few points. A split held out
# of the model's own training data is in this state (the issue-18 digits MLPs: accuracy 1.0 on it).
MIN_VAL_ERRORS = 5
FINETUNABLE = {"concrete": ("dropout", "standard"), "variational": ("dropout", "standard", "gaussian")}


def check_args(*, variant: str, train_what: str = "rates", per_weight: bool = False, epochs: int = DEFAULTS["epochs"],
               batch_size: int = DEFAULTS["batch_size"], samples: int = DEFAULTS["samples"], lr: float = DEFAULTS["lr"],
               length_scale: float = DEFAULTS["length_scale"], tau: Optional[float] = None, p: Optional[float] = None,
               select: str = DEFAULTS["select"], **_: Any) -> None:
    """The option checks of `dropcli finetune` (UsageError), before any file is read."""
    from dropcli.variants.base import check_p

    if variant not in ("concrete", "variational"):
        raise UsageError(f"unknown --variant {variant!r}", "choose concrete or variational")
    if select not in SELECT:
        raise UsageError(f"unknown --select {select!r}", "choose val (scan the rates on validation MC NLL) or elbo")
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


def run(model_path: str, output: str, *, data: str, val: str | None, variant: str, after=None, layers=None, exclude=None,
        p: float | None = None, train_what: str = "rates", per_weight: bool = False, epochs: int = DEFAULTS["epochs"],
        lr: float = DEFAULTS["lr"], length_scale: float = DEFAULTS["length_scale"], tau: float | None = None, batch_size: int = DEFAULTS["batch_size"],
        task: str = "auto", samples: int = DEFAULTS["samples"], device: str = "cpu", seed: int = 0, quiet: bool = True,
        load: dict | None = None, progress: Callable | None = None, select: str = DEFAULTS["select"],
        calibrate: bool = False) -> dict:
    """The whole flow (load, choose sites, train, evaluate, write); returns the report.
    ``model_path``: a path, or a model already loaded (``dropcli.load``); the report names it
    by its source. ``progress``: see :func:`dropcli.training.loop.fit`."""
    import copy

    from dropcli.engines.fixed import trainable
    from dropcli.training import learned
    from dropcli.backends.torch.model import TorchModel
    from dropcli.backends.torch.importer import to_modules
    from dropcli.backends.torch.outputs import first_output_view
    from dropcli.backends.plan import apply_inject, apply_replace, plan_existing, plan_inject
    from dropcli.model.selection import Selection
    from dropcli.training.loop import check_import, fit, input_names, load_split, model_example, name_outputs, save_like_input
    from dropcli.variants import get_variant
    from dropcli.variants.base import check_p

    if isinstance(model_path, str):
        model = load_model(model_path, **(load or {}))
    else:
        model, model_path = model_path, model_path.source
    model = trainable(model)  # a model saved with a fixed batch: freed, or refused in one line
    example = model_example(model)
    full = to_modules(model, keep_dropout=True)
    # a model with several outputs (tuple, dict, ModelOutput) learns its rates on its first; the
    # others are put back in the written model, in the structure the model returned
    view = first_output_view(full, example)
    gm = full if view is None else view.gm
    name_outputs(view, model)
    with torch.no_grad():
        ref = gm(*example)
    train, vsplit, task = load_split(data, val, example, tuple(ref.shape[1:]), task, seed, names=input_names(model))
    if calibrate and task != "classification":
        raise UsageError("--calibrate fits a softmax temperature, for classification only",
                         "leave it out: for regression the stored tau already sets the predictive variance")
    check_import(model, full, vsplit.x[:64])
    notes = validation_notes(gm, vsplit, task, val)
    if view is not None:
        notes.append(f"the model has {len(view.names)} outputs: the rates were learned on {view.describe()}; "
                     "the others are kept in the written model")
    tm = TorchModel(gm, model.format, tuple(example), model_path, getattr(model, "site_meta", None))
    standard = get_variant("standard")
    sel = Selection.from_options(after, layers, exclude, False)
    start: dict[str, float] = {}
    drops = [] if sel.after else [l for l in tm.layers() if l.kind == "dropout"]
    if sel.after or not drops:
        # no dropout in the model: learn rates where `dropcli inject` would put sites by default
        chosen = plan_inject(tm, standard, sel, notes)
        if not sel.after:
            notes.append(f"the model has no dropout sites: rates are learned at the {len(chosen)} site(s) "
                         "`dropcli inject` would add by default (choose others with --after/--layers)")
        p0 = DEFAULTS["start_p"] if p is None else p
        done = apply_inject(tm, standard, {"p": p0}, chosen)
        for d in done:
            start[d["site"]] = (d["at"], p0, "standard")
    else:
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
    from dropcli.backends.torch.fx import set_module

    for s in sites:
        set_module(gm, s.name, get_variant(start[s.name][2]).torch_module(p=s.start_p))
    gm.recompile()
    tau = precision(gm, vsplit, task, tau)
    noise_var = 1.0 / tau if task == "regression" else 0.0
    before_outs = learned.mc_samples(gm, vsplit, samples, seed)
    before = learned.mc_metrics(gm, vsplit, task, samples, seed, noise_var=noise_var, outputs=before_outs)
    if calibrate and learned.mc_errors(before_outs, vsplit.y.numpy()) < MIN_VAL_ERRORS:
        calibrate = False
        notes.append(f"--calibrate: the validation MC predictive misclassifies {learned.mc_errors(before_outs, vsplit.y.numpy())} "
                     f"of {len(vsplit)} examples, fewer than {MIN_VAL_ERRORS}: too few to fit a temperature by NLL (with none "
                     "it falls without bound as T -> 0), so none was fitted or stored. Pass a larger --val")
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
        return " ".join(f"{naming.short_name(s.name)}:{s.describe()}" for s in sites[:6])

    def on_step(_step: int) -> None:
        for m in mods:
            if hasattr(m, "clamp_"):
                m.clamp_()

    work.to(device)
    history = fit(work, train, task, params=groups, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                  regulariser=reg, train_modules=mods, describe=describe, on_step=on_step, quiet=quiet,
                  label=f"finetune ({variant})", progress=progress)
    work.to("cpu")
    rows = learned.finalize(work, sites)
    curve = None
    if select == "val":
        # the ELBO's rates, every noise variance scaled by factors from 1/16 to 4, scored by validation MC NLL;
        # with --calibrate each scale gets its own temperature and is scored by fit_temperature's MAP
        # objective, so rates and temperature are chosen together; the lowest score wins
        curve, score = [], []
        for sc in learned.SCALES:
            learned.set_rates(work, learned.scaled_rows(rows, sc))
            outs = learned.mc_samples(work, vsplit, samples, seed)
            row = {"scale": sc, **learned.mc_metrics(work, vsplit, task, samples, seed, noise_var=noise_var, outputs=outs)}
            if calibrate:
                row["temperature"], row["nll_calibrated"], obj = learned.fit_temperature(outs, vsplit.y.numpy())
            row["degenerate"] = learned.degenerate_count(outs)
            score.append(obj if calibrate else row["nll"])
            curve.append(row)
        # a scale whose passes leave more validation examples untouched than the fewest any scale
        # leaves is too little noise to sample (`dropcli uncertainty` refuses a model whose passes
        # leave an example identical): not eligible. Some examples may stay untouched at every scale
        # with a few passes (few active units at small rates); most of them untouched is a refusal.
        fewest = min(r["degenerate"] for r in curve)
        if 2 * fewest > len(vsplit):
            raise DropcliError(f"at every scanned rate scale the {samples} MC passes leave most validation examples "
                               f"identical (at best {fewest} of {len(vsplit)}): the learned rates are too small to sample",
                               "start from larger rates (--p), or use --select elbo")
        score = [sc if r["degenerate"] <= fewest else np.inf for sc, r in zip(score, curve)]
        if fewest:
            notes.append(f"{fewest} of {len(vsplit)} validation examples came out identical in all {samples} MC passes at "
                         "every rate scale (the sites' units may all be zero for them); more --samples tells them apart")
        best = curve[learned.best_scale(learned.SCALES, score)]
        if best["scale"] in (learned.SCALES[0], learned.SCALES[-1]):
            notes.append(f"the best rate scale on validation, x{best['scale']:g}, is at the end of the scanned range "
                         f"({learned.SCALES[0]:g} .. {learned.SCALES[-1]:g}): start from other rates (--p), or check the validation data")
        chosen = learned.scaled_rows(rows, best["scale"])
        for c, r in zip(chosen, rows):
            c["elbo_p"] = r["learned_p"]
        rows = chosen
        learned.set_rates(work, rows)
    outs = learned.mc_samples(work, vsplit, samples, seed)
    after_m = learned.mc_metrics(work, vsplit, task, samples, seed, noise_var=noise_var, outputs=outs)
    meta = dict(model.model_meta)
    if task == "regression":
        meta["tau"] = tau  # `dropcli uncertainty` adds 1/tau to the predictive variance by default
    temperature = None
    if meta.pop("temperature", None) is not None and not calibrate:
        notes.append("the input model's stored temperature was dropped: it was fitted for its old rates "
                     "(pass --calibrate to fit one for the new rates)")
    uncal = None
    if calibrate:
        temperature = learned.fit_temperature(outs, vsplit.y.numpy())[0]
        uncal = after_m
        after_m = learned.mc_metrics(work, vsplit, task, samples, seed, temperature=temperature, outputs=outs)
        meta["temperature"] = temperature  # `dropcli uncertainty` divides each pass's logits by it by default
    if view is not None:
        work = view.restore(work, example)
    fmt, err = save_like_input(work, model, example, model_path, output, vsplit.x[:64], model_meta=meta)
    summary = {"input": model_path, "output": output, "format": fmt, "variant": variant, "task": task, "train": train_what,
               "per_weight": per_weight, "epochs": epochs, "lr": lr, "rate_lr": lr * DEFAULTS["rate_lr_scale"],
               "length_scale": length_scale, "tau": tau if task == "regression" else None, "kl_weight": kl_w,
               "batch_size": batch_size, "samples": samples, "seed": seed, "device": device,
               "n_train": n, "validation": vsplit.source,
               "validation_origin": "--val" if val else "a seeded 20% split held out of --data",
               "notes": notes, "select": select, "temperature": temperature, "max_abs_diff_saved": err,
               "trained_on": view.describe() if view is not None else None,
               "final_loss": history[-1]["loss"], "final_reg": history[-1]["reg"]}
    for key, m in (("before", before), ("after", after_m), ("uncalibrated", uncal or {})):
        for k, v in m.items():
            summary[f"val_{k}_{key}"] = v
    report = {"summary": summary, "sites": rows}
    if curve is not None:
        summary["chosen_scale"] = best["scale"]
        report["selection"] = curve
    return report


def validation_notes(gm: torch.nn.Module, vsplit, task: str, val: str | None) -> list[str]:
    """Warnings about the validation data (classification): fewer than MIN_VAL_ERRORS
    misclassified examples by the starting model's deterministic pass. For the split held out of
    --data this is the sign that --data is the model's training data."""
    if task != "classification":
        return []
    from dropcli.training.loop import evaluate

    ev = evaluate(gm, vsplit, task)
    n_val = len(vsplit)
    errors = n_val - int(round(ev["accuracy"] * n_val))
    if errors >= MIN_VAL_ERRORS:
        return []
    facts = f"the model misclassifies {errors} of its {n_val} examples (NLL {ev['loss']:.4f})"
    if val is None:
        return [f"the validation split held out of --data looks like training data: {facts}; rates and a temperature "
                "chosen on it do not carry to new data. Pass --val with data the model never saw"]
    return [f"--val {val} has too few errors to choose rates or a temperature by NLL: {facts}. Pass a larger --val"]


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
