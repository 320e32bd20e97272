"""Pruning by variational dropout: ``dropcli.prune`` (and `dropcli prune`, which renders it)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

from dropcli.api.common import is_path, load_opts, resolve_model


def check_prune_args(*, method: str = "sparse-vd", epochs: Optional[int] = None, threshold: float = 3.0,
                     kl_weight: float = 1.0, lr: Optional[float] = None, batch_size: Optional[int] = None,
                     retrain_epochs: Optional[int] = None, task: str = "auto", device: str = "cpu",
                     plot: Optional[str] = None, **_: Any) -> dict:
    """The option checks of `dropcli prune` (UsageError; a missing matplotlib with ``plot``); the
    settings with their defaults filled in (epochs, lr, batch_size, retrain_epochs, device)."""
    import numpy as np

    from dropcli.errors import UsageError
    from dropcli.prune.core import DEFAULTS, METHODS
    from dropcli.api.common import resolve_device

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
        from dropcli.analysis.plot import import_pyplot

        import_pyplot()  # fail before training when matplotlib is missing
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "retrain_epochs": retrain_epochs, "device": dev}


def latency(models: dict, x: Any, repeats: int = 30) -> dict[str, float]:
    """Median milliseconds per forward pass, the models timed in turn (side by side)."""
    import torch

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


def prune(model: Any, data: Any, output: str, *, val: Optional[str] = None, method: str = "sparse-vd",
          epochs: Optional[int] = None, threshold: float = 3.0, kl_weight: float = 1.0, lr: Optional[float] = None,
          batch_size: Optional[int] = None, retrain_epochs: Optional[int] = None, task: str = "auto",
          device: str = "cpu", seed: int = 0, plot: Optional[str] = None, force: bool = False,
          trust_pickle: bool = False, imports: Optional[Sequence[str]] = None, arch: Optional[str] = None,
          input_shape: Optional[str] = None, progress: Callable | None = None) -> dict:
    """Prune ``model`` (a path or a loaded model) with sparse variational dropout (``method=
    "sparse-vd"``) or structured Bayesian pruning (``"sbp"``) fine-tuned on ``data`` (a path:
    .npz with x and y, .pt, .csv), remove dead units for real and write the result to ``output``
    in the input's format. Returns the report of `dropcli prune --json` ({"summary", "layers"})."""
    import torch

    from dropcli.errors import DropcliError, UsageError
    from dropcli.io.files import check_output_path, file_size
    from dropcli.prune.core import PruneConfig, count_params, prune as run_prune
    from dropcli.prune.shrink import prunable_layers
    from dropcli.prune.sites import modules_with_sparse_vd
    from dropcli.training.loop import check_import, evaluate, load_split, model_example, save_like_input

    cfg_args = check_prune_args(method=method, epochs=epochs, threshold=threshold, kl_weight=kl_weight, lr=lr,
                                batch_size=batch_size, retrain_epochs=retrain_epochs, task=task, device=device, plot=plot)
    epochs, lr, batch_size = cfg_args["epochs"], cfg_args["lr"], cfg_args["batch_size"]
    retrain_epochs, dev = cfg_args["retrain_epochs"], cfg_args["device"]
    inputs = [str(model) if is_path(model) else getattr(model, "source", None)] + [p for p in (data, val) if p]
    check_output_path(output, inputs, force=force)
    loaded, model_path = resolve_model(model, load_opts(trust_pickle, imports, arch, input_shape), copy=True)
    example = model_example(loaded)
    # sparse-VD sites (`dropcli inject --variant sparse-vd`, then the user's training) come back as
    # sparse-VD layers, pruned by their own scores
    gm, _ = modules_with_sparse_vd(loaded, threshold)
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
        train, vsplit, task = load_split(str(data), str(val) if val else None, example, tuple(ref.shape[1:]), task, seed)
        # the importer must not change the function: check it on real inputs before training
        check_import(loaded, gm, vsplit.x[:64])
    cfg = PruneConfig(method=method, epochs=epochs, threshold=threshold, kl_weight=kl_weight, lr=lr,
                      batch_size=batch_size, seed=seed, device=dev, quiet=progress is None, retrain_epochs=retrain_epochs,
                      progress=progress)
    before_metrics = evaluate(gm, vsplit, task) if vsplit is not None else None
    result = run_prune(gm, example, train, task, cfg)
    pruned = result.model
    after_metrics = evaluate(pruned, vsplit, task) if vsplit is not None else None
    xlat = vsplit.x[:256] if vsplit is not None else torch.cat([example[0]] * 32)
    lat = latency({"before": gm, "after": pruned}, xlat)
    p_before, nz_before = count_params(gm)
    p_after, nz_after = count_params(pruned)
    w_before = sum(r["weights_before"] for r in result.layers)
    w_after = sum(r["weights_kept"] for r in result.layers)
    # write: the input's format (ONNX stays ONNX), checked with its stock loader before it lands
    fmt, err = save_like_input(pruned, loaded, example, model_path, output, xlat[:64])
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
        from dropcli.analysis.plot import write_log_alpha_plot

        write_log_alpha_plot(plot, result.log_alpha, threshold if method == "sparse-vd" else 0.0,
                             "log alpha" if method == "sparse-vd" else "log SNR")
    return report
