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
