"""``dropcli prune``: sparse variational dropout or SBP fine-tuning, thresholding, shrinking.

The pipeline, on a GraphModule of real modules (:func:`dropcli.importer.to_modules`):

1. sparse-vd: every Linear / Conv1d / Conv2d becomes a :class:`~.layers.LinearSVD` /
   :class:`~.layers.ConvSVD` initialised from the trained weights (``log sigma^2 = -10``);
   sbp: an :class:`~.layers.SBPNoise` follows every hidden Linear / Conv.
2. Fine-tune with the SGVLB: ``mean data loss + beta * sum KL / N`` (the per-example form of
   ``N * mean loss + beta * sum KL``), ``beta`` ramped linearly from 0 to ``--kl-weight`` over the
   first half of the epochs. The data loss is distilled from the dense model (:func:`distill_loss`,
   here and in the retrain): the model already fits its training split, and labels alone pulled
   the fine-tuned function away from the one that generalised (docs/prune.md). Half of each batch's
   rows are mixtures of two training rows, labelled by the dense model alone (:class:`Distiller`).
3. sparse-vd: weights with ``log alpha > threshold`` become 0 and the layers plain again; sbp:
   units with ``SNR <= 1`` get a zero row, the others their ``E[theta]`` folded into the weights.
   Then :func:`retrain` fine-tunes the kept weights without noise (``--retrain-epochs``).
4. :func:`~.shrink.shrink` removes dead units for real.

With an accuracy budget (``--max-drop``, :func:`budget_drop`) and no fixed ``--threshold``, step 3
is a walk along the trade-off curve (:func:`sweep`): the trained ``log alpha`` values are cut at
every threshold of :data:`SWEEP` and each cut is scored on the validation split (cheap: no
training). Retraining the kept weights (step 3) wins back accuracy, so the walk then retrains
cuts and bisects between the most compressive retrained cut known to break the budget and the least
compressive one known to keep it, starting from the most compressive cut that fits before
retraining (when none does: from the cut that loses least, then the least compressive), for at most :data:`MAX_TRIES`
retrains. The most compressive model within the budget wins, a retrained cut or a cut as it is
(retraining can also fit the training split harder and lose on validation); nothing within it is
a :class:`~dropcli.errors.NotMet`, after one more round: the whole fine-tune again with half the
KL weight (less pruning pressure), walked the same way.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dropcli.errors import DropcliError, NotMet
from dropcli.backends.torch.fx import set_module
from dropcli.training import loop
from dropcli.training.loop import Split, feed, fit
from dropcli.prune.layers import SBPNoise, SparseVD, to_sparse_vd
from dropcli.prune.shrink import ShrinkResult, output_layers, prunable_layers, shrink

METHODS = ("sparse-vd", "sbp")
# defaults chosen with benchmarks/prune_digits.py --tune, on validation only (docs/prune.md)
DEFAULTS = {"epochs": 100, "lr": 3e-3, "batch_size": 64, "threshold": 3.0, "kl_weight": 0.5, "var_lr_scale": 10.0,
            "retrain_epochs": 10, "retrain_lr_scale": 0.1, "distill": 0.5, "distill_temperature": 2.0,
            "mix": 0.5}
# --max-drop: the log-alpha thresholds the walk scores (log alpha is clamped to [-8, 8]), and the
# most retrains it spends on the cuts around the best pre-retrain one
SWEEP = tuple(float(t) for t in np.arange(-2.0, 8.01, 0.5))
MAX_TRIES = 6
# a model fits the budget when its validation drop plus Z_BUDGET standard errors (paired over the
# validation examples) is within --max-drop: the drop is measured on finite data, and the walk picks
# the cut at the budget's edge, where noise in its favour would otherwise decide. 1.5: the walk
# looks at up to MAX_TRIES + 1 models and keeps the most compressive that passes; of 1, 1.5 and 2,
# the largest margin that kept the tuning models' compression targets on validation (docs/prune.md)
Z_BUDGET = 1.5
SECOND_ROUND_KL = 0.5  # when no cut fits, one more training round at this fraction of the KL weight
RAMP = 0.5  # fraction of training over which beta goes from 0 to --kl-weight
DECAY_FROM = None  # fraction of training after which the learning rate decays linearly to 0


@dataclass
class PruneConfig:
    method: str = "sparse-vd"
    epochs: int = DEFAULTS["epochs"]
    threshold: float | None = DEFAULTS["threshold"]  # None: chosen by the walk (needs max_drop)
    max_drop: float | None = None  # accuracy points (classification) / % of the loss (regression)
    kl_weight: float = DEFAULTS["kl_weight"]
    lr: float = DEFAULTS["lr"]
    batch_size: int = DEFAULTS["batch_size"]
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False
    retrain_epochs: int = DEFAULTS["retrain_epochs"]
    # weight of the dense model's outputs in the data loss of the fine-tune and the retrain
    # (knowledge distillation, :func:`distill_loss`); 0: the labels alone
    distill: float = DEFAULTS["distill"]
    # share of each batch's rows replaced by mixtures of two rows, labelled by the dense model alone
    # (function matching: :class:`Distiller`); 0: the training rows only
    mix: float = DEFAULTS["mix"]
    progress: Any = None  # progress(label, total) -> advance(k, info): see dropcli.training.loop.fit


@dataclass
class PruneResult:
    model: fx.GraphModule
    layers: list[dict[str, Any]]
    log_alpha: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    shrink: ShrinkResult | None = None
    threshold: float | None = None  # the threshold used (sparse-vd)
    curve: list[dict[str, Any]] = field(default_factory=list)  # the trade-off curve walked
    metrics: dict[str, float] | None = None  # validation metrics of the returned model
    kl_weight: float | None = None  # the KL weight of the training round the model came from
    drop_se: float | None = None  # standard error of the validation drop (paired over examples)


@torch.no_grad()
def score(model: nn.Module, split: Split, task: str, device: str = "cpu", batch_size: int = 512) -> dict[str, Any]:
    """:func:`~dropcli.training.loop.evaluate`'s metrics, plus ``per_example``: 1/0 correct
    (classification) or the loss (regression) of every example, for :func:`drop_se`."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    losses, correct = [], []
    try:
        for i in range(0, len(split), batch_size):
            xb, yb = split.x[i:i + batch_size].to(device), split.y[i:i + batch_size].to(device)
            out = feed(model, xb)
            if task == "classification":
                losses.append(torch.nn.functional.cross_entropy(out, yb, reduction="none").double().cpu())
                correct.append((out.argmax(-1) == yb).double().cpu())
            else:
                losses.append(((out - yb) ** 2).reshape(len(xb), -1).mean(1).double().cpu())
    finally:
        for m, t in was:
            m.training = t
    loss = torch.cat(losses).numpy()
    res: dict[str, Any] = {"loss": float(loss.mean())}
    if task == "classification":
        per = torch.cat(correct).numpy()
        res["accuracy"] = float(per.mean())
    else:
        per = loss
        res["rmse"] = math.sqrt(res["loss"])
    res["per_example"] = per
    return res


def drop_se(before: dict[str, Any], after: dict[str, Any], task: str) -> float | None:
    """The standard error of :func:`budget_drop`, paired over the validation examples."""
    a, b = before.get("per_example"), after.get("per_example")
    if a is None or b is None or len(a) < 2:
        return None
    if task == "classification":
        d = 100.0 * (a - b)
    else:
        d = 100.0 * (b - a) / max(float(np.mean(a)), 1e-12)
    return float(np.std(d, ddof=1) / math.sqrt(len(d)))


def _public(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    return None if metrics is None else {k: v for k, v in metrics.items() if k != "per_example"}


def budget_drop(before: dict[str, float], after: dict[str, float], task: str) -> float:
    """What ``--max-drop`` bounds: accuracy points lost (classification), or the validation loss's
    rise in percent of the dense model's (regression)."""
    if task == "classification":
        return 100.0 * (before["accuracy"] - after["accuracy"])
    return 100.0 * (after["loss"] - before["loss"]) / max(before["loss"], 1e-12)


@torch.no_grad()
def teacher_outputs(gm: nn.Module, train: Split, device: str = "cpu", batch_size: int = 512) -> torch.Tensor:
    """The dense model's outputs on every training example (eval mode), for :func:`distill_loss`."""
    was = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        return torch.cat([feed(gm, train.x[i:i + batch_size].to(device)).detach().cpu() for i in range(0, len(train), batch_size)])
    finally:
        for m, t in was:
            m.training = t


def mixable(x: Any) -> bool:
    """Whether :class:`Distiller` can mix these rows: a single floating-point input (not token ids,
    not an :class:`~dropcli.training.loop.Inputs` of several)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def mixed_share(train: Split | None, cfg: "PruneConfig") -> float:
    """The share of each batch's rows :class:`Distiller` mixes: ``cfg.mix`` for a single
    floating-point input under distillation, else 0 (token ids, several inputs, labels only)."""
    if cfg.distill <= 0 or train is None or not mixable(train.x):
        return 0.0
    return cfg.mix


def distill_loss(teacher: torch.Tensor, task: str, weight: float, temperature: float | None = None,
                 model: nn.Module | None = None, mix: float = 0.0, seed: int = 0) -> "Distiller":
    """The data loss with knowledge distillation, as :func:`~dropcli.training.loop.fit`'s ``loss_fn``
    (and ``transform``): see :class:`Distiller`."""
    return Distiller(teacher, task, weight, DEFAULTS["distill_temperature"] if temperature is None else temperature,
                     model, mix, seed)


class Distiller:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015) from the dense model, with function
    matching on mixed inputs (Beyer et al. 2022).

    On a training example the loss is ``(1 - weight) * loss(labels) + weight * loss(teacher)``.
    Classification: the teacher term is ``T^2 * KL(softmax(teacher / T) || softmax(out / T))`` (the
    ``T^2`` keeps its gradients on the scale of the label term's); regression: the mean squared error
    to the teacher's outputs. ``teacher`` holds the dense model's outputs on the training split.

    With ``mix > 0`` and a ``model`` (the dense one, frozen), :meth:`transform` replaces that share of
    each batch's rows by mixtures ``lam * x_i + (1 - lam) * x_j`` of two of its rows (``lam`` uniform
    in [0, 1]), which have no label: their loss is the teacher term alone, against the dense model's
    output on the mixture, computed there. The pruned model then matches the dense one between the
    training examples as well as on them, where test examples lie. Only a single floating-point
    input is mixed; other inputs (token ids) are passed through."""

    def __init__(self, teacher: torch.Tensor, task: str, weight: float, temperature: float,
                 model: nn.Module | None = None, mix: float = 0.0, seed: int = 0):
        self.teacher, self.task, self.weight, self.temperature = teacher, task, weight, temperature
        self.model, self.mix = model, (mix if model is not None else 0.0)
        self.gen = torch.Generator()
        self.reset(seed)
        self._mixed: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, teacher outputs) of the last batch

    def reset(self, seed: int) -> None:
        """Start the mixing draws afresh: each training run (the fine-tune, every retrained cut) gets
        the same draws whatever ran before it."""
        self.gen.manual_seed(seed + 7919)

    def transform(self, xb: Any, idx: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        """(the batch with its mixed rows, the mask of rows whose label applies: None for all)."""
        self._mixed = None
        if self.mix <= 0 or not mixable(xb) or len(xb) < 2:
            return xb, None
        n = len(xb)
        rows = torch.rand(n, generator=self.gen) < self.mix
        k = int(rows.sum())
        if k == 0:
            return xb, None
        partner = torch.randint(0, n, (k,), generator=self.gen)
        lam = torch.rand(k, generator=self.gen).view(-1, *([1] * (xb.dim() - 1)))
        rows_d = rows.to(xb.device)
        mixed = lam.to(xb.device) * xb[rows_d] + (1 - lam.to(xb.device)) * xb[partner.to(xb.device)]
        with torch.no_grad():
            t = feed(self.model, mixed).detach()
        xb = xb.clone()
        xb[rows_d] = mixed
        self._mixed = (rows_d, t)
        return xb, ~rows_d

    def __call__(self, out: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = self.teacher[idx].to(out.device)
        rows = None
        if self._mixed is not None:
            rows, tm = self._mixed
            t = t.clone()
            t[rows] = tm.to(t.dtype)
        if rows is None:
            hard = loop.data_loss(out, y, self.task)  # looked up at call time: the Ctrl-C tests interrupt it
            return (1.0 - self.weight) * hard + self.weight * self._soft(out, t, "mean")
        soft = self._soft(out, t, "none")
        # a mixture has no label: the teacher term alone, at full weight
        clean = ~rows
        k = int(clean.sum())
        hard = loop.data_loss(out[clean], y[clean], self.task) * k if k else out.sum() * 0.0
        soft_sum = self.weight * soft[clean].sum() + soft[rows].sum()
        return ((1.0 - self.weight) * hard + soft_sum) / len(out)

    def _soft(self, out: torch.Tensor, t: torch.Tensor, reduction: str) -> torch.Tensor:
        """The teacher term: per row (``none``) or its mean over the rows."""
        if self.task == "classification":
            kl = F.kl_div(F.log_softmax(out / self.temperature, -1), F.log_softmax(t / self.temperature, -1), log_target=True,
                          reduction="batchmean" if reduction == "mean" else "none")
            return (kl if reduction == "mean" else kl.sum(-1)) * self.temperature ** 2
        if reduction == "mean":
            return F.mse_loss(out, t)
        return F.mse_loss(out, t, reduction="none").reshape(len(out), -1).mean(1)  # an output of shape (n,) too


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


def prune(gm: fx.GraphModule, example: tuple, train: Split | None, task: str, cfg: PruneConfig,
          val: Split | None = None, reference: dict[str, float] | None = None) -> PruneResult:
    """Prune a GraphModule of real modules; returns a new plain GraphModule and per-layer rows.

    ``val`` and ``reference`` (the dense model's metrics on it) score the trade-off curve and
    the budget ``cfg.max_drop``; :class:`~dropcli.errors.NotMet` when nothing fits it."""
    if cfg.method not in METHODS:
        from dropcli.errors import UsageError

        raise UsageError(f"unknown --method {cfg.method!r}", f"choose one of {', '.join(METHODS)}")
    if cfg.max_drop is not None and (val is None or reference is None):
        raise DropcliError("--max-drop needs validation data", "pass --data TRAIN (and --val VAL)")
    gm = copy.deepcopy(gm).eval()
    if val is not None and reference is not None:
        reference = {**reference, "per_example": score(gm, val, task)["per_example"]}  # gm is on the CPU here
    existing = _svd_modules(gm)
    before = layer_stats(gm, include_svd=True)
    if not before:
        raise DropcliError("the model has no prunable layers (Linear, Conv1d or Conv2d with stored weights)",
                           "dropcli prune works on models built from Linear / Conv layers")
    protected = output_layers(gm)
    if existing:
        # already sparse-VD layers (trained by the user): prune by their own scores
        threshold = DEFAULTS["threshold"] if cfg.threshold is None else cfg.threshold
        curve = sweep(gm, existing, val, task, reference, cfg.device) if val is not None else []
        for m in existing.values():
            m.threshold = threshold
        log_alpha = finalize_sparse_vd(gm, existing)
        cand = _finish(gm, example, protected, val, task, cfg)
        return _result(cand, before, log_alpha, [], threshold, curve, reference, task, cfg)
    if train is None:
        raise DropcliError("pruning needs training data", "pass --data TRAIN (.npz with x and y, .pt or .csv)")
    # the dense model's outputs on the training split, distilled into the fine-tune and the retrain
    # and, where rows are mixed, the dense model itself (a frozen copy) for its outputs on the mixtures
    mix = mixed_share(train, cfg)
    teacher = copy.deepcopy(gm).eval().requires_grad_(False).to(cfg.device) if mix > 0 else None
    loss_fn = distill_loss(teacher_outputs(gm, train), task, cfg.distill, model=teacher, mix=mix, seed=cfg.seed) if cfg.distill > 0 else None
    if cfg.method == "sbp":
        gm, mods, history = _train(gm, train, task, cfg, cfg.kl_weight, protected, loss_fn=loss_fn)
        log_alpha = {k: np.log(np.maximum(v, 1e-30)) for k, v in finalize_sbp(gm, mods).items()}
        if cfg.retrain_epochs > 0:
            history += retrain(gm, train, task, cfg, loss_fn)
        gm.to("cpu")
        cand = _finish(gm, example, protected, val, task, cfg)
        curve = [_point(None, cand["kept"], cand["total"], cand["metrics"], reference, task)] if val is not None else []
        if curve:
            curve[0]["retrained"] = cfg.retrain_epochs > 0
        return _result(cand, before, log_alpha, history, None, curve, reference, task, cfg)

    walk = cfg.threshold is None and cfg.max_drop is not None
    # a walk that finds nothing within the budget trains once more, with half the KL weight
    # (less pruning pressure, so the cuts lose less)
    rounds = [cfg.kl_weight] + ([cfg.kl_weight * SECOND_ROUND_KL] if walk and cfg.kl_weight > 0 else [])
    curve: list[dict[str, Any]] = []
    history: list[dict[str, float]] = []
    for r, kl_weight in enumerate(rounds):
        trained, mods, hist = _train(copy.deepcopy(gm) if r < len(rounds) - 1 else gm, train, task, cfg, kl_weight, protected, loss_fn,
                                     label="" if r == 0 else f", round {r + 1}: --kl-weight {kl_weight:g}")
        history += hist
        points = sweep(trained, mods, val, task, reference, cfg.device) if val is not None else []
        for p in points:
            p["round"], p["kl_weight"] = r + 1, kl_weight
        curve += points
        if not walk:
            threshold = DEFAULTS["threshold"] if cfg.threshold is None else cfg.threshold
            cand = _candidate(trained, threshold, train, val, task, cfg, example, protected, loss_fn=loss_fn)
            _mark(points, threshold, cand, reference, task, cfg)
            return _result(cand, before, None, history + cand["history"], threshold, curve, reference, task, cfg, kl_weight)
        try:
            cand = _walk(trained, points, train, val, task, cfg, example, protected, reference, loss_fn)
        except NotMet as e:
            if r == len(rounds) - 1:
                if len(rounds) > 1:
                    e.message = e.message.replace("no pruned model stays", f"after {len(rounds)} training rounds "
                                                  f"(--kl-weight {' then '.join(f'{k:g}' for k in rounds)}), no pruned model stays")
                e.curve = curve
                raise
            continue
        return _result(cand, before, None, history + cand["history"], cand["threshold"], curve, reference, task, cfg, kl_weight)
    raise AssertionError("unreachable")  # pragma: no cover


def _train(gm: fx.GraphModule, train: Split, task: str, cfg: PruneConfig, kl_weight: float, protected: set[str],
           loss_fn=None, label: str = "") -> tuple[fx.GraphModule, dict[str, nn.Module], list[dict[str, float]]]:
    """The variational fine-tune (step 2), in place on ``gm``: returns (gm, noise layers, history)."""
    n = len(train)
    gm.to(cfg.device)
    if cfg.method == "sparse-vd":
        mods: dict[str, nn.Module] = dict(attach_sparse_vd(gm, DEFAULTS["threshold"] if cfg.threshold is None else cfg.threshold))
        var_params = [m.log_sigma2 for m in mods.values()]
    else:
        mods = dict(attach_sbp(gm, protected))
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
        beta = beta_at(progress, kl_weight)
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

    if loss_fn is not None:
        loss_fn.reset(cfg.seed)
    history = fit(gm, train, task, params=groups, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                  device=cfg.device, regulariser=reg, train_modules=ms, describe=describe, quiet=cfg.quiet, progress=cfg.progress,
                  label=f"prune ({cfg.method}{label})", decay_from=DECAY_FROM, loss_fn=loss_fn,
                  transform=getattr(loss_fn, "transform", None))
    return gm, mods, history


def sweep(gm: nn.Module, mods: dict[str, SparseVD], val: Split, task: str, reference: dict[str, float] | None,
          device: str = "cpu") -> list[dict[str, Any]]:
    """The trade-off curve of the trained log alphas: one point per threshold of :data:`SWEEP`
    that gives a different set of kept weights, scored on ``val`` (no retraining). Ordered from
    the most compressive to the least. The layers' thresholds are put back afterwards."""
    saved = {k: m.threshold for k, m in mods.items()}
    total = sum(m.weight.numel() for m in mods.values())
    points: list[dict[str, Any]] = []
    seen: set[int] = set()
    try:
        with torch.no_grad():
            las = {k: m.log_alpha() for k, m in mods.items()}
            for t in SWEEP:
                kept = sum(int((la < t).sum()) for la in las.values())
                if kept in seen:
                    continue
                seen.add(kept)
                empties = any(int((la < t).sum()) == 0 for la in las.values())
                for m in mods.values():
                    m.threshold = t
                metrics = None if empties else score(gm, val, task, device=device)
                points.append(_point(t, kept, total, metrics, reference, task))
    finally:
        for k, m in mods.items():
            m.threshold = saved[k]
    return points


def _point(t: float | None, kept: int, total: int, metrics: dict[str, float] | None,
           reference: dict[str, float] | None, task: str) -> dict[str, Any]:
    p: dict[str, Any] = {"threshold": t, "weights_kept": kept, "compression": total / max(kept, 1)}
    if metrics is None:
        p.update({"val": None, "drop": None, "drop_se": None, "note": "empties a layer"})
    else:
        p["val"] = _public(metrics)
        p["drop"] = budget_drop(reference, metrics, task) if reference is not None else None
        p["drop_se"] = drop_se(reference, metrics, task) if reference is not None else None
    p["retrained"] = None  # the same cut after retraining, where the walk tried it
    p["chosen"] = False
    return p


def _fits(drop: float | None, cfg: PruneConfig, se: float | None = None) -> bool:
    return drop is not None and (cfg.max_drop is None or drop + Z_BUDGET * (se or 0.0) <= cfg.max_drop + 1e-9)


def _cand_fits(cand: dict[str, Any], reference: dict[str, Any], task: str, cfg: PruneConfig) -> bool:
    m = cand["metrics"]
    return _fits(budget_drop(reference, m, task), cfg, drop_se(reference, m, task))


def _mark(curve: list[dict[str, Any]], threshold: float, cand: dict[str, Any] | None, reference, task, cfg,
          note: str | None = None) -> None:
    """Record the retrained result of the cut at ``threshold`` on its curve point."""
    for p in curve:
        if p["threshold"] is not None and math.isclose(p["threshold"], threshold):
            break
    else:
        return
    if cand is None:
        p["retrained"] = {"note": note}
        return
    rec: dict[str, Any] = {"weights_kept": cand["kept"], "compression": cand["total"] / max(cand["kept"], 1)}
    if cand["metrics"] is not None:
        rec["val"] = _public(cand["metrics"])
        rec["drop"] = budget_drop(reference, cand["metrics"], task) if reference is not None else None
        rec["drop_se"] = drop_se(reference, cand["metrics"], task) if reference is not None else None
    p["retrained"] = rec


def _walk(gm: fx.GraphModule, curve: list[dict[str, Any]], train: Split, val: Split, task: str, cfg: PruneConfig,
          example: tuple, protected: set[str], reference: dict[str, float], loss_fn=None) -> dict[str, Any]:
    """The most compressive retrained cut within the budget (see the module docstring)."""
    pts = [p for p in curve if p["threshold"] is not None]
    fit_pre = [i for i, p in enumerate(pts) if _fits(p["drop"], cfg, p["drop_se"])]
    i0 = fit_pre[0] if fit_pre else len(pts) - 1
    tried: dict[int, dict[str, Any] | None] = {}

    def attempt(i: int) -> dict[str, Any] | None:
        t = pts[i]["threshold"]
        try:
            cand = _candidate(gm, t, train, val, task, cfg, example, protected, loss_fn=loss_fn)
        except DropcliError as e:  # the cut empties a layer: not a candidate
            _mark(curve, t, None, reference, task, cfg, note=e.message)
            tried[i] = None
            return None
        cand["threshold"] = t
        _mark(curve, t, cand, reference, task, cfg)
        tried[i] = cand
        return cand if _cand_fits(cand, reference, task, cfg) else None

    # bisection on the retrained cuts, between a known-bad index (more compressive, or -1) and a
    # known-good one (or len(pts)): the retrained drop grows with compression, near enough
    n = len(pts)
    bad, good = -1, n
    # no cut fits before retraining: start from the one that loses least (the most compressive of
    # equals), then the least compressive; small validation sets make the drops noisy
    first = i0 if fit_pre else min(range(n), key=lambda i: (math.inf if pts[i]["drop"] is None else pts[i]["drop"], i))
    if attempt(first) is not None:
        good = first
    else:
        bad = first
        if first < n - 1 and attempt(n - 1) is not None:
            good = n - 1
    if good < n:
        while good - bad > 1 and len(tried) < MAX_TRIES:
            mid = (bad + good) // 2
            if attempt(mid) is not None:
                good = mid
            else:
                bad = mid
    best = tried.get(good) if good < n else None
    # retraining does not always help (it can fit the training split harder): a cut that fits the
    # budget as it is, and is more compressive than the best retrained one, wins without retraining
    if fit_pre and (best is None or fit_pre[0] < good):
        t = pts[fit_pre[0]]["threshold"]
        plain = _candidate(gm, t, train, val, task, cfg, example, protected, retrain_epochs=0)
        if _cand_fits(plain, reference, task, cfg):
            best = plain
            best["threshold"] = t
    if best is None:
        def fmt(c):
            return f"{budget_drop(reference, c['metrics'], task):.2f} ± {drop_se(reference, c['metrics'], task) or 0:.2f}" if c else "-"
        tried_s = ", ".join(f"t={pts[k]['threshold']:g}: {fmt(c)}" for k, c in sorted(tried.items()))
        unit = "points" if task == "classification" else "% of the validation loss"
        err = NotMet(f"no pruned model stays within --max-drop {cfg.max_drop:g} ({unit}, at {Z_BUDGET:g} standard errors; "
                     f"retrained cuts tried: {tried_s})",
                     "allow more with --max-drop, train longer with --epochs, or lower --kl-weight")
        err.curve = curve
        raise err
    for p in curve:
        p["chosen"] = p["threshold"] is not None and math.isclose(p["threshold"], best["threshold"])
        if p["chosen"]:
            p["chosen_retrained"] = bool(best["history"])
    return best


def _candidate(trained: fx.GraphModule, threshold: float, train: Split, val: Split | None, task: str, cfg: PruneConfig,
               example: tuple, protected: set[str], retrain_epochs: int | None = None, loss_fn=None) -> dict[str, Any]:
    """A copy of the trained sparse-VD model cut at ``threshold``, its kept weights retrained,
    shrunk and scored on ``val``."""
    gm = copy.deepcopy(trained)
    mods = _svd_modules(gm)
    for m in mods.values():
        m.threshold = threshold
    log_alpha = finalize_sparse_vd(gm, mods)
    epochs = cfg.retrain_epochs if retrain_epochs is None else retrain_epochs
    history = retrain(gm, train, task, cfg, loss_fn) if epochs > 0 else []
    gm.to("cpu")
    cand = _finish(gm, example, protected, val, task, cfg)
    cand["history"] = history
    cand["log_alpha"] = log_alpha
    return cand


def _finish(gm: fx.GraphModule, example: tuple, protected: set[str], val: Split | None, task: str,
            cfg: PruneConfig) -> dict[str, Any]:
    """Check that no layer lost every weight, shrink, and score on ``val``."""
    gm = _clean(gm)
    mid = layer_stats(gm)
    for name, st in mid.items():
        if st["nonzero"] == 0:
            raise DropcliError(f"the threshold removes every weight of layer {name}",
                               "prune less: raise --threshold, lower --kl-weight or use fewer --epochs")
    kept = sum(st["nonzero"] for st in mid.values())
    total = sum(st["weights"] for st in mid.values())
    res = shrink(gm, example, protected)
    gm = _clean(gm)
    metrics = score(gm, val, task) if val is not None else None
    return {"model": gm, "shrink": res, "kept": kept, "total": total, "metrics": metrics, "history": []}


def _result(cand: dict[str, Any], before: dict[str, dict[str, Any]], log_alpha: dict[str, np.ndarray] | None,
            history: list[dict[str, float]], threshold: float | None, curve: list[dict[str, Any]],
            reference: dict[str, float] | None, task: str, cfg: PruneConfig, kl_weight: float | None = None) -> PruneResult:
    gm, res = cand["model"], cand["shrink"]
    if cfg.max_drop is not None and cand["metrics"] is not None and reference is not None:
        drop = budget_drop(reference, cand["metrics"], task)
        se = drop_se(reference, cand["metrics"], task)
        if not _fits(drop, cfg, se):
            unit = "points" if task == "classification" else "% of the validation loss"
            what = f"--threshold {threshold:g}" if threshold is not None else f"--method {cfg.method}"
            err = NotMet(f"the pruned model loses {drop:.2f} {unit} on validation (standard error {se or 0:.2f}), more than "
                         f"--max-drop {cfg.max_drop:g} allows at {Z_BUDGET:g} standard errors ({what})",
                         "leave out --threshold to let prune choose it, allow more with --max-drop, or lower --kl-weight"
                         if cfg.method == "sparse-vd" else "allow more with --max-drop, or lower --kl-weight")
            err.curve = curve
            raise err
    if threshold is not None and curve and not any(p["chosen"] for p in curve):
        for p in curve:
            p["chosen"] = p["threshold"] is not None and math.isclose(p["threshold"], threshold)
    elif threshold is None and curve:
        curve[0]["chosen"] = True
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
    return PruneResult(gm, rows, log_alpha if log_alpha is not None else cand.get("log_alpha", {}), history, res,
                       threshold, curve, _public(cand["metrics"]), cfg.kl_weight if kl_weight is None else kl_weight,
                       drop_se(reference, cand["metrics"], task) if reference is not None and cand["metrics"] is not None else None)


def retrain(gm: fx.GraphModule, train: Split, task: str, cfg: PruneConfig, loss_fn=None) -> list[dict[str, float]]:
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
        if loss_fn is not None:
            loss_fn.reset(cfg.seed + 1)
        return fit(gm, train, task, params=params, epochs=cfg.retrain_epochs, batch_size=cfg.batch_size, seed=cfg.seed + 1,
                   device=cfg.device, quiet=cfg.quiet, progress=cfg.progress, label="retrain kept weights", decay_from=0.0,
                   loss_fn=loss_fn, transform=getattr(loss_fn, "transform", None))
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
