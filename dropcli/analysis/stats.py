"""Predictive statistics and calibration, as pure functions of MC samples.

Shapes: ``samples`` is ``[T, N, K]`` (T stochastic passes, N examples, K outputs).
For classification the samples are per-pass class probabilities; :func:`to_probs`
turns logits into them. Definitions follow docs/analysis.md:

- predictive entropy  H[mean_t p_t]                (total)
- expected entropy    mean_t H[p_t]                (aleatoric)
- mutual information  H[mean p] - mean_t H[p_t]    (epistemic, BALD), >= 0
- variation ratio     1 - (votes for the modal class) / T
- regression variance tau^-1 + var_t(y_t)          (var over passes, 1/T; Gal & Ghahramani)

Everything is vectorised over examples: no per-row Python work.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12
ECE_BINS = 15
COVERAGES = (0.5, 0.8, 0.9, 0.95)


def looks_like_probs(x: np.ndarray, atol: float = 1e-4) -> bool:
    return bool(np.all(x >= -atol) and np.all(x <= 1 + atol) and np.allclose(x.sum(-1), 1.0, atol=atol))


def to_probs(samples: np.ndarray, as_probs: bool | None = None, temperature: float | None = None) -> np.ndarray:
    """Softmax over the last axis unless the samples already are probabilities.

    ``as_probs`` forces the decision (None: decide by :func:`looks_like_probs` on these
    samples). An engine that sees the samples in parts decides over all of them: the
    check is an elementwise AND, so it is the AND of the parts' checks.

    ``temperature`` (post-hoc calibration, `dropcli finetune --calibrate`): each sample's logits
    are divided by it before the softmax, ``softmax(z / T)``; probabilities become
    ``softmax(log p / T)``, the same thing. None or 1: unchanged."""
    s = np.asarray(samples, dtype=np.float64)
    if as_probs is None:  # logits usually fail on the first example already: skip the full check then
        as_probs = looks_like_probs(s[:, :1] if s.ndim > 1 else s[:1]) and looks_like_probs(s)
    if as_probs:
        if temperature is None or temperature == 1.0:
            return np.clip(s, 0.0, 1.0)
        s = np.log(np.clip(s, 1e-300, 1.0))
    if temperature is not None and temperature != 1.0:
        s = s / float(temperature)
    e = s - s.max(-1, keepdims=True)  # a new array: exp and the division run in place on it
    np.exp(e, out=e)
    e /= e.sum(-1, keepdims=True)
    return e


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats; 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    t = np.maximum(p, EPS)  # p log p, where p > 0, else 0 (one temporary, updated in place)
    np.log(t, out=t)
    t *= p
    t[~(p > 0)] = 0.0
    return -np.sum(t, axis=axis)


def classification(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example statistics from ``[T, N, K]`` probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    T, N, K = probs.shape
    mean = probs.mean(0)
    var = probs.var(0)
    pred = mean.argmax(-1)
    total = entropy(mean)
    aleatoric = entropy(probs).mean(0)
    mi = np.maximum(total - aleatoric, 0.0)  # >= 0 by Jensen; clamp float round-off
    votes = probs.argmax(-1)  # [T, N]
    counts = np.bincount((np.arange(N) * K + votes).ravel(), minlength=N * K).reshape(N, K)
    variation_ratio = 1.0 - counts.max(-1) / T
    return {
        "mean": mean, "var": var, "std": np.sqrt(var), "pred": pred, "confidence": mean.max(-1),
        "entropy": total, "expected_entropy": aleatoric, "mutual_info": mi, "variation_ratio": variation_ratio,
    }


def regression(samples: np.ndarray, tau: float | None = None) -> dict[str, np.ndarray]:
    """Per-example mean and variance from ``[T, N, D]`` outputs (variance over passes, 1/T)."""
    s = np.asarray(samples, dtype=np.float64)
    mean = s.mean(0)
    var = s.var(0)
    if tau is not None:
        var = var + 1.0 / tau
    return {"mean": mean, "var": var, "std": np.sqrt(var)}


def per_example(samples: np.ndarray, task: str, tau: float | None = None, as_probs: bool | None = None,
                temperature: float | None = None, shape: tuple | None = None) -> dict[str, np.ndarray]:
    """The per-example statistics of ``[T, N, K]`` samples, for both engines.

    Every value of example i depends only on ``samples[:, i]``, bit for bit: the reductions
    over T run in the same order whatever N. One exception in numpy had to be closed: with a
    single example (and K = 1, or the [T, N] entropies) the reduction over T becomes a
    contiguous one and numpy switches to pairwise summation, which rounds differently; so a
    single example is computed beside a copy of itself. Engines may therefore compute the
    statistics on any split of the examples and concatenate them. ``temperature``: see
    :func:`to_probs` (classification only).

    ``task="token-classification"``: ``shape`` is the per-example output shape ``(S, V)``; the
    samples ``[T, N, S*V]`` are V-class probabilities at each of S positions, and every
    statistic gains a position axis: ``[N, S]`` (``mean``/``var``/``std``: ``[N, S, V]``).
    """
    s = np.asarray(samples)
    if task == "token-classification":
        S, V = shape
        T, N = s.shape[:2]
        flat = per_example(s.reshape(T, N * S, V), "classification", tau, as_probs, temperature)
        return {k: v.reshape((N, S) + v.shape[1:]) for k, v in flat.items()}
    if s.shape[1] == 1:
        full = per_example(np.concatenate([s, s], axis=1), task, tau, as_probs, temperature)
        return {k: v[:1] for k, v in full.items()}
    if task == "classification":
        return classification(to_probs(s, as_probs, temperature))
    return regression(s, tau)


# ------------------------------------------------------------------------ calibration


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    p = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.maximum(p, EPS))))


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, -1)))


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Equal-width confidence bins over [0, 1]; bin i holds (i/B, (i+1)/B], bin 0 includes 0."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, acc_sum / count, np.nan)
    return {"edges": edges, "count": count, "confidence": conf, "accuracy": acc}


def ece_mce(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[float, float]:
    b = calibration_bins(confidence, correct, bins)
    n = b["count"].sum()
    gap = np.abs(b["accuracy"] - b["confidence"])
    live = b["count"] > 0
    ece = float(np.sum(b["count"][live] / n * gap[live])) if n else float("nan")
    mce = float(np.max(gap[live])) if live.any() else float("nan")
    return ece, mce


def risk_coverage(uncertainty: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy when keeping the k most certain examples, for k = 1..N (stable order on ties)."""
    order = np.argsort(uncertainty, kind="stable")
    c = correct[order].astype(np.float64)
    k = np.arange(1, len(c) + 1)
    acc = np.cumsum(c) / k
    return {"coverage": k / len(c), "accuracy": acc, "risk": 1.0 - acc}


def accuracy_at_coverage(uncertainty: np.ndarray, correct: np.ndarray, coverages=COVERAGES) -> dict[str, float]:
    rc = risk_coverage(uncertainty, correct)
    n = len(correct)
    out = {}
    for c in coverages:
        k = max(1, int(np.ceil(c * n)))
        out[f"{int(round(c * 100))}%"] = float(rc["accuracy"][k - 1])
    return out


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    s_sorted = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], len(s_sorted)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fpr_at_95_tpr(id_uncertainty: np.ndarray, ood_uncertainty: np.ndarray) -> float:
    """Fraction of OOD inputs accepted as in-distribution at the threshold keeping 95% of ID inputs."""
    thr = np.quantile(np.asarray(id_uncertainty, dtype=np.float64), 0.95, method="higher")
    return float(np.mean(np.asarray(ood_uncertainty) <= thr))


def distribution(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "p05": float(q[0]),
            "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]), "p95": float(q[4]), "max": float(v.max())}


TOKEN_MEASURES = ("entropy", "expected_entropy", "mutual_info", "variation_ratio", "confidence")


def sequence_means(per: dict[str, np.ndarray], scored: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-sequence summaries of per-position statistics ``[N, S]``: ``mean_<measure>`` over
    the scored positions (``scored`` bool [N, S]; None: all), ``max_entropy`` and
    ``max_mutual_info`` (the least certain position). A sequence with no scored position: NaN."""
    first = next(v for k, v in per.items() if k in TOKEN_MEASURES)
    w = np.ones(first.shape, dtype=np.float64) if scored is None else scored.astype(np.float64)
    count = w.sum(1)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in TOKEN_MEASURES:
            if m in per:
                out[f"mean_{m}"] = np.where(count > 0, (per[m] * w).sum(1) / np.maximum(count, 1), np.nan)
        for m in ("entropy", "mutual_info"):
            if m in per:
                out[f"max_{m}"] = np.where(count > 0, np.where(w > 0, per[m], -np.inf).max(1), np.nan)
    return out


def token_summary(per: dict[str, np.ndarray], labels: np.ndarray | None = None, eval_probs: np.ndarray | None = None,
                  ood_per: dict[str, np.ndarray] | None = None, ignore_index: int = -100) -> dict[str, Any]:
    """Summary of a per-position classification run: :func:`summary` over the scored positions
    (every position without labels; those whose label is not ``ignore_index`` with them), plus
    the distribution of the per-sequence means (:func:`sequence_means`). OOD detection scores
    each sequence by its mean over positions."""
    N, S = per["pred"].shape
    scored = np.ones((N, S), bool) if labels is None else np.asarray(labels) != ignore_index
    flat = {k: v[scored] for k, v in per.items()}
    out = summary(flat, None if labels is None else np.asarray(labels)[scored],
                  eval_probs=None if eval_probs is None else eval_probs[scored])
    out = {"unit": "position", "n_positions": out.pop("n"), "n": N, "positions_per_example": S, **out}
    seq = sequence_means(per, scored)
    out["sequence_distribution"] = {k: distribution(v[np.isfinite(v)]) for k, v in seq.items() if np.isfinite(v).any()}
    if ood_per is not None:
        ood_seq = sequence_means(ood_per)
        out["ood"] = {}
        for k in ("mean_entropy", "mean_expected_entropy", "mean_mutual_info", "mean_variation_ratio"):
            if k in seq:
                a, b = seq[k][np.isfinite(seq[k])], ood_seq[k]
                out["ood"][k] = {"auroc": auroc(np.r_[a, b], np.r_[np.zeros(len(a), bool), np.ones(len(b), bool)]),
                                 "fpr95": fpr_at_95_tpr(a, b)}
    return out


UNCERTAINTY_MEASURES = ("entropy", "expected_entropy", "mutual_info", "variation_ratio", "neg_confidence")


def summary(per: dict[str, np.ndarray], labels: np.ndarray | None = None, eval_probs: np.ndarray | None = None,
            ood_per: dict[str, np.ndarray] | None = None, scores: dict | None = None) -> dict[str, Any]:
    """Summary of a classification run (see `dropcli uncertainty`).

    ``scores`` (a streamed run, :class:`dropcli.analysis.summary.Accumulator`): the per-example
    statistics hold no [N, K] ``mean``; NLL and Brier of the MC predictive and of the
    deterministic pass come as ``{"nll", "brier", "eval": {"correct", "confidence", "nll",
    "brier"}}`` (sums over the examples, divided here), ``eval_probs`` is then unused."""
    # measures the per-example statistics hold (--method moments has no MI/expected entropy/variation ratio)
    names = [m for m in UNCERTAINTY_MEASURES if m == "neg_confidence" or m in per]
    measures = {m: (-per["confidence"] if m == "neg_confidence" else per[m]) for m in names}
    out: dict[str, Any] = {"n": int(len(per["pred"])), "distribution": {m: distribution(v) for m, v in measures.items()}}
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64)
        correct = per["pred"] == labels
        ece, mce = ece_mce(per["confidence"], correct)
        n = len(labels)
        mc_nll, mc_brier = ((scores["nll"] / n, scores["brier"] / n) if scores else
                            (nll(per["mean"], labels), brier(per["mean"], labels)))
        out["mc"] = {"accuracy": float(correct.mean()), "nll": float(mc_nll), "brier": float(mc_brier), "ece": ece, "mce": mce}
        out["accuracy_at_coverage"] = accuracy_at_coverage(measures["entropy"], correct)
        out["error_auroc"] = {m: auroc(v, ~correct) for m, v in measures.items()}
        if scores:
            ev = scores["eval"]
            e_ece, e_mce = ece_mce(ev["confidence"], ev["correct"])
            out["eval"] = {"accuracy": float(ev["correct"].mean()), "nll": float(ev["nll"] / n),
                           "brier": float(ev["brier"] / n), "ece": e_ece, "mce": e_mce}
        elif eval_probs is not None:
            ep = np.asarray(eval_probs, dtype=np.float64)
            ec = ep.argmax(-1) == labels
            e_ece, e_mce = ece_mce(ep.max(-1), ec)
            out["eval"] = {"accuracy": float(ec.mean()), "nll": nll(ep, labels), "brier": brier(ep, labels),
                           "ece": e_ece, "mce": e_mce}
    if ood_per is not None:
        ood_measures = {m: (-ood_per["confidence"] if m == "neg_confidence" else ood_per[m]) for m in names}
        out["ood"] = {}
        for m in names:
            scores = np.r_[measures[m], ood_measures[m]]
            is_ood = np.r_[np.zeros(len(measures[m]), bool), np.ones(len(ood_measures[m]), bool)]
            out["ood"][m] = {"auroc": auroc(scores, is_ood), "fpr95": fpr_at_95_tpr(measures[m], ood_measures[m])}
    return out
