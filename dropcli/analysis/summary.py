"""The summary of an MC-dropout run (`dropcli uncertainty`, ``dropcli.uncertainty``): the
statistics over the whole input, the regression metrics, and the ``--fail-above`` gate.

The per-example statistics come from :func:`dropcli.analysis.stats.per_example` (or the
moments engine); the classification summary from :func:`dropcli.analysis.stats.summary`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dropcli.errors import DropcliError, UsageError

GATE_METRICS = ("entropy", "expected_entropy", "mutual_info", "variation_ratio", "confidence", "var", "std")


def parse_gate(text: str | tuple | None) -> tuple[str, float] | None:
    """``METRIC=VALUE`` (or a ``(metric, value)`` pair) for ``--fail-above``."""
    if not text:
        return None
    if isinstance(text, tuple):
        text = f"{text[0]}={text[1]}"
    if "=" not in text:
        raise UsageError(f"--fail-above {text!r} must look like METRIC=VALUE", f"metrics: {', '.join(GATE_METRICS)}")
    name, _, val = text.partition("=")
    name = name.strip()
    if name not in GATE_METRICS:
        raise UsageError(f"unknown metric {name!r} in --fail-above", f"choose one of {', '.join(GATE_METRICS)}")
    try:
        return name, float(val)
    except ValueError:
        raise UsageError(f"--fail-above value {val!r} is not a number") from None


def regression_metrics(per: dict, eval_out: np.ndarray, labels: np.ndarray, n_outputs: int) -> dict[str, dict]:
    """RMSE, MAE and Gaussian NLL of the MC mean and variance; RMSE and MAE of the deterministic pass."""
    n = len(per["mean"])
    lab = np.asarray(labels).reshape(n, -1).astype(np.float64)
    if lab.shape[1] != n_outputs:
        raise DropcliError(f"labels have {lab.shape[1]} columns but the model has {n_outputs} outputs")
    err_mc = per["mean"] - lab
    err_ev = eval_out.astype(np.float64) - lab
    var = np.maximum(per["var"], 1e-12)
    return {"mc": {"rmse": float(np.sqrt(np.mean(err_mc ** 2))), "mae": float(np.mean(np.abs(err_mc))),
                   "gaussian_nll": float(np.mean(0.5 * np.log(2 * np.pi * var) + err_mc ** 2 / (2 * var)))},
            "eval": {"rmse": float(np.sqrt(np.mean(err_ev ** 2))), "mae": float(np.mean(np.abs(err_ev)))}}


def gate_metrics(task: str, method: str) -> tuple[str, ...]:
    """The ``--fail-above`` metrics a run of this task and method reports."""
    if task == "regression":
        return ("var", "std")
    if method == "moments":
        return ("entropy", "confidence", "var", "std")
    return GATE_METRICS


def check_gate(gate_spec: tuple[str, float] | None, task: str, method: str) -> None:
    """Refuse, before the run, a ``--fail-above`` metric the run will not have."""
    if not gate_spec:
        return
    name = gate_spec[0]
    if name in gate_metrics(task, method):
        return
    if method == "moments" and task != "regression":
        raise UsageError(f"--fail-above {name} needs samples; --method moments has no {name}",
                         "gate on entropy, confidence, var or std, or use --method mc")
    raise UsageError(f"--fail-above {name} does not apply to a {task} task", f"choose from {', '.join(gate_metrics(task, method))}")


def gate(per: dict, gate_spec: tuple[str, float], task: str, method: str) -> dict[str, Any]:
    """The ``--fail-above`` record: the mean of the metric over the examples (over every
    position of every example for per-position classification) against the limit."""
    name, limit = gate_spec
    check_gate(gate_spec, task, method)
    vals = per.get(name)
    if vals is None:
        raise UsageError(f"--fail-above {name} does not apply to a {task} task", f"choose from {', '.join(k for k in GATE_METRICS if k in per)}")
    mean_val = float(np.mean(vals))
    return {"metric": name, "mean": mean_val, "limit": limit, "tripped": mean_val > limit}


# ------------------------------------------------------------------ streamed runs


MEASURES = ("confidence", "entropy", "expected_entropy", "mutual_info", "variation_ratio")


class Accumulator:
    """What the summary of a run needs, kept as examples stream past (`uncertainty` writing
    per-example records as they are computed): a few numbers per example (the uncertainty
    measures, for quantiles, AUROC, risk-coverage and calibration bins, which are exact) and
    running sums for the rest (NLL, Brier, RMSE, MAE, Gaussian NLL, the --fail-above mean).

    :meth:`add` takes the per-example statistics of rows [a, b) (``stats.per_example``) and the
    deterministic outputs; :meth:`per` is the compact per-example dict; :meth:`scores` what
    ``stats.summary`` needs for NLL/Brier; :meth:`regression_metrics` and :meth:`gate_mean`
    the rest. :data:`ROW_BYTES` bounds the memory kept per example."""

    ROW_BYTES = 8 * 8 + 2  # measures (5) + pred + eval confidence + regression std (float64), 2 bools

    def __init__(self, n: int, task: str, labels: np.ndarray | None, n_outputs: int, gate_metric: str | None = None,
                 keep_eval: bool = True):
        self.n, self.task, self.labels, self.K, self.gate_metric = n, task, labels, n_outputs, gate_metric
        self.rows: dict[str, np.ndarray] = {}
        self.sums: dict[str, float] = {}
        self.gate_sum = 0.0
        self.keep_eval = keep_eval
        if labels is not None and task == "classification":
            self.correct = np.zeros(n, bool)
            self.eval_correct = np.zeros(n, bool)
            self.eval_conf = np.zeros(n)

    def _row(self, name: str, a: int, v: np.ndarray) -> None:
        if name not in self.rows:
            self.rows[name] = np.empty(self.n, dtype=np.int64 if v.dtype.kind in "iu" else np.float64)
        self.rows[name][a:a + len(v)] = v

    def _sum(self, name: str, v: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(v)

    def add(self, a: int, per: dict, eval_out: np.ndarray, eval_probs: np.ndarray | None = None) -> None:
        from dropcli.analysis import stats

        b = a + len(per["mean"])
        if self.gate_metric and self.gate_metric in per:
            self.gate_sum += float(np.sum(per[self.gate_metric], dtype=np.float64))
        if self.task == "classification":
            self._row("pred", a, per["pred"])
            for m in MEASURES:
                if m in per:
                    self._row(m, a, per[m])
            if self.labels is None:
                return
            lab = self.labels[a:b]
            idx = np.arange(b - a)
            self.correct[a:b] = per["pred"] == lab
            self._sum("nll", -np.sum(np.log(np.maximum(per["mean"][idx, lab], stats.EPS))))
            onehot = np.zeros_like(per["mean"])
            onehot[idx, lab] = 1.0
            self._sum("brier", np.sum((per["mean"] - onehot) ** 2))
            ep = np.asarray(eval_probs, dtype=np.float64)
            self.eval_correct[a:b] = ep.argmax(-1) == lab
            self.eval_conf[a:b] = ep.max(-1)
            self._sum("eval_nll", -np.sum(np.log(np.maximum(ep[idx, lab], stats.EPS))))
            eh = np.zeros_like(ep)
            eh[idx, lab] = 1.0
            self._sum("eval_brier", np.sum((ep - eh) ** 2))
            return
        self._row("std_mean", a, per["std"].mean(-1))
        if self.labels is not None:
            lab = np.asarray(self.labels[a:b]).reshape(b - a, -1).astype(np.float64)
            err_mc = per["mean"] - lab
            err_ev = eval_out.astype(np.float64).reshape(b - a, -1) - lab
            var = np.maximum(per["var"], 1e-12)
            self._sum("sq", np.sum(err_mc ** 2))
            self._sum("abs", np.sum(np.abs(err_mc)))
            self._sum("gnll", np.sum(0.5 * np.log(2 * np.pi * var) + err_mc ** 2 / (2 * var)))
            self._sum("eval_sq", np.sum(err_ev ** 2))
            self._sum("eval_abs", np.sum(np.abs(err_ev)))

    def per(self) -> dict:
        return dict(self.rows)

    def scores(self) -> dict | None:
        if self.labels is None or self.task != "classification":
            return None
        return {"nll": self.sums["nll"], "brier": self.sums["brier"],
                "eval": {"correct": self.eval_correct, "confidence": self.eval_conf, "nll": self.sums["eval_nll"],
                         "brier": self.sums["eval_brier"]}}

    def regression_metrics(self) -> dict:
        m = self.n * self.K
        s = self.sums
        return {"mc": {"rmse": float(np.sqrt(s["sq"] / m)), "mae": s["abs"] / m, "gaussian_nll": s["gnll"] / m},
                "eval": {"rmse": float(np.sqrt(s["eval_sq"] / m)), "mae": s["eval_abs"] / m}}

    def gate_mean(self) -> float:
        per_example = self.K if self.gate_metric in ("var", "std") else 1
        return self.gate_sum / (self.n * per_example)


def gate_from_mean(gate_spec: tuple[str, float], mean_val: float) -> dict[str, Any]:
    name, limit = gate_spec
    return {"metric": name, "mean": mean_val, "limit": limit, "tripped": mean_val > limit}
