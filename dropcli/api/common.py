"""What the verbs of the API share: models given as a path or already loaded, inputs given as
a path or as arrays, and the default progress and log callbacks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

Log = Callable[[str], None]


def no_log(text: str) -> None:
    """The default ``log``: log lines go nowhere."""


@contextlib.contextmanager
def no_progress(what: str, total: int) -> Iterator[Callable[..., None]]:
    """The default ``progress(label, total)``: yields ``advance(k=1, info="")``, which shows nothing."""
    yield lambda k=1, info=None: None


def load_opts(trust_pickle: bool = False, imports: Optional[Sequence[str]] = None, arch: Optional[str] = None,
              input_shape: Optional[str] = None, example_data: Any = None) -> dict:
    """The model-loading options of every verb. ``example_data``: the verb's data file, whose first
    rows give the example input (dtype and shape) of a model that does not record one (a
    TorchScript trace, a pickled module, a state_dict)."""
    opts = {"trust_pickle": trust_pickle, "imports": list(imports or []), "arch": arch, "input_shape": input_shape}
    if is_path(example_data) and str(example_data) != "-" and Path(example_data).is_file():
        opts["example_data"] = str(example_data)
    return opts


def resolve_device(device: str) -> str:
    """``--device``: cpu, cuda or auto (a clear error when CUDA was asked for and is missing).
    torch is imported only to look for a GPU: an ONNX model on the CPU never loads it."""
    from dropcli.errors import DropcliError, UsageError

    if device == "cpu":
        return device
    if device != "auto" and not device.startswith("cuda"):
        raise UsageError(f"unknown --device {device!r}", "choose cpu, cuda or auto")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise DropcliError("--device cuda was asked for, but no CUDA GPU is available", "use --device cpu or auto")
    return device


def is_path(obj: Any) -> bool:
    return isinstance(obj, (str, Path))


def resolve_model(model: Any, opts: dict, copy: bool = False) -> tuple[Any, str]:
    """(loaded model, its name in reports): a path is loaded (``-``: stdin) and named as given;
    a loaded model is used as is (``copy``: a deep copy, so the caller's model is not changed)
    and named by its source."""
    if is_path(model):
        from dropcli.backends import load_model

        return load_model(str(model), **opts), str(model)
    if not hasattr(model, "backend") or not hasattr(model, "layers"):
        from dropcli.errors import UsageError

        raise UsageError(f"expected a model path or a model from dropcli.load(), got {type(model).__name__}")
    return (copy_model(model) if copy else model), str(getattr(model, "source", "") or "<model>")


def copy_model(model: Any) -> Any:
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model)


def as_arrays(x: Any, specs: Sequence[Any]) -> dict:
    """In-memory inputs as named arrays: one array (a single-input model), a list of arrays (one
    per model input, in order) or a dict name -> array (``x``/``y`` and the input names)."""
    import numpy as np

    from dropcli.errors import UsageError

    if isinstance(x, dict):
        return {str(k): np.asarray(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if len(x) != len(specs):
            raise UsageError(f"got {len(x)} input arrays for a model with {len(specs)} input(s)")
        return {s.name: np.asarray(a) for s, a in zip(specs, x)}
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return {"x": np.asarray(x)}


def open_input(x: Any, specs: Sequence[Any], what: str = "input"):
    """An input as a :class:`dropcli.io.shards.Source`: a path (file, folder, glob, ``-``) or arrays."""
    from dropcli.io import data as D
    from dropcli.io.shards import Source, open_source

    if is_path(x):
        return open_source(str(x), specs, what)
    arrays = as_arrays(x, specs)
    xs = D.bind(arrays, list(specs), what)
    lk = D.label_key(list(arrays))
    import numpy as np

    return Source(what, list(specs), arrays=xs, labels=np.asarray(arrays[lk]) if lk else None)


def read_labels(labels: Any):
    """Labels from a path, or an array; None stays None."""
    if labels is None:
        return None
    if is_path(labels):
        from dropcli.io.data import read_labels as read

        return read(str(labels))
    import numpy as np

    y = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    return y
