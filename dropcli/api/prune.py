"""Pruning by variational dropout: ``dropcli.prune`` (and `dropcli prune`, which renders it)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dropcli.api.common import is_path, load_opts, resolve_model
from dropcli.engines.fixed import trainable


def check_prune_args(*, method: str = "sparse-vd", epochs: Optional[int] = None, threshold: Optional[float] = None,
                     kl_weight: Optional[float] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
                     retrain_epochs: Optional[int] = None, task: str = "auto", device: str = "cpu",
                     plot: Optional[str] = None, max_drop: Optional[float] = None, **_: Any) -> dict:
    """The option checks of `dropcli prune` (UsageError; a missing matplotlib with ``plot``); the
    settings with their defaults filled in (epochs, lr, batch_size, retrain_epochs, device, kl_weight)."""
    import numpy as np

    from dropcli.errors import UsageError
    from dropcli.prune.core import DEFAULTS, METHODS
    from dropcli.api.common import resolve_device

    if method not in METHODS:
        raise UsageError(f"unknown --method {method!r}", f"choose one of {', '.join(METHODS)}")
    epochs = DEFAULTS["epochs"] if epochs is None else epochs
    kl_weight = DEFAULTS["kl_weight"] if kl_weight is None else kl_weight
    lr = DEFAULTS["lr"] if lr is None else lr
    batch_size = DEFAULTS["batch_size"] if batch_size is None else batch_size
    # the retrain of the kept weights is no longer than the fine-tune: a quick --epochs 1 trial is
    # not dominated by up to seven retrains of the default length
    retrain_epochs = min(DEFAULTS["retrain_epochs"], epochs) if retrain_epochs is None else retrain_epochs
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
    if threshold is not None and not np.isfinite(threshold):
        raise UsageError(f"--threshold must be a finite number, got {threshold}")
    if threshold is not None and method == "sbp":
        raise UsageError("--threshold is a log-alpha cut of --method sparse-vd; sbp removes the units whose SNR is 1 or less",
                         "leave out --threshold with --method sbp (bound the loss with --max-drop)")
    if max_drop is not None and not (np.isfinite(max_drop) and max_drop >= 0):
        raise UsageError(f"--max-drop must be a number of 0 or more, got {max_drop}",
                         "accuracy points for classification (1.5 = 1.5 points), percent of the validation loss for regression")
    if task not in ("auto", "classification", "regression"):
        raise UsageError(f"unknown --task {task!r}", "choose auto, classification or regression")
    dev = resolve_device(device)
    if plot:
        from dropcli.analysis.plot import import_pyplot

        import_pyplot()  # fail before training when matplotlib is missing
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "retrain_epochs": retrain_epochs, "device": dev,
            "kl_weight": kl_weight}


def latency(models: dict, x: Any, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds per forward pass, the models timed in turn (side by side)."""
    import torch

    from dropcli.training.loop import feed

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                feed(m, x)
        for _ in range(repeats):
            for k, m in models.items():
                t0 = time.perf_counter()
                feed(m, x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def prune(model: Any, data: Any, output: str, *, val: Optional[str] = None, method: str = "sparse-vd",
          epochs: Optional[int] = None, threshold: Optional[float] = None, max_drop: Optional[float] = None,
          kl_weight: Optional[float] = None, lr: Optional[float] = None,
          batch_size: Optional[int] = None, retrain_epochs: Optional[int] = None, task: str = "auto",
          device: str = "cpu", seed: int = 0, plot: Optional[str] = None, force: bool = False, allow_larger: bool = False,
          trust_pickle: bool = False, imports: Optional[Sequence[str]] = None, arch: Optional[str] = None,
          input_shape: Optional[str] = None, progress: Callable | None = None) -> dict:
    """Prune ``model`` (a path or a loaded model) with sparse variational dropout (``method=
    "sparse-vd"``) or structured Bayesian pruning (``"sbp"``) fine-tuned on ``data`` (a path:
    .npz with x and y, .pt, .csv), remove dead units for real and write the result to ``output``
    in the input's format. Returns the report of `dropcli prune --json` ({"summary", "layers", "curve"}).

    ``max_drop``: the most validation accuracy (points; regression: percent of the loss) the
    pruned model may lose; without ``threshold``, prune chooses the most compressive cut within
    it. :class:`~dropcli.errors.NotMet` (exit 4, nothing written; its ``report`` says what was
    measured) when nothing fits it, or when the output would not be smaller than the input (on disk
    and in parameters; ``allow_larger`` writes it anyway, with a warning in the report)."""
    import torch

    from dropcli.errors import DropcliError, NotMet, UsageError
    from dropcli.io.files import atomic_path, check_output_path, file_size, write_bytes
    from dropcli.prune.core import DEFAULTS, Z_BUDGET, PruneConfig, budget_drop, count_params, mixed_share, prune as run_prune
    from dropcli.prune.shrink import prunable_layers
    from dropcli.prune.sites import modules_with_sparse_vd
    from dropcli.backends.torch.outputs import first_output_view
    from dropcli.training.loop import (check_import, evaluate, input_names, load_split, model_example, name_outputs, rows_like,
                                       save_like_input)

    cfg_args = check_prune_args(method=method, epochs=epochs, threshold=threshold, kl_weight=kl_weight, lr=lr,
                                batch_size=batch_size, retrain_epochs=retrain_epochs, task=task, device=device, plot=plot,
                                max_drop=max_drop)
    if max_drop is not None and data is None:
        raise UsageError("--max-drop needs validation data", "pass --data TRAIN (and --val VAL)")
    epochs, lr, batch_size, kl_weight = cfg_args["epochs"], cfg_args["lr"], cfg_args["batch_size"], cfg_args["kl_weight"]
    retrain_epochs, dev = cfg_args["retrain_epochs"], cfg_args["device"]
    inputs = [str(model) if is_path(model) else getattr(model, "source", None)] + [p for p in (data, val) if p]
    check_output_path(output, inputs, force=force)
    loaded, model_path = resolve_model(model, load_opts(trust_pickle, imports, arch, input_shape, example_data=data), copy=True)
    loaded = trainable(loaded)  # a model saved with a fixed batch: freed, or refused in one line
    example = model_example(loaded)
    # sparse-VD sites (`dropcli inject --variant sparse-vd`, then the user's training) come back as
    # sparse-VD layers, pruned by their own scores
    gm, _ = modules_with_sparse_vd(loaded, DEFAULTS["threshold"] if threshold is None else threshold)
    has_svd = any(getattr(type(m), "dropcli_leaf", False) for m in gm.modules())
    if not prunable_layers(gm) and not has_svd:
        raise DropcliError("the model has no prunable layers (Linear, Conv1d or Conv2d with stored weights)",
                           "dropcli prune works on models built from Linear / Conv layers")
    # a model with several outputs (tuple, dict, ModelOutput) is trained, pruned and scored on its
    # first; the others are put back in the written model, in the structure the model returned
    full = gm
    view = first_output_view(full, example)
    if view is not None:
        gm = view.gm
        name_outputs(view, loaded)
    with torch.no_grad():
        ref = gm(*example)
    train = vsplit = None
    if data is None and not has_svd:
        raise UsageError("--data is required", "give training data (.npz with x and y, .pt or .csv)")
    if data is not None:
        train, vsplit, task = load_split(str(data), str(val) if val else None, example, tuple(ref.shape[1:]), task, seed,
                                         names=input_names(loaded))
        # the importer must not change the function: check it (every output) on real inputs before training
        check_import(loaded, full, vsplit.x[:64])
    cfg = PruneConfig(method=method, epochs=epochs, threshold=threshold, max_drop=max_drop, kl_weight=kl_weight, lr=lr,
                      batch_size=batch_size, seed=seed, device=dev, quiet=progress is None, retrain_epochs=retrain_epochs,
                      progress=progress)
    before_metrics = evaluate(gm, vsplit, task) if vsplit is not None else None
    settings = {
        "input": model_path, "output": output, "method": method, "task": task, "epochs": epochs,
        "retrain_epochs": retrain_epochs, "threshold": threshold, "max_drop": max_drop, "kl_weight": kl_weight, "lr": lr,
        "batch_size": batch_size, "seed": seed, "device": dev, "validation": vsplit.source if vsplit is not None else None,
        "pruned_on": view.describe() if view is not None else None,  # a model with several outputs: which one
        # how the budget is read (drop + budget_se * drop_se <= max_drop) and the fine-tune's data loss
        # (docs/prune.md): the dense model's share of it, and the share of each batch mixed (a single
        # floating-point input only)
        "budget_se": Z_BUDGET if max_drop is not None else None, "distill": cfg.distill,
        "mixed_share": mixed_share(train, cfg),
    }
    if before_metrics is not None:
        settings.update({f"val_{k}_before": v for k, v in before_metrics.items()})
    try:
        result = run_prune(gm, example, train, task, cfg, val=vsplit, reference=before_metrics)
    except NotMet as e:
        e.report = {"summary": {**settings, "outcome": "not_met", "reason": e.one_line()}, "layers": [],
                    "curve": getattr(e, "curve", None) or []}
        raise
    pruned = result.model
    after_metrics = result.metrics if result.metrics is not None else (evaluate(pruned, vsplit, task) if vsplit is not None else None)
    if view is not None:
        pruned = view.restore(pruned, example)
    gm = full
    xlat = vsplit.x[:256] if vsplit is not None else rows_like(example, 64)
    lat = latency({"before": gm, "after": pruned}, xlat)
    p_before, nz_before = count_params(gm)
    p_after, nz_after = count_params(pruned)
    w_before = sum(r["weights_before"] for r in result.layers)
    w_after = sum(r["weights_kept"] for r in result.layers)
    summary = {
        **settings, "kl_weight": result.kl_weight, "rounds": max([p.get("round", 1) for p in result.curve] or [1]),
        "threshold": result.threshold, "threshold_chosen_by": _chosen_by(method, threshold, max_drop, has_svd and train is None),
        "chosen_retrained": next((p.get("chosen_retrained") for p in result.curve if p.get("chosen") and "chosen_retrained" in p), None),
        "outcome": "written", "weights_before": w_before, "weights_after": w_after,
        "compression": w_before / max(w_after, 1),
        "params_before": p_before, "params_after": p_after, "nonzero_params_before": nz_before,
        "nonzero_params_after": nz_after, "param_compression": nz_before / max(nz_after, 1),
        "size_before": file_size(model_path), "size_after": None,
        "latency_ms_before": lat["before"], "latency_ms_after": lat["after"], "latency_batch": int(len(xlat)),
        "units_folded": result.shrink.folded if result.shrink else 0,
    }
    for key, m in (("before", before_metrics), ("after", after_metrics)):
        if m is not None:
            for k, v in m.items():
                summary[f"val_{k}_{key}"] = v
    if before_metrics is not None and after_metrics is not None:
        summary["val_drop"] = budget_drop(before_metrics, after_metrics, task)
        summary["val_drop_unit"] = "accuracy points" if task == "classification" else "% of the validation loss"
        summary["val_drop_se"] = result.drop_se
    report = {"summary": summary, "layers": result.layers, "curve": result.curve}
    # write: the input's format (ONNX stays ONNX), staged, re-loaded with its stock loader and
    # compared, and only then (when it is smaller than the input) copied atomically to `output`
    with tempfile.TemporaryDirectory(prefix="dropcli-prune.") as td:
        staged = Path(td) / (Path(output).name if output != "-" else "stdout")
        fmt, diff = save_like_input(pruned, loaded, example, model_path, str(staged), xlat[:64])
        if fmt == "onnx":
            diff = strip_onnx_debug(staged, pruned, xlat[:64])
        check = check_saved(fmt, diff)
        summary.update({"format": fmt, "size_after": staged.stat().st_size, **check})
        # parameters as stored: a model with sparse-VD sites also holds their variances
        stored_before = sum(p.numel() for p in gm.parameters())
        not_smaller = summary["size_after"] >= summary["size_before"] or p_after >= stored_before
        if not_smaller and allow_larger:
            summary["outcome"] = "written_not_smaller"
            summary.setdefault("warnings", []).append(
                "the pruned model is not smaller than the input (see size_after and params_after); written because of --allow-larger")
        elif not_smaller:
            summary["outcome"] = "not_smaller"
            raise NotMet(f"the pruned model would not be smaller than the input ({summary['size_before']:,} -> "
                         f"{summary['size_after']:,} bytes on disk, {stored_before:,} -> {p_after:,} parameters), so nothing was written",
                         "pruned weights only shrink the file when whole neurons or channels go: train longer (--epochs), "
                         "raise --kl-weight or --max-drop, or try --method sbp (--allow-larger writes it anyway)", report=report)
        extra = [f for f in Path(td).iterdir() if f != staged]  # an ONNX model's external weights (<name>.data)
        for f in extra:
            with atomic_path(Path(output).parent / f.name) as tmp:
                write_bytes(tmp, f.read_bytes())
        with atomic_path(output, staged.suffix) as tmp:
            write_bytes(tmp, staged.read_bytes())
    if output == "-":
        summary["size_after"] = file_size(output, output=True)
    if before_metrics is not None and after_metrics is not None and max_drop is None \
            and summary["val_drop"] > WARN_DROP:
        summary.setdefault("warnings", []).append(f"validation {'accuracy fell by' if task == 'classification' else 'loss rose by'} "
                               f"{summary['val_drop']:.2f} {summary['val_drop_unit']}; bound it with --max-drop")
    if plot:
        from dropcli.analysis.plot import write_log_alpha_plot

        write_log_alpha_plot(plot, result.log_alpha, result.threshold if method == "sparse-vd" else 0.0,
                             "log alpha" if method == "sparse-vd" else "log SNR", curve=result.curve,
                             unit=summary.get("val_drop_unit"), budget=max_drop)
    return report


WARN_DROP = 1.0  # without --max-drop, a larger validation loss than this gets a warning in the report


def _chosen_by(method: str, threshold: Optional[float], max_drop: Optional[float], own_scores: bool) -> str:
    if method == "sbp":
        return "sbp: units with SNR <= 1 go"
    if threshold is not None:
        return "--threshold"
    if max_drop is not None and not own_scores:
        return "--max-drop: the most compressive cut within it on validation"
    return "default (3)"


def strip_onnx_debug(path: Path, model: Any, x: Any) -> float:
    """Drop the exporter's per-node debug records (``pkg.torch.onnx.*`` stack traces, FX nodes,
    name scopes: about 1 KB a node, which can make a pruned file bigger than its input), then check
    the file again with onnxruntime. Returns the max abs difference."""
    import onnx

    from dropcli.backends.onnx.model import save_onnx
    from dropcli.training.loop import verify_saved

    m = onnx.load(str(path))
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer) or \
        path.with_name(path.name + ".data").exists()
    for node in m.graph.node:
        keep = [p for p in node.metadata_props if not (p.key.startswith("pkg.torch.onnx.") or p.key == "namespace")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    save_onnx(m, path, external=external)
    return verify_saved(path, "onnx", model, x)


def check_saved(fmt: str, diff: float) -> dict:
    """How the written model was checked: ``save_like_input`` re-loads every output with its
    stock loader (ONNX: onnxruntime, TorchScript: torch.jit.load, .pt2: torch.export.load, pickle:
    torch.load) and compares it with the pruned model before it lands."""
    from dropcli.errors import DropcliError
    from dropcli.model import formats

    if not diff <= 1e-4:
        raise DropcliError(f"internal error: the written {fmt} model differs from the pruned model by {diff:.3g}; nothing was written",
                           "please report this model")
    loader = {formats.ONNX: "onnxruntime", formats.TORCHSCRIPT: "torch.jit.load", formats.EXPORT: "torch.export.load",
              formats.PICKLE: "torch.load"}[fmt]
    return {"saved_check": loader, "max_abs_diff_saved": diff}
