"""Models saved with a fixed batch size.

``torch.onnx.export`` without ``dynamic_axes`` and ``torch.export.export`` without
``dynamic_shapes`` both write a model whose batch size is a constant, often 1. Many such
models are batch-generic all the same (an MLP's Gemm runs at any batch once the input's
declared size is freed); others bake the batch into their graph (a transformer's
``Reshape``/``Expand`` shapes, position ids expanded to ``[1, S]``), and run only at that size.

The MC engines tile each example's T samples into one batch of B*T rows, and pad small batches
to ``MIN_ROWS``: neither is possible at a fixed batch. :func:`fit_batch` decides, once per
runner, on a probe (the deterministic pass at the declared batch against the same rows inside
a larger batch):

* batch-generic: the runner is used as it is (ONNX: on a copy whose inputs' batch size is
  freed), at full speed;
* fixed: :class:`FixedBatchRunner` runs the model at exactly its batch size, one sample at a
  time. Each sample still draws its noise from its own keyed stream (seed, site, example,
  sample), so results do not depend on chunking, and ``--seed`` repeats them; the masks are
  not those the tiled engine would draw for a batch-generic model.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dropcli.engines.keyed import MIN_ROWS, SAMPLE_BLOCK

PROBE_EXTRA = 3  # rows added to the declared batch for the probe


def _user_inputs(graph: Any) -> list[Any]:
    """An ONNX graph's inputs that the user feeds: not initializers, not dropcli's MC switch."""
    from dropcli.model.naming import MC_INPUT

    inits = {t.name for t in graph.initializer}
    return [vi for vi in graph.input if vi.name not in inits and vi.name != MC_INPUT]


def declared_batch(model: Any) -> int | None:
    """The batch size a model declares as a constant on its inputs (on one is enough: they share
    the batch), or None (a symbolic or unknown batch). ONNX: the inputs' first dimension; torch: a
    ``.pt2`` program's placeholders (the formats dropcli captures itself keep the batch symbolic)."""
    sizes: set[int] = set()
    if getattr(model, "backend", None) == "onnx":
        for vi in _user_inputs(model.model.graph):
            dims = vi.type.tensor_type.shape.dim
            if not len(dims):
                continue
            if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                sizes.add(int(dims[0].dim_value))
    else:
        from dropcli.model import formats

        if getattr(model, "format", None) != formats.EXPORT:
            return None
        import torch

        for n in model.gm.graph.nodes:
            if n.op != "placeholder":
                continue
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() == 0:
                continue
            if isinstance(val.shape[0], int):
                sizes.add(int(val.shape[0]))
    return sizes.pop() if len(sizes) == 1 else None


def free_batch(model: Any) -> Any:
    """A copy of an ONNX model whose inputs (and outputs) have a symbolic batch size; the
    shapes recorded for intermediate values are dropped (they carry the old batch)."""
    import onnx

    from dropcli.backends.onnx.model import OnnxModel

    m = onnx.ModelProto()
    m.CopyFrom(model.model)
    g = m.graph
    for vi in _user_inputs(g) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "N"
    del g.value_info[:]
    return OnnxModel(m, model.source, model.external)


def probe_inputs(specs: Sequence[Any], rows: int, example: Sequence[Any] | None = None) -> list[np.ndarray]:
    """``rows`` rows per input: the model's example rows repeated where there is one, else
    zeros for integer inputs (valid token ids) and ones for bool, a fixed normal draw for floats."""
    rng = np.random.default_rng(0)
    out = []
    for i, spec in enumerate(specs):
        ex = example[i] if example is not None and i < len(example) else None
        if ex is not None:
            a = np.asarray(ex.detach().cpu().numpy() if hasattr(ex, "detach") else ex)
            if a.ndim and len(a):
                out.append(np.ascontiguousarray(np.resize(a, (rows,) + a.shape[1:]).astype(a.dtype)))
                continue
        shape = (rows,) + tuple(int(d) if d is not None else 8 for d in (spec.shape or [None, 1])[1:])
        dt = np.dtype(spec.dtype)
        if dt.kind in "iu":
            out.append(np.zeros(shape, dtype=dt))
        elif dt.kind == "b":
            out.append(np.ones(shape, dtype=dt))
        else:
            out.append(rng.standard_normal(shape).astype(dt))
    return out


def _agree(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return False
    scale = max(1.0, float(np.abs(a).max(initial=0.0)))
    return bool(np.abs(a - b).max(initial=0.0) <= 1e-4 * scale)


def _set_min_rows(runner: Any, rows: int) -> None:
    engine = getattr(runner, "engine", None)
    (engine if engine is not None else runner).min_rows = rows


def fit_batch(model: Any, runner: Any, make: Any) -> Any:
    """The runner to use for ``model``: ``runner`` itself when the model declares no fixed
    batch, or runs correctly at another batch; else a :class:`FixedBatchRunner`. ``make(model)``
    builds a runner (the ONNX probe runs on a copy with a freed batch)."""
    b0 = declared_batch(model)
    if b0 is None or runner.n_sites == 0:
        return runner
    specs = runner.input_specs()
    xs = probe_inputs(specs, b0 + PROBE_EXTRA, getattr(model, "example_inputs", None))
    _set_min_rows(runner, 0)
    try:
        ref = runner.run_eval([x[:b0] for x in xs])
    except Exception:  # noqa: BLE001 - the model cannot run its own batch on these rows: leave it as it is
        _set_min_rows(runner, MIN_ROWS)
        return runner
    generic = runner if getattr(model, "backend", None) != "onnx" else make(free_batch(model))
    _set_min_rows(runner, MIN_ROWS)
    try:
        wide = generic.run_eval(xs)[:b0]
        ok = _agree(np.asarray(ref, dtype=np.float64), np.asarray(wide, dtype=np.float64))
    except Exception:  # noqa: BLE001 - the batch is baked into the graph
        ok = False
    if ok:
        return generic
    return FixedBatchRunner(runner, b0)


class FixedBatchRunner:
    """A runner over a model that runs only at batch ``batch``: rows go in groups of exactly
    that size (the last group padded with copies of its first row), one sample per pass; sample
    t of an example draws from its own keyed stream (the block ``t0 + t``)."""

    draws_ahead = False

    def __init__(self, inner: Any, batch: int):
        self.inner = inner
        self.batch = int(batch)
        _set_min_rows(inner, 0)
        self.note = (f"the model was saved for a fixed batch of {self.batch} (its graph bakes the batch in), so MC "
                     f"dropout runs {self.batch} row(s) and one sample per pass: slower; a model exported with a dynamic "
                     "batch runs all samples at once")

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _groups(self, xs: Sequence[np.ndarray], indices: Sequence[int] | None = None):
        n = len(xs[0])
        for a in range(0, n, self.batch):
            b = min(n, a + self.batch)
            part = [np.ascontiguousarray(x[a:b]) for x in xs]
            idx = list(indices[a:b]) if indices is not None else []
            pad = self.batch - (b - a)
            if pad:
                part = [np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) for x in part]
                idx += [-1 - k for k in range(pad)]
            yield b - a, part, idx

    def row_bytes(self, inputs: Sequence[np.ndarray]) -> int:
        return 1  # one group of ``batch`` rows at a time, whatever the chunk

    def run(self, xs: Sequence[np.ndarray], indices: Sequence[int], seed: int, T: int, t0: int = 0,
            then: Any = None) -> np.ndarray:
        outs = []
        for real, part, idx in self._groups(xs, indices):
            samples = [self.inner.run(part, idx, seed, 1, (t0 + t) * SAMPLE_BLOCK)[:real] for t in range(T)]
            outs.append(np.concatenate(samples, axis=1))
        return np.concatenate(outs, axis=0)

    def run_eval(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.inner.run_eval(part)[:real] for real, part, _ in self._groups(xs)], axis=0)



def _model_specs(model: Any) -> list[Any]:
    """The user inputs of a loaded model as InputSpecs (no runner needed)."""
    from dropcli.io.data import InputSpec

    specs = []
    if getattr(model, "backend", None) == "onnx":
        from onnx import helper

        for vi in _user_inputs(model.model.graph):
            tt = vi.type.tensor_type
            shape = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
            specs.append(InputSpec(vi.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
        return specs
    for n in model.gm.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            shape = [int(d) if isinstance(d, int) else None for d in val.shape] if hasattr(val, "shape") else None
            dtype = np.dtype(str(getattr(val, "dtype", "torch.float32")).replace("torch.", ""))
            specs.append(InputSpec(n.name, shape, dtype))
    return specs


def _onnx_eval(model: Any, xs: Sequence[np.ndarray]) -> np.ndarray:
    from dropcli.model.naming import MC_INPUT

    sess = model.session(deterministic=True)
    names = [i.name for i in sess.get_inputs() if i.name != MC_INPUT]
    feeds = dict(zip(names, xs))
    if any(i.name == MC_INPUT for i in sess.get_inputs()):
        feeds[MC_INPUT] = np.array(False)
    return np.asarray(sess.run([sess.get_outputs()[0].name], feeds)[0], dtype=np.float64)


def _torch_eval(model: Any, xs: Sequence[np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.gm(*[torch.from_numpy(np.ascontiguousarray(x)) for x in xs])
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return np.asarray(out.detach().double().cpu().numpy())


def trainable(model: Any) -> Any:
    """The model ``prune``/``finetune`` train: itself, or (ONNX) a copy with a freed batch when it
    was saved with a fixed batch but runs the same at another; a one-line error when the graph
    bakes its batch in (training and evaluation run batches of other sizes)."""
    from dropcli.errors import DropcliError

    b0 = declared_batch(model)
    if b0 is None:
        return model
    xs = probe_inputs(_model_specs(model), b0 + PROBE_EXTRA, getattr(model, "example_inputs", None))
    onnx_model = getattr(model, "backend", None) == "onnx"
    run = _onnx_eval if onnx_model else _torch_eval
    candidate = free_batch(model) if onnx_model else model
    try:
        ok = _agree(run(model, [x[:b0] for x in xs]), run(candidate, xs)[:b0])
    except Exception:  # noqa: BLE001 - the batch is baked into the graph
        ok = False
    if ok:
        return candidate
    raise DropcliError(f"the model was saved for a fixed batch of {b0} and its graph bakes that size in, so it cannot "
                       "be trained or evaluated on batches of other sizes",
                       "re-export it with a dynamic batch (torch.onnx.export(..., dynamic_axes=...) or "
                       "torch.export.export(..., dynamic_shapes=...)); `dropcli inject` and `dropcli uncertainty` run it as it is")
