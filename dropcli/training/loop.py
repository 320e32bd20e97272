"""Training data and the training loop shared by the commands that fine-tune a model
(``dropcli prune``, ``dropcli finetune``).

* :func:`load_split` reads ``--data`` / ``--val`` (``.npz`` with ``x`` and ``y``, ``.pt``, ``.csv``
  whose last column is the label) with the readers of :mod:`dropcli.data`, checks them against the
  model's input and output, and holds out a seeded split when there is no ``--val``.
* :func:`fit` is the epoch loop: seeded shuffling, Adam, progress reported through a callback
  (the CLI draws it as a bar on stderr), and Ctrl-C propagating as ``KeyboardInterrupt`` (the
  caller writes nothing).
* :func:`evaluate` gives the loss (and accuracy for classification) in eval mode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dropcli.analysis.task import infer_task
from dropcli.io.data import LABEL_KEYS, InputSpec, bind, read_arrays
from dropcli.errors import DropcliError, UsageError


class Inputs:
    """The rows of a model with several inputs (token ids and an attention mask, say): one tensor
    per input, in the model's input order. Indexing by rows, ``len`` and ``.to`` work as on the
    tensor a single-input model gets; :func:`feed` calls a model on either."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, rows: Any) -> "Inputs":
        return Inputs({k: v[rows] for k, v in self.tensors.items()})

    def to(self, device: Any) -> "Inputs":
        return Inputs({k: v.to(device) for k, v in self.tensors.items()})

    def values(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.tensors.values())


def feed(model: Any, x: torch.Tensor | Inputs) -> Any:
    """``model`` on one batch: the tensor of a single-input model, or every input of an :class:`Inputs`."""
    return model(*x.values()) if isinstance(x, Inputs) else model(x)


def as_numpy_feed(names: list[str], x: torch.Tensor | Inputs) -> dict[str, np.ndarray]:
    """An onnxruntime feed: the graph's input names to the batch's arrays."""
    xs = x.values() if isinstance(x, Inputs) else (x,)
    return {n: t.detach().cpu().numpy() for n, t in zip(names, xs)}


def rows_like(example: tuple[torch.Tensor, ...], k: int) -> torch.Tensor | Inputs:
    """``k`` rows built from the example inputs (repeated), as a batch :func:`feed` takes."""
    reps = [torch.cat([t] * max(1, -(-k // max(1, len(t)))))[:k] for t in example]
    return reps[0] if len(reps) == 1 else Inputs({f"input_{i}": t for i, t in enumerate(reps)})


@dataclass
class Split:
    x: torch.Tensor | Inputs
    y: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.x)


def input_specs(example: tuple[torch.Tensor, ...], names: list[str] | None = None) -> list[InputSpec]:
    """What the data must hold: one array per model input, named after it (a single input may be
    ``x``), each of the example's trailing shape and dtype (token ids: any sequence length)."""
    names = list(names or [])
    if len(names) != len(example):
        names = ["x"] if len(example) == 1 else [f"input_{i}" for i in range(len(example))]
    specs = []
    for name, t in zip(names, example):
        dtype = np.dtype(str(t.dtype).removeprefix("torch."))
        shape = [None] + list(t.shape[1:])
        if dtype.kind in "iub" and len(shape) > 1:
            shape = [None] + [None] * (len(shape) - 1)  # ids and masks: the sequence length is the data's
        specs.append(InputSpec(name, shape, dtype))
    return specs


def input_names(model: Any) -> list[str] | None:
    """The loaded model's input names (ONNX graph inputs, torch graph placeholders), if known."""
    if getattr(model, "backend", None) == "onnx":
        return [i.name for i in model.graph_inputs()]
    gm = getattr(model, "gm", None)
    if gm is None:
        return None
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def _xy(path: str, specs: list[InputSpec]) -> tuple[torch.Tensor | Inputs, np.ndarray]:
    arrays = read_arrays(path)
    ykey = next((k for k in LABEL_KEYS if k in arrays), None)
    if ykey is None and _is_csv(path) and arrays["x"].ndim == 2 and arrays["x"].shape[1] >= 2:
        # a CSV (or single array): the last column holds the label
        full = arrays["x"]
        arrays = {"x": full[:, :-1], "y": full[:, -1]}
        ykey = "y"
    if ykey is None:
        raise DropcliError(f"{path} has no labels (arrays: {sorted(arrays)})",
                           "save an .npz with arrays x and y, a .pt dict {'x': ..., 'y': ...}, or a CSV whose last column is the label")
    y = np.asarray(arrays.pop(ykey))
    xs = bind(arrays, specs, path)
    if len(y) != len(xs[0]):
        raise DropcliError(f"{path}: {len(xs[0])} inputs but {len(y)} labels", "give one label per example")
    ts = [torch.from_numpy(np.ascontiguousarray(x)) for x in xs]
    return (ts[0] if len(ts) == 1 else Inputs({s.name: t for s, t in zip(specs, ts)})), y


def _is_csv(path: str) -> bool:
    if path == "-":
        return False
    with open(path, "rb") as fh:
        head = fh.read(6)
    return not (head.startswith(b"\x93NUMPY") or head.startswith(b"PK\x03\x04"))


def _labels(y: np.ndarray, task: str, out_shape: tuple[int, ...], source: str) -> torch.Tensor:
    if task == "classification":
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or (y.dtype.kind == "f" and not np.all(y == np.round(y))):
            raise DropcliError(f"{source}: classification labels must be one integer class per example",
                               "pass --task regression for real-valued targets")
        n = out_shape[-1] if out_shape else 1
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n:
            raise DropcliError(f"{source}: labels out of range: they span {lo}..{hi}, but the model has {n} outputs (classes 0..{n - 1})",
                               "check the labels, or pass --task regression")
        return torch.from_numpy(y.astype(np.int64))
    want = (len(y),) + tuple(out_shape)
    yy = y.astype(np.float32)
    if yy.size != int(np.prod(want)):
        raise DropcliError(f"{source}: regression targets have shape {list(y.shape)}, the model outputs [N, {', '.join(map(str, out_shape))}]",
                           "give one target per model output")
    return torch.from_numpy(yy.reshape(want))


def load_split(data: str, val: str | None, example: tuple[torch.Tensor, ...], out_shape: tuple[int, ...],
               task: str = "auto", seed: int = 0, val_fraction: float = 0.2,
               names: list[str] | None = None) -> tuple[Split, Split, str]:
    """Training and validation data, checked against the model (``names``: its input names, which
    a model with several inputs needs in the data); returns (train, val, task)."""
    specs = input_specs(example, names)
    xt, y = _xy(data, specs)
    task = infer_task(task, y, int(out_shape[-1]) if out_shape else 1)
    yt = _labels(y, task, out_shape, data)
    if val is not None:
        vx, vy = _xy(val, specs)
        return Split(xt, yt, data), Split(vx, _labels(vy, task, out_shape, val), val), task
    n = len(xt)
    n_val = int(round(n * val_fraction))
    if n < 5 or n_val < 1:
        raise DropcliError(f"{data} has only {n} examples, too few to hold out a validation split", "pass --val VAL, or more data")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    vi, ti = perm[:n_val], perm[n_val:]
    return (Split(xt[ti], yt[ti], data), Split(xt[vi], yt[vi], f"{data} (held-out {n_val} examples)"), task)


def data_loss(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y)
    return F.mse_loss(out, y)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, task: str, batch_size: int = 512, device: str = "cpu") -> dict[str, float]:
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    total, correct, n = 0.0, 0, 0
    try:
        for i in range(0, len(split), batch_size):
            xb, yb = split.x[i:i + batch_size].to(device), split.y[i:i + batch_size].to(device)
            out = feed(model, xb)
            if task == "classification":
                total += float(F.cross_entropy(out, yb, reduction="sum"))
                correct += int((out.argmax(-1) == yb).sum())
            else:
                total += float(F.mse_loss(out, yb, reduction="sum")) / max(1, out[0].numel())
            n += len(xb)
    finally:
        for m, t in was:
            m.training = t
    res = {"loss": total / max(n, 1)}
    if task == "classification":
        res["accuracy"] = correct / max(n, 1)
    else:
        res["rmse"] = math.sqrt(res["loss"])
    return res


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def _no_progress(what: str, total: int):
    yield lambda k=1, info="": None


def fit(model: nn.Module, train: Split, task: str, *, params: Iterable[dict[str, Any]], epochs: int, batch_size: int,
        seed: int, device: str = "cpu", regulariser: Callable[[float], tuple[torch.Tensor, dict[str, float]]] | None = None,
        train_modules: Iterable[nn.Module] = (), describe: Callable[[], str] | None = None,
        on_step: Callable[[int], None] | None = None, quiet: bool = False, label: str = "training",
        decay_from: float | None = None, progress: Callable | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        transform: Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor | None]] | None = None) -> list[dict[str, float]]:
    """Adam on ``data loss + regulariser(progress)`` for ``epochs`` epochs.

    Only ``train_modules`` are put in training mode: everything else (BatchNorm, dropout)
    stays in eval mode. ``regulariser(progress)`` gets the fraction of training done (0..1) and
    returns the term to add and numbers for the progress bar. With ``decay_from`` (a fraction of
    training) the learning rates fall linearly to 0 from that point on. Ctrl-C raises KeyboardInterrupt.

    ``progress(label, epochs)`` is a context manager yielding ``advance(k, info)``, called once per
    epoch with the epoch's numbers (``quiet`` or no ``progress``: nothing is reported).

    ``loss_fn(out, y, idx)`` replaces the data loss (``idx``: the batch's rows of ``train``, e.g. to
    look up a teacher's outputs for distillation); accuracy is still counted against ``y``.
    ``transform(xb, idx)`` returns ``(batch the model is fed, labelled)``, e.g. with some rows
    mixed; ``labelled`` (a bool mask, or None for all) marks the rows whose label still applies, and
    the training accuracy is counted over those.
    """
    if epochs < 1:
        raise UsageError("--epochs must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    gen = seed_all(seed)
    opt = torch.optim.Adam(list(params))
    base_lrs = [g["lr"] for g in opt.param_groups]
    model.eval()
    train_modules = list(train_modules)
    for m in train_modules:
        m.train()
    n = len(train)
    steps = max(1, math.ceil(n / batch_size))
    history = []
    step = 0
    try:
        with (_no_progress if quiet or progress is None else progress)(label, epochs) as advance:
            for epoch in range(epochs):
                perm = torch.randperm(n, generator=gen)
                tot, tot_reg, correct, counted = 0.0, 0.0, 0, 0
                extra: dict[str, float] = {}
                for k in range(steps):
                    idx = perm[k * batch_size:(k + 1) * batch_size]
                    if decay_from is not None:
                        progress = (epoch * steps + k) / (epochs * steps)
                        f = 1.0 if progress < decay_from else max(0.0, (1.0 - progress) / (1.0 - decay_from))
                        for g, lr0 in zip(opt.param_groups, base_lrs):
                            g["lr"] = lr0 * f
                    xb, yb = train.x[idx].to(device), train.y[idx].to(device)
                    labelled = None
                    if transform is not None:
                        xb, labelled = transform(xb, idx)
                    out = feed(model, xb)
                    loss = data_loss(out, yb, task) if loss_fn is None else loss_fn(out, yb, idx)
                    total = loss
                    if regulariser is not None:
                        reg, extra = regulariser((epoch + k / steps) / epochs)
                        total = loss + reg
                        tot_reg += float(reg.detach()) * len(idx)
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    opt.step()
                    if not torch.isfinite(total):
                        raise DropcliError("training diverged (the loss is not finite)", "lower --lr")
                    tot += float(loss.detach()) * len(idx)
                    if task == "classification":
                        hit = out.argmax(-1) == yb
                        correct += int(hit.sum() if labelled is None else hit[labelled].sum())
                        counted += len(idx) if labelled is None else int(labelled.sum())
                    step += 1
                    if on_step is not None:
                        on_step(step)
                rec = {"epoch": epoch + 1, "loss": tot / n, "reg": tot_reg / n, **extra}
                if task == "classification":
                    rec["accuracy"] = correct / max(counted, 1)
                history.append(rec)
                info = f"loss {rec['loss']:.4f}  reg {rec['reg']:.4f}"
                if "accuracy" in rec:
                    info += f"  acc {rec['accuracy']:.3f}"
                if describe is not None:
                    info += "  " + describe()
                advance(1, info)
    finally:
        for m in train_modules:
            m.eval()
    return history


# ---------------------------------------------------------------------------------------
# Model I/O shared by the verbs that train a loaded model (prune, finetune)
# ---------------------------------------------------------------------------------------


def model_example(model: Any) -> tuple:
    """Example inputs of a loaded model (torch or ONNX backend)."""
    if model.backend == "onnx":
        from dropcli.backends.torch.importer import onnx_example

        return onnx_example(model.model)
    if model.example_inputs is None:
        raise UsageError("dropcli cannot tell this model's input shape", "pass --input-shape, for example --input-shape 1x3x32x32")
    return tuple(model.example_inputs)


def reference_output(model: Any, x: "torch.Tensor | Inputs") -> list[np.ndarray]:
    """The loaded model's own outputs, every one (ONNX through onnxruntime), to check an import against."""
    if model.backend == "onnx":
        sess = model.session(deterministic=True)  # Dropout exported with training_mode=True: inference
        return list(sess.run(None, as_numpy_feed([i.name for i in model.graph_inputs()], x)))
    return output_arrays(feed(model, x))


def output_arrays(out: Any) -> list[np.ndarray]:
    """Every tensor a model returned (a tensor, tuple, dict or ``ModelOutput``), in order, as arrays."""
    from dropcli.backends.torch.outputs import output_leaves

    return [v.detach().cpu().numpy() for _, v in output_leaves(out) if isinstance(v, torch.Tensor)]


def max_diff(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The largest absolute difference over every output; inf when the outputs differ in number or shape."""
    if len(want) != len(got) or any(np.shape(a) != np.shape(b) for a, b in zip(want, got)):
        return float("inf")
    return max((float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))
                for a, b in zip(want, got) if np.size(a)), default=0.0)


def check_import(model: Any, gm: nn.Module, x: "torch.Tensor | Inputs", tol: float = 1e-4) -> None:
    """The importer must not change the function: compare every output on real inputs before training."""
    with torch.no_grad():
        diff = max_diff(reference_output(model, x), output_arrays(feed(gm, x)))
    if not diff <= tol:
        raise DropcliError(f"internal error: the imported model differs from the original by {diff:.3g}",
                           "please report this model")


def call_program(module: Any, xs: tuple) -> Any:
    """Call a loaded torch program the way it is called: a program exported with keyword inputs
    (``torch.export.export(m, (), kwargs=...)``) by keyword, any other positionally."""
    from dropcli.backends.torch.save import keyword_signature

    names = keyword_signature(module)
    if names and len(names) == len(xs):
        return module(**dict(zip(names, xs)))
    return module(*xs)


def verify_saved(path: Any, fmt: str, trained: nn.Module, x: "torch.Tensor | Inputs") -> float:
    """Run the written file with its stock loader (inference mode) and compare every output with
    ``trained``'s (inf when they differ in number or shape)."""
    from dropcli.model import formats

    with torch.no_grad():
        want = output_arrays(feed(trained, x))
        xs = x.values() if isinstance(x, Inputs) else (x,)
        if fmt == formats.ONNX:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 4
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])  # default optimisation level
            got = list(sess.run(None, as_numpy_feed([i.name for i in sess.get_inputs()], x)))
        elif fmt == formats.TORCHSCRIPT:
            got = output_arrays(torch.jit.load(str(path), map_location="cpu")(*xs))
        elif fmt == formats.EXPORT:
            got = output_arrays(call_program(torch.export.load(str(path)).module(), xs))
        elif fmt == formats.PICKLE:
            # the file this run just wrote; a pickle is only written for a pickle the user trusted (--trust-pickle)
            got = output_arrays(call_program(torch.load(str(path), map_location="cpu", weights_only=False).eval(), xs))
        else:
            return float("nan")  # no stock loader to check with: save_like_input refuses to write it
    return max_diff(want, got)


def save_like_input(gm: Any, model: Any, example: tuple, source: str, output: str, check_x: "torch.Tensor | Inputs",
                    site_meta: dict | None = None, model_meta: dict | None = None) -> tuple[str, float]:
    """Write a trained GraphModule atomically in the loaded model's format (ONNX stays ONNX),
    checked with its stock loader before it lands. ``model_meta`` (default: the loaded model's)
    is stored with it. Returns (format, max abs difference)."""
    from pathlib import Path

    from dropcli.model import formats
    from dropcli.backends.torch.model import TorchModel
    from dropcli.io.files import atomic_path

    fmt = formats.ONNX if model.backend == "onnx" else model.default_output_format()
    meta = model.model_meta if model_meta is None else model_meta
    tm = TorchModel(gm, fmt, tuple(example), source, site_meta, meta)
    with atomic_path(output, Path(output).suffix) as tmp:
        tm.save(tmp, fmt)
        if fmt == formats.ONNX and model.backend == "onnx":
            keep_onnx_output_names(tmp, onnx_output_names(model))
        err = verify_saved(tmp, fmt, gm, check_x)
        if not err <= 1e-4:
            raise DropcliError(f"internal error: the written {fmt} model differs from the trained model by {err:.3g}")
    return fmt, err


def onnx_output_names(model: Any) -> list[str] | None:
    """The graph output names of a loaded ONNX model (None for a torch model)."""
    if getattr(model, "backend", None) != "onnx":
        return None
    return [o.name for o in model.model.graph.output]


def keep_onnx_output_names(path: Any, names: list[str] | None) -> None:
    """Give the written ONNX file's outputs the input model's output names (users fetch outputs by
    name; the torch -> ONNX export names them after its graph nodes). Left as written when the
    outputs differ in number or a name is taken inside the graph."""
    import onnx

    from dropcli.backends.onnx.model import save_onnx

    m = onnx.load(str(path))
    old = [o.name for o in m.graph.output]
    if not names or len(old) != len(names) or old == names or len(set(names)) != len(names):
        return
    graph_in = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer}
    used = graph_in | {v for n in m.graph.node for v in (*n.input, *n.output)}
    if any(o in graph_in for o in old) or any(n in used and n not in old for n in names):
        return
    ren = dict(zip(old, names))
    for node in m.graph.node:
        node.input[:] = [ren.get(v, v) for v in node.input]
        node.output[:] = [ren.get(v, v) for v in node.output]
    for vi in (*m.graph.output, *m.graph.value_info):
        vi.name = ren.get(vi.name, vi.name)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    save_onnx(m, path, external=external)


def name_outputs(view: Any, model: Any) -> None:
    """An ONNX model's outputs are named in the file: name the view's outputs after them."""
    names = onnx_output_names(model)
    if view is not None and names and len(names) == len(view.names):
        view.names = names
