"""Inputs as an ordered list of row ranges: one file, or a folder / glob / list of shards.

`dropcli uncertainty --input` takes what :mod:`dropcli.data` reads (.npy, .npz, .pt, .csv,
stdin) and, in addition, a *sharded* input: a folder of ``.npy`` / ``.npz`` / ``.parquet``
files, a glob (``'data/part-*.npz'``, quoted so the shell leaves it alone), or a
comma-separated list of such files. Shards are ordered by file name with runs of digits
compared as numbers (``part-2`` before ``part-10``); an example's *global index* is its
position in that order, and the MC engine keys its random stream by that index.

:func:`open_source` checks every shard from its header alone (array names, shapes, dtypes,
row counts), so a missing or unreadable shard is reported by name before any work starts.
:meth:`Source.read` reads one row range (an ``.npy`` is memory-mapped; an ``.npz`` member is
decompressed once and cached; Parquet reads only the row groups it needs) and checks its
values with :func:`dropcli.data.bind`, so workers can read their own ranges.
"""

from __future__ import annotations

import glob
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from dropcli.io import data as D
from dropcli.errors import DropcliError

SHARD_SUFFIXES = (".npy", ".npz", ".parquet")
_GLOB_CHARS = set("*?[")


@dataclass
class Shard:
    path: str
    kind: str  # npy | npz | parquet
    rows: int
    offset: int  # global index of its first row
    keys: list[str]  # arrays (npz members / parquet columns) feeding the model inputs, in input order
    label: str | None = None  # array / column holding labels
    tabular: bool = False  # parquet: the input is all non-label scalar columns, in order


@dataclass
class Source:
    """An input as global rows 0..n-1: shards, or arrays already in memory."""

    name: str
    specs: list
    shards: list[Shard] = field(default_factory=list)
    arrays: list[np.ndarray] | None = None  # in memory (bound); None for shards
    labels: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n(self) -> int:
        if self.arrays is not None:
            return len(self.arrays[0])
        return sum(s.rows for s in self.shards)

    @property
    def sharded(self) -> bool:
        return self.arrays is None

    def ranges(self) -> list[tuple[int, int, int]]:
        """(shard number or -1, first global row, end global row) for every shard."""
        if self.arrays is not None:
            return [(-1, 0, self.n)]
        return [(i, s.offset, s.offset + s.rows) for i, s in enumerate(self.shards)]

    def units(self, rows_per_unit: int) -> list[dict]:
        """Work units: row ranges that never cross a shard boundary."""
        out = []
        for k, a, b in self.ranges():
            for s in range(a, b, rows_per_unit):
                out.append({"shard": k, "start": s, "stop": min(b, s + rows_per_unit)})
        return out

    def read(self, shard: int, start: int, stop: int) -> list[np.ndarray]:
        """Bound model inputs for global rows [start, stop) of one shard (-1: in memory)."""
        if shard < 0:
            assert self.arrays is not None
            return [x[start:stop] for x in self.arrays]
        sh = self.shards[shard]
        a, b = start - sh.offset, stop - sh.offset
        arrays = _read_rows(sh, a, b, self._cache, self.specs)
        where = sh.path if (a, b) == (0, sh.rows) else f"{sh.path} (rows {a}-{b - 1})"
        return D.bind(arrays, self.specs, where)

    def read_all(self) -> list[np.ndarray]:
        if self.arrays is not None:
            return self.arrays
        parts = [self.read(k, a, b) for k, a, b in self.ranges()]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.specs))]


# ------------------------------------------------------------------------------ opening


def is_sharded(spec: str) -> bool:
    if spec == "-":
        return False
    p = Path(spec)
    if p.is_dir() or _GLOB_CHARS & set(spec):
        return True
    if "," in spec and not p.exists():
        return True
    return p.suffix.lower() == ".parquet"


def open_source(spec: str, specs: Sequence, what: str = "input") -> Source:
    """An input for the model with these input specs; shards are checked from their headers."""
    specs = list(specs)
    if not is_sharded(spec):
        arrays = D.read_arrays(spec)
        src = "stdin" if spec == "-" else spec
        xs = D.bind(arrays, specs, src)
        lk = D.label_key(list(arrays))
        return Source(src, specs, arrays=xs, labels=np.asarray(arrays[lk]) if lk else None)
    paths = list_shards(spec, what)
    shards: list[Shard] = []
    off = 0
    for path in paths:
        sh = _open_shard(path, specs, off)
        shards.append(sh)
        off += sh.rows
    with_labels = [s for s in shards if s.label]
    if with_labels and len(with_labels) != len(shards):
        lacking = next(s for s in shards if not s.label)
        raise DropcliError(f"{what} shard {lacking.path} has no labels but {with_labels[0].path} has '{with_labels[0].label}'",
                           "give every shard the same arrays, or pass --labels")
    src = Source(spec, specs, shards=shards)
    if with_labels:
        src.labels = np.concatenate([_read_labels(s) for s in shards])
    if src.n == 0:
        raise DropcliError(f"{what} {spec} has no examples", "give at least one example")
    return src


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def list_shards(spec: str, what: str = "input") -> list[str]:
    """The shard files of a folder, glob or comma list, in their deterministic order."""
    p = Path(spec)
    if p.is_dir():
        entries = [str(e) for e in p.iterdir() if e.suffix.lower() in SHARD_SUFFIXES and not e.name.startswith(".")]
        if not entries:
            raise DropcliError(f"{what} folder {spec} holds no .npy, .npz or .parquet shards", "check the path")
        paths = sorted(entries, key=_natural_key)
    elif p.exists():
        paths = [spec]
    else:
        items = [s.strip() for s in spec.split(",") if s.strip()] if "," in spec else [spec]
        paths = []
        for item in items:
            if _GLOB_CHARS & set(item):
                hits = sorted((h for h in glob.glob(item) if Path(h).suffix.lower() in SHARD_SUFFIXES), key=_natural_key)
                if not hits:
                    raise DropcliError(f"no {what} shards match {item}", "check the pattern (quote it so the shell does not expand it)")
                paths += hits
            else:
                paths.append(item)
    for path in paths:
        if not os.path.exists(path):
            link = " (a broken link)" if os.path.islink(path) else ""
            raise DropcliError(f"{what} shard {path} does not exist{link}", "check the path, or remove it from the list")
        if Path(path).suffix.lower() not in SHARD_SUFFIXES:
            raise DropcliError(f"{what} shard {path} is not a .npy, .npz or .parquet file", "give shards of those kinds")
        if not os.path.isfile(path):
            raise DropcliError(f"{what} shard {path} is not a file", "give .npy, .npz or .parquet files")
    if len(set(map(os.path.realpath, paths))) != len(paths):
        dup = next(q for q in paths if sum(os.path.realpath(r) == os.path.realpath(q) for r in paths) > 1)
        raise DropcliError(f"{what} shard {dup} is listed twice", "give each shard once")
    return paths


def _unreadable(path: str, e: BaseException | str) -> DropcliError:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return DropcliError(f"cannot read input shard {path}: {text}", "check that the file is complete and of its kind")


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    return tuple(shape), np.dtype(dtype)


def _headers(path: str, kind: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) from the file's headers, without reading the data."""
    try:
        if kind == "npy":
            with open(path, "rb") as fh:
                return {"x": _npy_header(fh)}
        if kind == "npz":
            out = {}
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    if name.endswith(".npy"):
                        with z.open(name) as fh:
                            out[name[:-4]] = _npy_header(fh)
            if not out:
                raise ValueError("it holds no arrays")
            return out
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        rows = pf.metadata.num_rows
        out = {}
        for f in pf.schema_arrow:
            out[f.name] = ((rows,), f.type)  # type: ignore[assignment]
        return out
    except DropcliError:
        raise
    except ImportError as e:
        raise DropcliError(f"Parquet shards need pyarrow, which is not installed ({path})", 'install it with: pip install "dropcli[ray]"') from e
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from e


def _open_shard(path: str, specs: list, offset: int) -> Shard:
    kind = Path(path).suffix.lower().lstrip(".")
    heads = _headers(path, kind)
    if kind == "parquet":
        return _open_parquet(path, heads, specs, offset)
    for name, (shape, dtype) in heads.items():
        if dtype.hasobject:
            raise DropcliError(f"input shard {path}: array {name} holds Python objects", "save numeric arrays")
    keys = D.input_keys(list(heads), specs, path, {k: h[0] for k, h in heads.items()})
    rows = None
    for k, s in zip(keys, specs):
        shape, dtype = heads[k]
        if len(shape) == 0:
            raise DropcliError(f"{path}: input {s.name} is a scalar", "give an array with one row per example")
        D.check_input(np.zeros((1,) + shape[1:], dtype), s, path)  # names, shapes, dtypes (values: when read)
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise DropcliError(f"{path}: input {s.name} has {shape[0]} rows, but the first input has {rows}",
                               "give every input the same number of examples")
    label = D.label_key(list(heads))
    if label is not None and (not heads[label][0] or heads[label][0][0] != rows):
        raise DropcliError(f"{path}: labels '{label}' have {heads[label][0][:1]} rows but the input has {rows}",
                           "give one label per example")
    return Shard(path, kind, int(rows or 0), offset, keys, label)


def _open_parquet(path: str, heads: dict, specs: list, offset: int) -> Shard:
    import pyarrow as pa

    names = list(heads)
    rows = next(iter(heads.values()))[0][0] if heads else 0
    try:
        keys = D.input_keys(names, specs, path)
        tabular = False
    except DropcliError:
        label = D.label_key(names)
        feats = [n for n in names if n != label]
        if len(specs) != 1 or not feats or not all(pa.types.is_integer(heads[n][1]) or pa.types.is_floating(heads[n][1]) for n in feats):
            raise
        keys, tabular = feats, True
    label = D.label_key(names, keys)
    sh = Shard(path, "parquet", int(rows), offset, keys, label, tabular)
    if rows:
        first = _read_rows(sh, 0, 1, {}, specs)
        D.bind(first, specs, path)
    return sh


def _read_labels(sh: Shard) -> np.ndarray:
    try:
        if sh.kind == "npz":
            with np.load(sh.path, allow_pickle=False) as z:
                y = np.asarray(z[sh.label])
        else:
            import pyarrow.parquet as pq

            y = _column_numpy(pq.read_table(sh.path, columns=[sh.label]).column(0), sh.path, sh.label)
    except DropcliError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _unreadable(sh.path, e) from e
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    return y


def _column_numpy(col, path: str, name: str) -> np.ndarray:
    """A Parquet column as an array: scalars -> [n]; (nested, fixed-length) lists -> [n, ...]."""
    import pyarrow as pa

    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        if arr.null_count:
            raise DropcliError(f"{path}: column {name} has missing values", "fill or drop them first")
        return arr.to_numpy(zero_copy_only=False)
    shape = [len(arr)]
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if arr.null_count:
            raise DropcliError(f"{path}: column {name} has missing values", "fill or drop them first")
        if pa.types.is_fixed_size_list(t):
            width = t.list_size
        else:
            lens = np.diff(arr.offsets.to_numpy())
            if len(lens) and not np.all(lens == lens[0]):
                raise DropcliError(f"{path}: column {name} holds lists of different lengths", "give every example the same shape")
            width = int(lens[0]) if len(lens) else 0
        arr = arr.flatten()
        t = arr.type
        shape.append(width)
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DropcliError(f"{path}: column {name} has type {col.type}", "store numbers, or fixed-length lists of numbers")
    return arr.to_numpy(zero_copy_only=False).reshape(shape)


def _read_rows(sh: Shard, a: int, b: int, cache: dict, specs: list) -> dict[str, np.ndarray]:
    """Arrays by name for local rows [a, b) of a shard."""
    if not os.path.exists(sh.path):
        raise DropcliError(f"input shard {sh.path} does not exist (it was there when the run started)", "check the path")
    try:
        if sh.kind == "npy":
            mm = np.load(sh.path, mmap_mode="r", allow_pickle=False)
            if len(mm) != sh.rows:
                raise ValueError(f"it has {len(mm)} rows, {sh.rows} when the run started")
            return {"x": np.array(mm[a:b])}
        if sh.kind == "npz":
            hit = cache.get("npz")
            if hit is None or hit[0] != sh.path:
                with np.load(sh.path, allow_pickle=False) as z:
                    hit = (sh.path, {k: z[k] for k in sh.keys})
                cache["npz"] = hit
            return {k: v[a:b] for k, v in hit[1].items()}
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(sh.path)
        md = pf.metadata
        groups, start, first = [], 0, None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if start < b and start + n > a:
                groups.append(g)
                first = start if first is None else first
            start += n
        table = pf.read_row_groups(groups, columns=sh.keys).slice(a - (first or 0), b - a)
        cols = {k: _column_numpy(table.column(k), sh.path, k) for k in sh.keys}
        if sh.tabular:
            return {specs[0].name: np.column_stack([cols[k] for k in sh.keys])}
        return cols
    except DropcliError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _unreadable(sh.path, e) from e
