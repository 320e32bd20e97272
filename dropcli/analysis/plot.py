"""`dropcli uncertainty --plot`: one PNG with the uncertainty histograms and, with labels,
the reliability diagram and the risk-coverage curve.

matplotlib is optional (``pip install 'dropcli[plot]'``) and is imported only here, with
the non-interactive Agg backend. The file is written atomically.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dropcli.analysis import stats
from dropcli.errors import DropcliError
from dropcli.io.files import atomic_path

CLASSIFICATION_MEASURES = (
    ("entropy", "predictive entropy H[mean p] (nats)"),
    ("mutual_info", "mutual information / BALD (nats)"),
    ("expected_entropy", "expected entropy mean H[p_t] (nats)"),
    ("variation_ratio", "variation ratio"),
)


def import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise DropcliError("--plot needs matplotlib", "pip install 'dropcli[plot]'") from None
    return plt


def _hist(ax, values: np.ndarray, title: str, color: str) -> None:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    else:
        lo, hi = float(v.min()), float(v.max())
        if hi - lo < 1e-12:  # all equal: one visible bar around the value
            pad = max(abs(lo) * 1e-3, 1e-6)
            lo, hi = lo - pad, hi + pad
        ax.hist(v, bins=min(40, max(5, int(np.sqrt(v.size)))), range=(lo, hi), color=color, edgecolor="white", linewidth=0.4)
        ax.axvline(float(v.mean()), color="black", linestyle="--", linewidth=1, label=f"mean {v.mean():.3g}")
        ax.legend(fontsize=8, loc="upper right", frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("examples")
    ax.tick_params(labelsize=8)


def _reliability(ax, per: dict[str, np.ndarray], labels: np.ndarray) -> None:
    correct = per["pred"] == labels
    b = stats.calibration_bins(per["confidence"], correct, stats.ECE_BINS)
    edges = b["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    live = b["count"] > 0
    ax.bar(centers[live], b["accuracy"][live], width=width * 0.95, color="tab:blue", alpha=0.8, edgecolor="white",
           label="accuracy")
    gap_lo = np.minimum(b["accuracy"], b["confidence"])[live]
    gap = np.abs(b["accuracy"] - b["confidence"])[live]
    ax.bar(centers[live], gap, bottom=gap_lo, width=width * 0.95, fill=False, edgecolor="tab:red", hatch="///",
           linewidth=0.8, label="gap to confidence")
    tops = np.maximum(b["accuracy"], b["confidence"])[live]
    for x, y, c in zip(centers[live], tops, b["count"][live]):
        ax.text(x, min(y, 0.93) + 0.015, f"{int(c)}", ha="center", va="bottom", fontsize=6, color="dimgray")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1, label="perfect")
    ece, mce = stats.ece_mce(per["confidence"], correct, stats.ECE_BINS)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean softmax max)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability ({stats.ECE_BINS} bins): ECE {ece:.3f}, MCE {mce:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.tick_params(labelsize=8)


def _risk_coverage(ax, per: dict[str, np.ndarray], labels: np.ndarray) -> None:
    correct = per["pred"] == labels
    rc = stats.risk_coverage(per["entropy"], correct)
    ax.plot(rc["coverage"], rc["accuracy"], color="tab:green", linewidth=1.5, label="keep lowest entropy")
    ax.axhline(float(correct.mean()), color="gray", linestyle=":", linewidth=1, label=f"all: {correct.mean():.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(max(0.0, float(np.min(rc["accuracy"])) - 0.05), 1.01)
    ax.set_xlabel("coverage (fraction kept)")
    ax.set_ylabel("accuracy on kept examples")
    ax.set_title("accuracy vs coverage (by entropy)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left", frameon=False)
    ax.tick_params(labelsize=8)


def write_plot(path: str, task: str, per: dict[str, np.ndarray], labels: np.ndarray | None, summary: dict[str, Any]) -> None:
    """Write the PNG to ``path`` atomically (nothing is left behind on failure)."""
    plt = import_pyplot()
    colors = ("tab:purple", "tab:orange", "tab:cyan", "tab:olive")
    n = len(per["mean"])
    how = f"T={summary['samples']}" if summary.get("samples") else "analytic moments"
    title = f"MC dropout: {n} examples, {how}, {summary.get('sites', '?')} site(s), {task}"
    if task == "classification":
        with_labels = labels is not None
        rows = 3 if with_labels else 2
        fig, axes = plt.subplots(rows, 2, figsize=(11, 3.4 * rows), squeeze=False)
        # --method moments has no MI, expected entropy or variation ratio: the probabilities' std instead
        shown = [(per[k], name) for k, name in CLASSIFICATION_MEASURES if k in per]
        if len(shown) < len(CLASSIFICATION_MEASURES):
            shown.append((np.asarray(per["std"]).mean(-1), "std of the class probabilities (mean over classes)"))
        for ax, (vals, name), c in zip(axes[:2].ravel(), shown, colors):
            _hist(ax, vals, name, c)
        for ax in axes[:2].ravel()[len(shown):]:
            ax.axis("off")
        if with_labels:
            lab = np.asarray(labels).astype(np.int64)
            _reliability(axes[2, 0], per, lab)
            _risk_coverage(axes[2, 1], per, lab)
    else:
        std = np.asarray(per["std"], dtype=np.float64)
        K = std.shape[1] if std.ndim == 2 else 1
        fig, axes = plt.subplots(1, 1, figsize=(7, 4), squeeze=False)
        what = "predictive std" + (" (mean over outputs)" if K > 1 else "")
        if "variance" in summary and "tau" in str(summary["variance"]) and "no --tau" not in str(summary["variance"]):
            what += ", incl. 1/tau"
        _hist(axes[0, 0], std.mean(-1) if std.ndim == 2 else std, what, colors[0])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def write_log_alpha_plot(path: str, values: dict[str, np.ndarray], threshold: float, what: str = "log alpha",
                         curve: list[dict[str, Any]] | None = None, unit: str | None = None,
                         budget: float | None = None) -> None:
    """`dropcli prune --plot`: one histogram of ``what`` per layer, with the pruning threshold;
    with ``curve`` (the trade-off curve prune walked) a last panel of validation loss against
    compression, before and after retraining, the budget and the chosen cut marked."""
    plt = import_pyplot()
    names = list(values)
    if not names and not curve:
        raise DropcliError("--plot: there are no per-layer scores to plot")
    panels = len(names) + (1 if curve else 0)
    cols = min(3, panels)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        v = np.asarray(values[name], dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        ax.hist(v, bins=50, color="tab:blue", edgecolor="white", linewidth=0.3)
        ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        pruned = float(np.mean(v > threshold)) if v.size else 0.0
        ax.set_title(f"{name}: {pruned:.1%} above", fontsize=10)
        ax.set_xlabel(what, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    if curve:
        _tradeoff(axes.ravel()[len(names)], curve, unit or "drop", budget)
        names = names + ["curve"]
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def _tradeoff(ax, curve: list[dict[str, Any]], unit: str, budget: float | None) -> None:
    """Validation drop against nonzero-weight compression along prune's walk."""
    pre = [(p["compression"], p["drop"]) for p in curve if p.get("drop") is not None]
    post = [(p["retrained"]["compression"], p["retrained"]["drop"]) for p in curve
            if isinstance(p.get("retrained"), dict) and p["retrained"].get("drop") is not None]
    if pre:
        ax.plot(*zip(*pre), "o-", color="tab:blue", markersize=3, linewidth=1, label="cut (no retraining)")
    if post:
        ax.plot(*zip(*post), "s", color="tab:green", markersize=5, label="cut, retrained")
    chosen = [p for p in curve if p.get("chosen")]
    for p in chosen:
        r = p["retrained"] if isinstance(p.get("retrained"), dict) and p["retrained"].get("drop") is not None else p
        if r.get("drop") is not None:
            ax.plot([r["compression"]], [r["drop"]], "*", color="tab:red", markersize=11, label="chosen")
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", linewidth=1, label=f"--max-drop {budget:g}")
    ax.set_xscale("log")
    ax.set_xlabel("nonzero-weight compression (x)", fontsize=8)
    ax.set_ylabel(f"validation drop ({unit})", fontsize=8)
    ax.set_title("trade-off walked", fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, frameon=False)
