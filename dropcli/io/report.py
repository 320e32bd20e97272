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

from dropcli.errors import DropcliError, UsageError
from dropcli.io.files import atomic_path, write_errors

FORMATS = ("table", "json", "jsonl", "csv", "npz", "parquet")
SHARD_FORMATS = ("jsonl", "parquet")  # --engine ray --output DIR


def columns(task: str, per: dict[str, np.ndarray], labels: np.ndarray | None, eval_out: np.ndarray) -> dict[str, np.ndarray]:
    """Flat per-example columns (scalars) for CSV/JSONL; vector fields get one column per output."""
    n = len(per["mean"])
    cols: dict[str, np.ndarray] = {"index": np.arange(n)}
    if task == "classification":
        cols["pred"] = per["pred"]
        cols["confidence"] = per["confidence"]
        for k in ("entropy", "expected_entropy", "mutual_info", "variation_ratio"):
            if k in per:  # --method moments has no MI, expected entropy or variation ratio
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


def token_columns(per: dict[str, np.ndarray], seq: dict[str, np.ndarray], labels: np.ndarray | None,
                  eval_probs: np.ndarray, ignore_index: int = -100) -> dict[str, np.ndarray]:
    """Per-example columns of a per-position classification run: per-sequence summaries as
    scalars (``mean_entropy``, ``mean_mutual_info``, ... over the scored positions, ``max_*``),
    ``seq``, from ``dropcli.analysis.stats.sequence_means``),
    then per-position fields as ``[N, S]`` arrays (``pred``, ``confidence``, the measures,
    ``eval_pred``; with labels ``label`` and ``correct``, -1 at ignored positions). JSON/JSONL
    write them as lists, NPZ as arrays, CSV one row per position. The class probabilities
    ([N, S, V]) are not written per example: ``dropcli.uncertainty`` returns them (``mean``)."""
    N, S = per["pred"].shape
    cols: dict[str, np.ndarray] = {"index": np.arange(N)}
    scored = None if labels is None else labels != ignore_index
    cols.update(seq)
    if labels is not None:
        correct = (per["pred"] == labels)
        with np.errstate(invalid="ignore", divide="ignore"):
            cols["accuracy"] = np.where(scored.any(1), (correct & scored).sum(1) / np.maximum(scored.sum(1), 1), np.nan)
    cols["pred"] = per["pred"]
    for k in ("confidence", "entropy", "expected_entropy", "mutual_info", "variation_ratio"):
        if k in per:
            cols[k] = per[k]
    cols["eval_pred"] = eval_probs.argmax(-1)
    if labels is not None:
        cols["label"] = labels
        cols["correct"] = np.where(scored, correct.astype(np.int64), -1)
    return cols


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
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


def long_rows(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Columns with per-position ``[N, S]`` fields as one row per (example, position): scalar
    columns repeated S times, and a ``position`` column after ``index``."""
    wide = [k for k, v in cols.items() if v.ndim == 2]
    if not wide:
        return cols
    N, S = cols[wide[0]].shape
    out: dict[str, np.ndarray] = {}
    for k, v in cols.items():
        out[k] = v.reshape(-1) if v.ndim == 2 else np.repeat(v, S)
        if k == "index":
            out["position"] = np.tile(np.arange(S), N)
    return out


def to_csv(cols: dict[str, np.ndarray]) -> str:
    buf = io.StringIO()
    cols = long_rows(cols)
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
        raise UsageError(f"unknown output format {fmt!r}", "choose json, jsonl, csv, npz or parquet")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = arrow_table(cols)
        with atomic_path(target, ".parquet") as tmp:
            pq.write_table(table, str(tmp))
        return
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


STREAM_FORMATS = ("jsonl", "csv", "parquet")  # per-example records written as they are computed


def arrow_table(cols: dict[str, np.ndarray]):
    """Columns as a pyarrow table (per-position ``[N, S]`` fields as list columns)."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise UsageError("--format parquet needs pyarrow, which is not installed", 'install it with: pip install "dropcli[ray]"') from e
    return pa.table({c: pa.array(list(v) if v.ndim > 1 else v) for c, v in cols.items()})


class RowWriter:
    """Per-example records appended block by block (``write(cols)``) to a temporary file beside
    ``target`` that :meth:`close` renames onto it (``-``: stdout, once complete); on an error
    :meth:`abort` removes it. Memory holds one block's text at a time."""

    def __init__(self, target: str, fmt: str):
        if fmt not in STREAM_FORMATS:
            raise UsageError(f"--format {fmt} cannot be streamed", f"choose {' or '.join(STREAM_FORMATS)}")
        self.fmt = fmt
        self._ctx = atomic_path(target)
        self.path = self._ctx.__enter__()
        self._target = target
        self._fh = None
        self.rows = 0

    def write(self, cols: dict[str, np.ndarray]) -> None:
        from dropcli.io.files import write_errors

        with write_errors(self._target):
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                table = arrow_table(cols)
                if self._fh is None:
                    self._fh = pq.ParquetWriter(str(self.path), table.schema)
                self._fh.write_table(table)
                self.rows += table.num_rows
                return
            if self._fh is None:
                self._fh = open(self.path, "w")
            if self.fmt == "jsonl":
                text = records_jsonl(cols)
            else:
                text = to_csv(cols)
                if self.rows:
                    text = text.split("\n", 1)[1]  # the header once
            self._fh.write(text)
        self.rows += len(next(iter(cols.values())))

    def close(self) -> None:
        from dropcli.io.files import write_errors

        try:
            with write_errors(self._target):
                if self._fh is None:
                    raise DropcliError(f"no records were written to {self._target}")
                self._fh.close()
        except BaseException as e:
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        if self._fh is not None:
            self._fh.close()
        try:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:  # noqa: BLE001 - atomic_path re-raises the cause; the caller raises it
            pass


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz whose bytes depend only on the arrays (np.savez stamps the time). Stored, not
    deflated, as ``np.savez`` does: the per-example statistics are float64 numbers that deflate
    shrinks by 17% only, and deflating them cost 75 ms at 10,240 rows (29 arrays, 2.3 MB),
    against 3.5 ms stored (docs/speed.md). ``np.load`` reads both."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            with z.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def format_from_path(path: str | None) -> str | None:
    if not path or path == "-":
        return None
    suf = Path(path).suffix.lower().lstrip(".")
    return suf if suf in FORMATS else None


# ------------------------------------------------------------------ folders of shards


def check_output_dir(target: str, inputs: list) -> None:
    """An output folder must be new or empty, must not be an input, and its parent writable."""
    import os

    t = Path(target)
    for inp in inputs:
        if inp and inp != "-" and Path(inp).exists() and t.exists() and os.path.samefile(inp, t):
            raise UsageError(f"output folder {target} is an input", "choose another --output folder")
    if t.exists() and not t.is_dir():
        raise UsageError(f"--output {target} is a file, but --engine ray writes a folder of shards there",
                         "give a new folder, or a file ending in .json, .jsonl, .csv or .npz")
    if t.is_dir() and any(t.iterdir()):
        raise UsageError(f"output folder {target} is not empty", "give a new or empty folder (nothing is overwritten)")
    parent = t.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"the folder {parent} of --output does not exist", "create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"the folder {parent} of --output is not writable", "choose a writable place")


def write_shards(target: str, fmt: str, summary: dict[str, Any], cols: dict[str, np.ndarray],
                 ranges: list[tuple[int, int]]) -> int:
    """Per-example records as ``part-00000.<fmt>`` files, one per input shard (split every
    SHARD_ROWS rows), in input order, plus ``summary.json``. Written into a temporary folder
    beside the target and renamed onto it at the end, so an interrupted run leaves nothing."""
    import os
    import shutil
    import tempfile

    t = Path(target).resolve()
    pieces = [(s, min(b, s + SHARD_ROWS)) for a, b in ranges for s in range(a, b, SHARD_ROWS)]
    with write_errors(target):
        tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent))
    try:
        with write_errors(target):
            for k, (a, b) in enumerate(pieces):
                part = {c: v[a:b] for c, v in cols.items()}
                dest = tmp / f"part-{k:05d}.{fmt}"
                if fmt == "jsonl":
                    dest.write_text(records_jsonl(part))
                else:
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({c: pa.array(list(v) if v.ndim > 1 else v) for c, v in part.items()}), dest)
            (tmp / "summary.json").write_text(json.dumps(_clean(summary), indent=1) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            if t.is_dir():
                t.rmdir()  # empty (checked before the run)
            os.replace(tmp, t)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(pieces)


SHARD_ROWS = 1_000_000
