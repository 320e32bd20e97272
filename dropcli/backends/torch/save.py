"""Writing a (rewritten) torch graph: pickle, TorchScript, torch.export (.pt2), and ONNX through
the bridge module :mod:`dropcli.backends.export`.

Saving re-captures the edited graph (``torch.export`` / ``torch.jit.trace``), so TorchScript,
``.pt2`` and ONNX outputs contain only stock ops plus one bool buffer per site
(``<site>.dropcli_mc``) that switches MC mode. Beside the graph go the records of the sites and
of the whole model (:data:`~dropcli.model.naming.SITES_FILE`, :data:`~dropcli.model.naming.MODEL_FILE`),
and, for TorchScript, the example input and (where the trace holds a loop) a torch.export program.
Every file is written atomically.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import fx

from dropcli.backends.torch.fx import aten_name
from dropcli.errors import DropcliError, UsageError
from dropcli.io.files import atomic_path, write_bytes
from dropcli.model import formats
from dropcli.model.naming import EXAMPLE_FILE, MODEL_ATTR, MODEL_FILE, PROGRAM_FILE, SITES_FILE
from dropcli.model.quiet import quiet, short_error


def save_graph(model: Any, path: str | Path, fmt: str) -> str:
    """Write ``model`` (a :class:`~dropcli.backends.torch.model.TorchModel`: its ``gm``,
    ``example_inputs``, ``model_meta`` and ``sites_meta()``) to ``path`` as ``fmt``."""
    gm = model.gm
    if fmt == formats.PICKLE:
        buf = io.BytesIO()
        if model.model_meta:  # the facts about the whole model travel as an attribute of the pickled module
            setattr(gm, MODEL_ATTR, json.dumps(model.model_meta, sort_keys=True))
        try:
            torch.save(gm, buf)
        except (RecursionError, AttributeError, TypeError, pickle.PicklingError) as e:
            raise DropcliError(f"cannot pickle the rewritten model: {short_error(e)} (torch cannot pickle every "
                               "graph torch.export captures)", "write it with --format export or --format torchscript") from e
        finally:
            gm.__dict__.pop(MODEL_ATTR, None)
        with atomic_path(path) as tmp:
            write_bytes(tmp, buf.getvalue())
        return fmt
    if fmt == formats.STATE_DICT:
        raise UsageError("--format state_dict can't hold the inserted sites", "choose torchscript, export, onnx or pickle")
    example = require_example(model.example_inputs, fmt)
    if fmt == formats.TORCHSCRIPT:
        try:
            with torch.no_grad(), quiet():
                ts = torch.jit.trace(traceable_sizes(gm), example, check_trace=False, strict=False)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"cannot write TorchScript: {short_error(e)}", "try --format export or --format onnx") from e
        check_other_batch(ts, gm, example)
        extra = {EXAMPLE_FILE: example_record(example), SITES_FILE: _sites_record(model.sites_meta()),
                 **_model_extra(model.model_meta)}
        if has_loop(ts):
            # A scripted recurrence (the recurrent dropout family) traces to prim::Loop, which
            # TorchScript -> torch.export conversion can't read: keep the program beside it.
            extra[PROGRAM_FILE] = _program_bytes(gm, example)
        # remember the example input, so dropcli can re-load the output without --input-shape;
        # serialised in memory: torch's file writer aborts the process on a full disk
        buf = io.BytesIO()
        torch.jit.save(ts, buf, _extra_files=extra)
        with atomic_path(path) as tmp:
            write_bytes(tmp, buf.getvalue())
        return fmt
    ep = to_exported(gm, example)
    if fmt == formats.EXPORT:
        buf = io.BytesIO()
        torch.export.save(ep, buf, extra_files={SITES_FILE: _sites_record(model.sites_meta()),
                                                **_model_extra(model.model_meta)})
        with atomic_path(path, ".pt2") as tmp:
            write_bytes(tmp, buf.getvalue())
        return fmt
    if fmt == formats.ONNX:
        from dropcli.backends.export import export_torch_program

        export_torch_program(ep, example, path, model.sites_meta(), model.model_meta)
        return fmt
    raise UsageError(f"unknown output format {fmt!r}", f"choose one of {', '.join(formats.ALL)}")


def check_other_batch(ts: torch.jit.ScriptModule, gm: fx.GraphModule, example: tuple) -> None:
    """Refuse a trace that runs only at the example's batch size (``torch.jit.trace`` bakes sizes
    that a graph computes from the batch into constants): run it at one more row and compare."""
    n = example[0].shape[0] if example and example[0].dim() else 0
    if not n:
        return
    probe = tuple(torch.cat([t, t[:1]]) if t.dim() and t.shape[0] == n else t for t in example)
    why = ""
    try:
        with torch.no_grad(), quiet():
            a, b = ts(*probe), gm(*probe)
        la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        if len(la) != len(lb) or not all(torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True)
                                         for x, y in zip(la, lb) if isinstance(x, torch.Tensor)):
            why = "gives other results"
    except Exception as e:  # noqa: BLE001
        why = f"fails ({script_error(e)})"
    if why:
        raise DropcliError(
            f"the rewritten model traced as TorchScript runs only at batch size {n}: at {n + 1} rows it {why}",
            "write it with --format export (.pt2) or --format onnx, which keep the batch size dynamic")


def script_error(e: BaseException) -> str:
    """The cause of a TorchScript interpreter error: its last line (the first only says where)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and "TorchScript interpreter" in lines[0]:
        return lines[-1].removeprefix("RuntimeError: ")[:300]
    return short_error(e)


def require_example(example: tuple | None, fmt: str) -> tuple:
    """The example input writing ``fmt`` needs (a UsageError when there is none)."""
    if example is None:
        raise UsageError(
            f"writing {fmt} needs an example input, and dropcli cannot tell this model's input shape",
            "pass --input-shape, for example --input-shape 1x3x32x32",
        )
    return example


def to_exported(gm: fx.GraphModule, example: tuple):
    """``gm`` captured with ``torch.export``: the batch dimension dynamic, every dimension of an
    integer input (token ids, attention masks: the sequence length is the data's), and every
    other input dimension that is dynamic in ``gm`` (a ``.pt2`` exported with a dynamic H and W
    keeps them), each where the model allows it (``Dim.AUTO`` keeps a dimension the graph fixes
    static): the output runs at every size the input model ran at."""
    dyn = tuple({d: torch.export.Dim.AUTO for d in dims} or None for dims in _dynamic_dims(gm, example))
    args, kwargs = example, None
    names = keyword_signature(gm)
    if names and len(names) == len(example):
        # a program exported with keyword inputs keeps its call signature: keywords in, keywords out
        args, kwargs, dyn = (), dict(zip(names, example)), dict(zip(names, dyn))
    # an example of batch 1 makes export specialise the batch to 1 (its 0/1 rule): capture at 2 rows,
    # and at the example itself when the graph bakes a batch of 1 in
    two = tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t for t in example)
    tries = [two, example] if any(a is not b for a, b in zip(two, example)) else [example]
    for k, ex in enumerate(tries):
        if kwargs is not None:
            kwargs = dict(zip(names, ex))
        else:
            args = ex
        try:
            with quiet():
                return torch.export.export(gm, args, kwargs=kwargs, dynamic_shapes=dyn, strict=False)
        except Exception as e:  # noqa: BLE001
            if k == len(tries) - 1:
                raise DropcliError(f"cannot capture the rewritten model with torch.export: {short_error(e)}",
                                   "try --format torchscript") from e
    raise AssertionError("unreachable")


def _dynamic_dims(gm: fx.GraphModule, example: tuple) -> list[list[int]]:
    """Per example input: dim 0 (the batch), every dim of an integer input, and the dims the
    graph's placeholder holds as symbols. ``Dim.AUTO`` lets export keep each one dynamic where the
    rewritten graph allows it."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if len(vals) != len(example):
        vals = [None] * len(example)
    out = []
    for t, v in zip(example, vals):
        dims = set(range(t.dim() if not t.is_floating_point() else min(t.dim(), 1)))
        if isinstance(v, torch.Tensor) and v.dim() == t.dim():
            dims |= {d for d, s in enumerate(v.shape) if not isinstance(s, int)}
        out.append(sorted(dims))
    return out


def keyword_signature(gm: fx.GraphModule) -> list[str]:
    """The keyword inputs of a graph loaded from a program exported with keyword inputs
    (``torch.export.export(m, (), kwargs=...)``), in order; [] for positional signatures."""
    from dropcli.backends.torch.load import keyword_inputs

    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_children != 2 or spec.child(0).num_children:
        return []
    return keyword_inputs(spec)


def _model_extra(model_meta: dict[str, Any]) -> dict[str, str]:
    return {MODEL_FILE: json.dumps(model_meta, sort_keys=True)} if model_meta else {}


def _program_bytes(gm: fx.GraphModule, example: tuple) -> bytes:
    buf = io.BytesIO()
    torch.export.save(to_exported(gm, example), buf)
    return buf.getvalue()


def _sites_record(sites_meta: dict[str, dict[str, Any]]) -> str:
    """Variant and parameters of every site, stored beside the graph (the graph alone
    holds them only as constants)."""
    return json.dumps(sites_meta)


def traceable_sizes(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` in which dynamic sizes survive ``torch.jit.trace``.

    Graphs from ``torch.export`` (and TorchScript via TS2EP) read sizes with
    ``aten.sym_size.int`` and pass them to ``aten.<op>.<overload>`` calls. Under
    ``torch.jit.trace`` both turn into constants, baking the example's batch size into the
    TorchScript (an LSTM's zero state for batch 2 only: wrong results or a crash on other
    batches). ``Tensor.size(d)`` and the public ``torch.<op>`` / ``Tensor.<op>`` calls are
    traced as live values, so sizes and the ops that consume them are switched to those.
    """
    sizes = {
        torch.ops.aten.sym_size.int: "size", torch.ops.aten.sym_size.default: "size",
        torch.ops.aten.sym_numel.default: "numel",
    }
    if not any(n.op == "call_function" and n.target in sizes for n in gm.graph.nodes):
        return gm
    g = copy.deepcopy(gm.graph)
    derived: set[fx.Node] = set()
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target in sizes:
            with g.inserting_before(n):
                new = g.call_method(sizes[n.target], n.args, n.kwargs)
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            g.erase_node(n)
            derived.add(new)
        elif any(a in derived for a in n.all_input_nodes):
            if isinstance(n.target, torch._ops.OpOverload):
                name = aten_name(n.target)
                fn = getattr(torch, name, None)
                if name == "slice":  # no public torch.slice / Tensor.slice: indexing traces live bounds
                    n.target = _slice
                elif callable(fn):
                    n.target = fn
                elif n.args and isinstance(n.args[0], fx.Node):
                    n.op, n.target = "call_method", name
            else:  # int arithmetic on sizes (operator.mul ...) stays live under tracing
                derived.add(n)
    return fx.GraphModule(gm, g)


def _slice(x: torch.Tensor, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> torch.Tensor:
    """``aten.slice`` as indexing, which ``torch.jit.trace`` records with live (size-derived) bounds."""
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def has_loop(ts: torch.jit.ScriptModule) -> bool:
    def walk(block) -> bool:
        return any(n.kind() == "prim::Loop" or any(walk(b) for b in n.blocks()) for n in block.nodes())

    return walk(ts.inlined_graph)


def example_record(example: tuple) -> str:
    import json

    return json.dumps([{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in example])
