"""Reading inputs and labels: .npy, .npz, .pt, .csv, or '-' (stdin, format sniffed).

Arrays are matched to the model's inputs by name (.npz), so multi-input models work;
with one input, ``x`` (or the only non-label array) is used and ``y`` holds the labels.
Every mismatch is a one-line :class:`DropcliError` naming what was expected.
"""

from __future__ import annotations

import io
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dropcli.errors import DropcliError

LABEL_KEYS = ("y", "labels", "label", "target", "targets")


@dataclass
class InputSpec:
    name: str
    shape: list[int | None] | None  # None entries are free (batch or dynamic)
    dtype: np.dtype


def _read_bytes(path: str) -> tuple[bytes, str]:
    if path == "-":
        from dropcli.io.files import claim_stdin

        claim_stdin("data")
        data = sys.stdin.buffer.read()
        return data, "<stdin>"
    p = Path(path)
    if not p.exists():
        raise DropcliError(f"input file {path} does not exist", "check the path")
    if p.is_dir():
        raise DropcliError(f"input path {path} is a folder", "give a .npy, .npz, .pt or .csv file")
    return p.read_bytes(), path


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """All arrays in a file, by name (single arrays are named ``x``)."""
    data, label = _read_bytes(path)
    if not data.strip():
        raise DropcliError(f"input {label} is empty", "give a file with at least one example")
    suffix = Path(path).suffix.lower() if path != "-" else ""
    try:
        if data.startswith(b"\x93NUMPY"):
            return {"x": np.load(io.BytesIO(data), allow_pickle=False)}
        if data.startswith(b"PK\x03\x04"):
            if suffix == ".pt" or _is_torch_zip(data):
                return _read_torch(data, label)
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix in (".npy", ".npz", ".pt"):
            raise DropcliError(f"input {label} is not a valid {suffix} file", "check that it is complete")
        return {"x": _read_csv(data, label)}
    except DropcliError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"cannot read input {label}: {str(e).splitlines()[0][:200]}", "check the file's format") from e


def _is_torch_zip(data: bytes) -> bool:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return any(n.endswith("data.pkl") for n in z.namelist())


def _read_torch(data: bytes, label: str) -> dict[str, np.ndarray]:
    import torch

    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # safe: tensors only
    if isinstance(obj, torch.Tensor):
        return {"x": obj.numpy()}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v.numpy() for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in obj):
        names = ["x", "y"] if len(obj) == 2 else [f"input{i}" for i in range(len(obj))]
        return {n: v.numpy() for n, v in zip(names, obj)}
    raise DropcliError(f"{label} holds a {type(obj).__name__}", "save a tensor, or a dict of tensors named after the model's inputs")


def _read_csv(data: bytes, label: str) -> np.ndarray:
    text = data.decode("utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DropcliError(f"input {label} is empty")
    first = lines[0].split(",")
    skip = 0
    try:
        [float(v) for v in first]
    except ValueError:
        skip = 1  # a header row
    rows = lines[skip:]
    if not rows:
        raise DropcliError(f"input {label} has a header but no rows")
    try:
        arr = np.loadtxt(io.StringIO("\n".join(rows)), delimiter=",", ndmin=2)
    except ValueError as e:
        raise DropcliError(f"input {label} is not a numeric CSV: {e}", "use one example per row, numbers only") from e
    if np.all(arr == np.round(arr)) and np.all(np.abs(arr) < 2**31):
        return arr.astype(np.int64) if "." not in text.split("\n", 1)[-1] else arr
    return arr


def read_labels(path: str) -> np.ndarray:
    if path != "-" and not Path(path).exists():
        raise DropcliError(
            f"labels file {path} does not exist",
            "give the path of a file of labels; an .npz input's 'y' (or 'labels') array is read without --labels",
        )
    arrays = read_arrays(path)
    for k in LABEL_KEYS + ("x",):
        if k in arrays:
            y = arrays[k]
            break
    else:
        y = next(iter(arrays.values()))
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    return y


def _fits(shape: Sequence[int] | None, spec: InputSpec) -> bool:
    """Whether an array of this shape can feed the input (rank and fixed dims; unknown: yes)."""
    if shape is None or spec.shape is None:
        return True
    return len(shape) == len(spec.shape) and all(e is None or e == d for e, d in zip(spec.shape[1:], shape[1:]))


def _want(spec: InputSpec) -> str:
    return "[N, " + ", ".join("?" if e is None else str(e) for e in (spec.shape or [None, None])[1:]) + "]"


def input_keys(names: Sequence[str], specs: Sequence[InputSpec], source: str,
               shapes: dict[str, Sequence[int]] | None = None) -> list[str]:
    """Which of the named arrays feed the model's inputs, in input order.

    One input: the array named after it, else ``x`` (the README's convention), else the only
    array that is not a label. Several candidates and none of those names: refused, listing
    them. ``shapes`` (name -> shape), when known, lets the errors say which arrays fit, and
    refuses ``x`` among several arrays when it does not fit the input but another one does."""
    names = list(names)
    if len(specs) == 1:
        s = specs[0]
        cands = [k for k in names if k not in LABEL_KEYS]
        fit = [k for k in cands if _fits(shapes.get(k), s)] if shapes is not None else []
        eg = f"e.g. np.savez(path, x=d['{fit[0]}'])" if len(fit) == 1 else "e.g. np.savez(path, x=..., y=...)"
        key = s.name if s.name in names else "x" if "x" in names else None
        if key is None:
            if len(cands) == 1:
                return cands
            fits = f"; {', '.join(fit)} {'fits' if len(fit) == 1 else 'fit'} its shape {_want(s)}" if fit else ""
            raise DropcliError(f"{source} has arrays {sorted(names)} and none is named 'x' or after the model input "
                               f"'{s.name}', so the input is ambiguous{fits}",
                               f"save the array to use as 'x' (or '{s.name}'), {eg}")
        if shapes is not None and len(cands) > 1 and not _fits(shapes.get(key), s) and fit:
            raise DropcliError(f"{source}: array {key} has shape {list(shapes[key])}, the model expects {_want(s)}; "
                               f"{' and '.join(fit)} {'fits' if len(fit) == 1 else 'fit'}",
                               f"save the array to use as '{key}', {eg}")
        return [key]
    missing = [s.name for s in specs if s.name not in names]
    if missing:
        raise DropcliError(f"{source} lacks arrays for the model inputs {missing} (it has {sorted(names)})",
                           "save an .npz with one array per model input, named after it")
    return [s.name for s in specs]


def label_key(names: Sequence[str], used: Sequence[str] = ()) -> str | None:
    """The array that holds labels beside the inputs (y, labels, ...), if any."""
    names = list(names)
    for k in LABEL_KEYS:
        if k in names and len(names) > 1 and k not in used:
            return k
    return None


def bind(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec], source: str) -> list[np.ndarray]:
    """Pick and check the arrays that feed the model's inputs."""
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    xs = [arrays[k] for k in input_keys(list(arrays), specs, source, shapes)]
    out = []
    n = None
    for s, x in zip(specs, xs):
        x = np.asarray(x)
        out.append(check_input(x, s, source))
        if n is None:
            n = len(x)
        elif len(x) != n:
            raise DropcliError(f"{source}: input {s.name} has {len(x)} rows, but the first input has {n}",
                               "give every input the same number of examples")
    return out


def check_input(x: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    if x.ndim == 0 or len(x) == 0:
        raise DropcliError(f"{source}: input {spec.name} is empty", "give at least one example")
    if x.dtype.kind not in "biuf":
        raise DropcliError(f"{source}: input {spec.name} has dtype {x.dtype}", "give numbers (int or float)")
    if spec.shape is not None:
        exp = spec.shape
        if x.ndim != len(exp) or any(e is not None and e != d for e, d in zip(exp[1:], x.shape[1:])):
            want = "[N, " + ", ".join("?" if e is None else str(e) for e in exp[1:]) + "]"
            raise DropcliError(f"{source}: input {spec.name} has shape {list(x.shape)}, the model expects {want}",
                               "reshape the data to match (the first dimension is the batch)")
    want = np.dtype(spec.dtype)
    if want.kind == "f":
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            bad = int(np.argwhere(~np.isfinite(x).reshape(len(x), -1).all(1))[0][0])
            raise DropcliError(f"{source}: input {spec.name} has NaN or infinite values (first in example {bad})",
                               "clean the data first")
        return x.astype(want, copy=False)
    if want.kind in "iu":
        if x.dtype.kind == "f":
            if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
                raise DropcliError(f"{source}: input {spec.name} must hold integers (the model takes {want})",
                                   "give integer ids, e.g. token ids")
        return x.astype(want, copy=False)
    if want.kind == "b":
        return x.astype(bool)
    return x
