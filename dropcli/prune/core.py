"""``dropcli prune``: sparse variational dropout or SBP fine-tuning, thresholding, shrinking.

The pipeline, on a GraphModule of real modules (:func:`dropcli.importer.to_modules`):

1. sparse-vd: every Linear / Conv1d / Conv2d becomes a :class:`~.layers.LinearSVD` /
   :class:`~.layers.ConvSVD` initialised from the trained weights (``log sigma^2 = -10``);
   sbp: an :class:`~.layers.SBPNoise` follows every hidden Linear / Conv.
2. Fine-tune with the SGVLB: ``mean data loss + beta * sum KL / N`` (the per-example form of
   ``N * mean loss + beta * sum KL``), ``beta`` ramped linearly from 0 to ``--kl-weight`` over the
   first half of the epochs.
3. sparse-vd: weights with ``log alpha > threshold`` become 0 and the layers plain again; sbp:
   units with ``SNR <= 1`` get a zero row, the others their ``E[theta]`` folded into the weights.
   Then :func:`retrain` fine-tunes the kept weights without noise (``--retrain-epochs``).
4. :func:`~.shrink.shrink` removes dead units for real.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from dropcli.errors import DropcliError
from dropcli.backends.torch.fx import set_module
from dropcli.training.loop import Split, fit
from dropcli.prune.layers import SBPNoise, SparseVD, to_sparse_vd
from dropcli.prune.shrink import ShrinkResult, output_layers, prunable_layers, shrink

METHODS = ("sparse-vd", "sbp")
# defaults chosen with benchmarks/prune_digits.py
DEFAULTS = {"epochs": 100, "lr": 3e-3, "batch_size": 64, "threshold": 3.0, "kl_weight": 1.0, "var_lr_scale": 10.0,
            "retrain_epochs": 10, "retrain_lr_scale": 0.1}
RAMP = 0.5  # fraction of training over which beta goes from 0 to --kl-weight
DECAY_FROM = None  # fraction of training after which the learning rate decays linearly to 0


@dataclass
class PruneConfig:
    method: str = "sparse-vd"
    epochs: int = DEFAULTS["epochs"]
    threshold: float = DEFAULTS["threshold"]
    kl_weight: float = DEFAULTS["kl_weight"]
    lr: float = DEFAULTS["lr"]
    batch_size: int = DEFAULTS["batch_size"]
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False
    retrain_epochs: int = DEFAULTS["retrain_epochs"]
    progress: Any = None  # progress(label, total) -> advance(k, info): see dropcli.training.loop.fit


@dataclass
class PruneResult:
    model: fx.GraphModule
    layers: list[dict[str, Any]]
    log_alpha: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    shrink: ShrinkResult | None = None


def beta_at(progress: float, kl_weight: float) -> float:
    return kl_weight * min(1.0, progress / RAMP)


def _svd_modules(gm: nn.Module) -> dict[str, SparseVD]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, SparseVD)}


def attach_sparse_vd(gm: fx.GraphModule, threshold: float) -> dict[str, SparseVD]:
    layers = prunable_layers(gm)
    out = {}
    for name, m in layers.items():
        svd = to_sparse_vd(m, threshold)
        set_module(gm, name, svd)
        out[name] = svd
    return out


def attach_sbp(gm: fx.GraphModule, protected: set[str]) -> dict[str, SBPNoise]:
    layers = prunable_layers(gm)
    g = gm.graph
    out = {}
    for n in list(g.nodes):
        if n.op != "call_module" or n.target not in layers or n.target in protected:
            continue
        m = layers[n.target]
        name = n.target.replace(".", "_") + "_sbp"
        noise = SBPNoise(m.weight.shape[0])
        gm.add_module(name, noise)
        with g.inserting_after(n):
            new = g.call_module(name, (n,))
        n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        out[n.target] = noise
    gm.recompile()
    return out


def finalize_sparse_vd(gm: fx.GraphModule, svd: dict[str, SparseVD]) -> dict[str, np.ndarray]:
    log_alpha = {}
    for name, m in svd.items():
        log_alpha[name] = m.log_alpha().detach().cpu().numpy().ravel()
        set_module(gm, name, m.to_plain())
    return log_alpha


def finalize_sbp(gm: fx.GraphModule, sbp: dict[str, SBPNoise]) -> dict[str, np.ndarray]:
    """Fold ``E[theta] * [SNR > 1]`` into each layer's rows and take the noise out of the graph."""
    snrs = {}
    g = gm.graph
    by_name = {id(m): layer for layer, m in sbp.items()}
    for n in list(g.nodes):
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), SBPNoise):
            noise = gm.get_submodule(n.target)
            layer = gm.get_submodule(by_name[id(noise)])
            with torch.no_grad():
                mean, _ = noise.moments()
                snr = noise.snr()
                scale = mean * (snr > 1).to(mean.dtype)
                layer.weight.mul_(scale.reshape([-1] + [1] * (layer.weight.dim() - 1)))
                if layer.bias is not None:
                    layer.bias.mul_(scale)
            snrs[by_name[id(noise)]] = snr.detach().cpu().numpy()
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return snrs


def layer_stats(gm: nn.Module, include_svd: bool = False) -> dict[str, dict[str, Any]]:
    out = {}
    layers = dict(prunable_layers(gm))
    if include_svd:
        layers.update(_svd_modules(gm))
    for name, m in layers.items():
        w = m.weight.detach()
        out[name] = {"type": type(m).__name__, "shape": list(w.shape), "weights": int(w.numel()),
                     "nonzero": int((w != 0).sum()), "units": int(w.shape[0])}
    return out


def count_params(gm: nn.Module) -> tuple[int, int]:
    """(all parameters, nonzero parameters); BatchNorm statistics and sparse-VD variances are not counted."""
    total = nz = 0
    for name, p in gm.named_parameters():
        if name.endswith("log_sigma2"):
            continue
        total += p.numel()
        nz += int((p != 0).sum())
    return total, nz


def prune(gm: fx.GraphModule, example: tuple, train: Split | None, task: str, cfg: PruneConfig) -> PruneResult:
    """Prune a GraphModule of real modules; returns a new plain GraphModule and per-layer rows."""
    if cfg.method not in METHODS:
        from dropcli.errors import UsageError

        raise UsageError(f"unknown --method {cfg.method!r}", f"choose one of {', '.join(METHODS)}")
    gm = copy.deepcopy(gm).eval()
    existing = _svd_modules(gm)
    before = layer_stats(gm, include_svd=True)
    if not before:
        raise DropcliError("the model has no prunable layers (Linear, Conv1d or Conv2d with stored weights)",
                           "dropcli prune works on models built from Linear / Conv layers")
    protected = output_layers(gm)
    log_alpha: dict[str, np.ndarray] = {}
    history: list[dict[str, float]] = []
    if existing:
        # already sparse-VD layers (trained by the user): prune by their own scores
        for m in existing.values():
            m.threshold = cfg.threshold
        log_alpha = finalize_sparse_vd(gm, existing)
    else:
        if train is None:
            raise DropcliError("pruning needs training data", "pass --data TRAIN (.npz with x and y, .pt or .csv)")
        n = len(train)
        gm.to(cfg.device)
        if cfg.method == "sparse-vd":
            mods = attach_sparse_vd(gm, cfg.threshold)
            var_params = [m.log_sigma2 for m in mods.values()]
        else:
            mods = attach_sbp(gm, protected)
            if not mods:
                raise DropcliError("the model has no hidden Linear / Conv layer whose units SBP could remove",
                                   "use --method sparse-vd")
            var_params = [p for m in mods.values() for p in (m.mu, m.log_sigma)]
        var_ids = {id(p) for p in var_params}
        weights = [p for p in gm.parameters() if id(p) not in var_ids]
        groups = [{"params": weights, "lr": cfg.lr}, {"params": var_params, "lr": cfg.lr * DEFAULTS["var_lr_scale"]}]
        ms = list(mods.values())

        def reg(progress: float):
            kl = sum(m.kl() for m in ms)
            beta = beta_at(progress, cfg.kl_weight)
            return beta * kl / n, {"kl": float(kl.detach()) / n, "beta": beta}

        def describe() -> str:
            with torch.no_grad():
                if cfg.method == "sparse-vd":
                    kept = sum(int(m.keep_mask().sum()) for m in ms)
                    tot = sum(m.weight.numel() for m in ms)
                    return f"sparsity {1 - kept / tot:.3f}"
                kept = sum(int((m.snr() > 1).sum()) for m in ms)
                tot = sum(m.mu.numel() for m in ms)
                return f"units removed {1 - kept / tot:.3f}"

        history = fit(gm, train, task, params=groups, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                      device=cfg.device, regulariser=reg, train_modules=ms, describe=describe, quiet=cfg.quiet, progress=cfg.progress,
                      label=f"prune ({cfg.method})", decay_from=DECAY_FROM)
        if cfg.method == "sparse-vd":
            log_alpha = finalize_sparse_vd(gm, mods)
        else:
            log_alpha = {k: np.log(np.maximum(v, 1e-30)) for k, v in finalize_sbp(gm, mods).items()}
        if cfg.retrain_epochs > 0:
            history += retrain(gm, train, task, cfg)
        gm.to("cpu")
    gm = _clean(gm)
    mid = layer_stats(gm)
    for name, st in mid.items():
        if st["nonzero"] == 0:
            raise DropcliError(f"the threshold removes every weight of layer {name}",
                               "prune less: raise --threshold, lower --kl-weight or use fewer --epochs")
    res = shrink(gm, example, protected)
    gm = _clean(gm)
    after = layer_stats(gm)
    rows = []
    for name, b in before.items():
        a = after.get(name)
        nz = a["nonzero"] if a else 0
        rows.append({
            "layer": name, "type": b["type"], "shape_before": b["shape"], "shape_after": a["shape"] if a else None,
            "weights_before": b["weights"], "weights_kept": nz,
            "sparsity": 1 - nz / b["weights"] if b["weights"] else 0.0,
            "units_before": b["units"], "units_removed": res.removed.get(name, 0),
        })
    return PruneResult(gm, rows, log_alpha, history, res)


def retrain(gm: fx.GraphModule, train: Split, task: str, cfg: PruneConfig) -> list[dict[str, float]]:
    """A short deterministic fine-tune of the surviving weights (no noise, no KL), at a tenth of the
    learning rate and decaying to 0. Pruned weights get a zero gradient, so with a fresh Adam they
    stay exactly 0 and the sparsity pattern is the one the threshold chose."""
    gm.to(cfg.device)
    hooks = []
    for m in prunable_layers(gm).values():
        mask = (m.weight.detach() != 0).to(m.weight.dtype)
        hooks.append(m.weight.register_hook(lambda g, mask=mask: g * mask))
    try:
        params = [{"params": [p for p in gm.parameters() if p.requires_grad], "lr": cfg.lr * DEFAULTS["retrain_lr_scale"]}]
        return fit(gm, train, task, params=params, epochs=cfg.retrain_epochs, batch_size=cfg.batch_size, seed=cfg.seed + 1,
                   device=cfg.device, quiet=cfg.quiet, progress=cfg.progress, label="retrain kept weights", decay_from=0.0)
    finally:
        for h in hooks:
            h.remove()


def _clean(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule of the same graph (drops training-time attributes)."""
    gm.delete_all_unused_submodules()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm.eval()
