"""Per-example records and machine-readable writers for `dropcli uncertainty`.

Records are built column-wise from arrays (no per-row Python work except the final
string formatting), and every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError
from .fsutil import atomic_path

FORMATS = ("table", "json", "jsonl", "csv", "npz")


def columns(task: str, per: dict[str, np.ndarray], labels: np.ndarray | None, eval_out: np.ndarray) -> dict[str, np.ndarray]:
    """Flat per-example columns (scalars) for CSV/JSONL; vector fields get one column per output."""
    n = len(per["mean"])
    cols: dict[str, np.ndarray] = {"index": np.arange(n)}
    if task == "classification":
        cols["pred"] = per["pred"]
        cols["confidence"] = per["confidence"]
        for k in ("entropy", "expected_entropy", "mutual_info", "variation_ratio"):
            cols[k] = per[k]
        cols["eval_pred"] = eval_out.argmax(-1)
        if labels is not None:
            cols["label"] = labels
            cols["correct"] = (per["pred"] == labels).astype(np.int64)
    K = per["mean"].shape[1]
    for j in range(K):
        cols[f"mean_{j}"] = per["mean"][:, j]
    for j in range(K):
        cols[f"std_{j}"] = per["std"][:, j]
    if task == "regression":
        for j in range(K):
            cols[f"var_{j}"] = per["var"][:, j]
        if labels is not None:
            lab = labels.reshape(n, -1)
            for j in range(lab.shape[1]):
                cols[f"label_{j}"] = lab[:, j]
    return cols


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return "null" if not math.isfinite(f) else repr(f)
    return str(int(v))


def records_jsonl(cols: dict[str, np.ndarray]) -> str:
    names = list(cols)
    arrays = [cols[k].tolist() for k in names]
    keys = [json.dumps(k) for k in names]
    lines = []
    for row in zip(*arrays):
        lines.append("{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in zip(keys, row)) + "}")
    return "\n".join(lines) + "\n"


def to_csv(cols: dict[str, np.ndarray]) -> str:
    buf = io.StringIO()
    names = list(cols)
    data = np.column_stack([cols[k].astype(np.float64) for k in names])
    fmt = ["%d" if np.issubdtype(cols[k].dtype, np.integer) else "%.9g" for k in names]
    np.savetxt(buf, data, delimiter=",", header=",".join(names), comments="", fmt=fmt)
    return buf.getvalue()


def _clean(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return None if not math.isfinite(f) else f
    if isinstance(o, np.integer):
        return int(o)
    return o


def to_json(summary: dict[str, Any], cols: dict[str, np.ndarray]) -> str:
    names = list(cols)
    arrays = [cols[k].tolist() for k in names]
    examples = [dict(zip(names, row)) for row in zip(*arrays)]
    return json.dumps(_clean({"summary": summary, "examples": examples}), indent=1) + "\n"


def write(target: str, fmt: str, summary: dict[str, Any], cols: dict[str, np.ndarray],
          arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write a report to a path (atomically) or to stdout ('-')."""
    if fmt not in FORMATS or fmt == "table":
        raise UsageError(f"unknown output format {fmt!r}", "choose json, jsonl, csv or npz")
    if fmt == "npz":
        payload = {k: np.asarray(v) for k, v in cols.items()}
        payload.update(arrays or {})
        payload["summary_json"] = np.array(json.dumps(_clean(summary)))
        data = npz_bytes(payload)
        if target == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            return
        with atomic_path(target, ".npz") as tmp:
            Path(tmp).write_bytes(data)
        return
    text = {"json": lambda: to_json(summary, cols), "jsonl": lambda: records_jsonl(cols), "csv": lambda: to_csv(cols)}[fmt]()
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(target) as tmp:
        Path(tmp).write_text(text)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz whose bytes depend only on the arrays (np.savez stamps the time)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with z.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def format_from_path(path: str | None) -> str | None:
    if not path or path == "-":
        return None
    suf = Path(path).suffix.lower().lstrip(".")
    return suf if suf in FORMATS else None
