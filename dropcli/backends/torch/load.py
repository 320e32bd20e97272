"""The five torch formats, each loaded as one ``torch.fx.GraphModule``.

* TorchScript  -> its inlined graph translated op by op (:mod:`dropcli.backends.torch.tsgraph`)
  and checked against the module on the example input; where that translation does not cover
  the graph, ``TS2EPConverter`` -> ExportedProgram -> ``.module()`` (or, for a TorchScript
  dropcli wrote around a loop, the torch.export program it stored beside the graph)
* ``.pt2``      -> ``torch.export.load(...).module()``
* pickled module / state_dict + ``--arch`` -> ``torch.fx.symbolic_trace`` (dropcli sites kept
  as modules)

Besides the graph, :func:`load_graph` gives an example input (from ``--input-shape``, the file,
or the first layer) and the site and model records dropcli stored beside the graph.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from dropcli.backends.torch.userimport import import_user, load_arch
from dropcli.errors import DropcliError, UsageError
from dropcli.model import formats
from dropcli.model.kinds import LINEAR
from dropcli.model.naming import EXAMPLE_FILE, MODEL_ATTR, MODEL_FILE, PROGRAM_FILE, SITES_FILE
from dropcli.model.quiet import quiet, short_error
from dropcli.variants.base import LayerSite, SiteModule

LOG = logging.getLogger("dropcli")
GUARD_TARGETS = {"_guards_fn"}  # torch.export's input-constraint checks (a call_module node)


@dataclass
class Loaded:
    """What a torch file holds: the graph, an example input (None: unknown) and the records of
    its sites and of the whole model that dropcli stored beside it."""

    gm: fx.GraphModule
    example: tuple | None
    site_meta: dict[str, Any] = field(default_factory=dict)
    model_meta: dict[str, Any] = field(default_factory=dict)


_DTYPES = {"float": torch.float32, "float32": torch.float32, "float64": torch.float64, "double": torch.float64,
           "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "int": torch.int64,
           "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "bool": torch.bool}


def parse_input_shape(text: str | None) -> list[tuple[int, ...]] | None:
    """``"1x64"`` or ``"1,3,32,32"``; several inputs separated by ``;`` (dtypes: see :func:`parse_inputs`)."""
    got = parse_inputs(text)
    return [shape for shape, _ in got] if got else None


def parse_inputs(text: str | None) -> list[tuple[tuple[int, ...], torch.dtype]] | None:
    """``--input-shape``: shapes, each with an optional dtype after a colon (``"1x8:int64;1x8:int64"``
    for token ids and a mask; float32 when none is given)."""
    if not text:
        return None
    out = []
    for part in text.split(";"):
        part, _, dt = part.partition(":")
        dtype = torch.float32
        if dt.strip():
            if dt.strip().lower() not in _DTYPES:
                raise UsageError(f"--input-shape {text!r}: unknown dtype {dt.strip()!r}",
                                 f"choose one of {', '.join(sorted(_DTYPES))}, e.g. 1x8:int64 for token ids")
            dtype = _DTYPES[dt.strip().lower()]
        out.append((_parse_dims(part, text), dtype))
    return out


def _parse_dims(part: str, text: str) -> tuple[int, ...]:
    dims = [d for d in re.split(r"[x,\s]+", part.strip()) if d]
    try:
        shape = tuple(int(d) for d in dims)
    except ValueError:
        raise UsageError(f"--input-shape {text!r} is not a list of integers", "write it like 1x3x32x32") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} has an empty or non-positive dimension", "write it like 1x3x32x32")
    return shape


def load_graph(
    path: str | Path, fmt: str, *, trust_pickle: bool = False, imports: Sequence[str] = (),
    arch: str | None = None, input_shape: str | None = None, example_data: str | None = None,
) -> Loaded:
    """Load a torch format (:data:`dropcli.model.formats.TORCH_FORMATS`) as a GraphModule.

    The example input of a model that records none comes from ``input_shape``, else from the
    first rows of ``example_data`` (the verb's data file), else from what the file stored, else
    from the first layer (token ids for an ``Embedding``)."""
    path = Path(path)
    specs = parse_inputs(input_shape)
    # a batch of 1 would be specialised by torch.export (0/1 specialisation) and baked in by a
    # trace: capture at batch 2 at least, so outputs run at every batch size
    example = tuple(torch.zeros((max(s[0], 2),) + tuple(s[1:]), dtype=d) for s, d in specs) if specs else None
    for spec in imports:
        import_user(spec)
    model_meta: dict[str, Any] = {}
    if fmt == formats.EXPORT:
        extra = {SITES_FILE: "", MODEL_FILE: ""}
        ep = load_program(path, extra)
        if example is None:
            example = program_example(ep)
        gm = ep.module()
        return Loaded(strip_guards(gm), example, json_or_empty(extra[SITES_FILE]), json_or_empty(extra[MODEL_FILE]))
    if fmt == formats.TORCHSCRIPT:
        extra = {EXAMPLE_FILE: "", SITES_FILE: "", PROGRAM_FILE: "", MODEL_FILE: ""}
        try:
            ts = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"cannot load TorchScript archive {path}: {short_error(e)}", "re-save it with torch.jit.save") from e
        ts.eval()
        if extra[PROGRAM_FILE]:
            gm, example = stored_program(ts, extra[PROGRAM_FILE], example, path)
            return Loaded(strip_guards(gm), example, json_or_empty(extra[SITES_FILE]), json_or_empty(extra[MODEL_FILE]))
        names = script_inputs(ts)
        fallback = None
        if example is None:
            example = stored_example(extra[EXAMPLE_FILE])
        if example is None:
            fallback = traced_inputs(ts) or example_from_modules(ts, len(names) or 1)
            example = data_example(example_data, names) or fallback
        reader = ScriptReader(ts, names, path)
        if example is not None and fallback is not None and example is not fallback:
            # data that does not fit the model (a wrong width, say) is reported by the verb's
            # input check, with the shape the model expects: convert at the model's own guess
            try:
                gm = reader.graph(example)
            except DropcliError:
                example = fallback
            else:
                return Loaded(strip_guards(gm), example, json_or_empty(extra[SITES_FILE]), json_or_empty(extra[MODEL_FILE]))
        if example is None:
            raise UsageError(
                f"cannot tell the input shape of TorchScript model {path}",
                "pass the verb's data (--input/--data), or --input-shape, for example --input-shape 1x3x32x32 "
                "(1x8:int64 for token ids)",
            )
        return Loaded(strip_guards(reader.graph(example)), example, json_or_empty(extra[SITES_FILE]), json_or_empty(extra[MODEL_FILE]))
    if fmt == formats.HUB:
        from dropcli.backends.torch import hub

        model = hub.load_checkpoint(path, trust_pickle)
        arrays = _data_arrays(example_data)
        names = hub.input_names(model, list(arrays or ()))
        if example is not None and len(example) != len(names):
            raise UsageError(f"--input-shape gives {len(example)} input(s); {type(model).__name__} is fed {', '.join(names)}",
                             "give one shape per input, separated by ';'")
        if example is None:
            example = data_example(example_data, names, arrays) or hub.default_example(model, names)
        if example is None:
            raise hub.need_example(path, names)
        try:
            gm = hub.capture(model, names, example)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"cannot capture {type(model).__name__} with torch.export: {short_error(e)}",
                               "check the example input (--input-shape, or the data)") from e
        return Loaded(strip_guards(gm), example)
    if fmt == formats.PICKLE:
        if not trust_pickle:
            raise DropcliError(
                f"{path} is a pickled nn.Module; unpickling runs arbitrary code from the file",
                "load it only if you trust its source, with --trust-pickle (plus --import for the model's classes), "
                "or re-save it as TorchScript, torch.export (.pt2) or ONNX",
            )
        model = unpickle_module(path)
        model_meta = json_or_empty(getattr(model, MODEL_ATTR, "") or "")  # dropcli's own pickles (finetune's tau, temperature)
    elif fmt == formats.SAFETENSORS:
        if not arch:
            raise UsageError(f"{path} holds a state_dict in safetensors (weights only) without the architecture",
                             "pass --arch package.module:factory (or file.py:factory) that builds the model")
        from dropcli.backends.torch import hub

        model = load_arch(arch)
        hub.load_safetensors(path, model, arch)
    elif fmt == formats.STATE_DICT:
        if not arch:
            raise UsageError(
                f"{path} holds a state_dict (weights only) without the architecture",
                "pass --arch package.module:factory (or file.py:factory) that builds the model",
            )
        model = load_arch(arch)
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"cannot read state_dict {path}: {short_error(e)}", "re-save it with torch.save(model.state_dict())") from e
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        try:
            model.load_state_dict(sd)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"state_dict {path} does not fit --arch {arch}: {short_error(e)}", "check that --arch builds the same model") from e
    else:  # pragma: no cover
        raise DropcliError(f"unsupported torch format {fmt}")
    model.eval()
    names = forward_inputs(model)
    if example is None:
        example = data_example(example_data, names) or example_from_modules(model, len(names) or 1)
    try:
        tracer = SiteAwareTracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        if not opaque_containers(gm):
            return Loaded(gm, example, model_meta=model_meta)
        first: Exception | None = None
    except Exception as e:  # noqa: BLE001
        first = e
    # transformers models and nn.TransformerEncoder defeat symbolic tracing (or stay one opaque
    # layer under it): capture the forward with torch.export at the example input instead
    if example is None:
        raise UsageError(
            f"cannot trace {path}'s forward symbolically ({short_error(first) if first else 'it holds opaque containers'}), "
            "and capturing it needs an example input",
            "pass the verb's data (--input/--data), or --input-shape (e.g. 1x3x32x32, or 1x8:int64 for token ids)")
    try:
        gm = exported_module(model, example)
    except Exception as e:  # noqa: BLE001
        why = f"{short_error(first)}; torch.export: {short_error(e)}" if first else short_error(e)
        raise DropcliError(
            f"cannot trace the model's forward ({why})",
            "check the example input (--input-shape, or the data), or export the model with torch.export (.pt2) and pass that",
        ) from e
    return Loaded(strip_guards(gm), example, model_meta=model_meta)


def exported_module(model: nn.Module, example: tuple) -> fx.GraphModule:
    """``model`` captured with ``torch.export`` (non-strict, batch dimension dynamic), as a GraphModule."""
    dyn = tuple({0: torch.export.Dim.AUTO} if t.dim() > 0 else None for t in example)
    import io

    # a failed capture prints the partial graph to stderr itself: dropcli reports it in one line
    with torch.no_grad(), quiet(), contextlib.redirect_stderr(io.StringIO()):
        ep = torch.export.export(model, example, dynamic_shapes=dyn, strict=False)
    return ep.module()


def opaque_containers(gm: fx.GraphModule) -> list[str]:
    """Leaf calls of stock torch modules that hold layers dropcli would rewrite inside them
    (``nn.TransformerEncoder``, ``nn.MultiheadAttention``...): symbolic tracing keeps them whole."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        if isinstance(m, SiteModule) or getattr(type(m), "dropcli_leaf", False):
            continue
        if any(isinstance(c, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) for c in m.modules() if c is not m):
            out.append(str(n.target))
    return out


def forward_inputs(model: nn.Module) -> list[str]:
    """The names of a module's required forward arguments."""
    import inspect

    with contextlib.suppress(Exception):
        sig = inspect.signature(model.forward)
        return [p.name for p in sig.parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return []


def script_inputs(ts: torch.jit.ScriptModule) -> list[str]:
    """The names of a TorchScript module's forward inputs (``self`` left out)."""
    with contextlib.suppress(Exception):
        return [a.name for a in ts.forward.schema.arguments[1:]]
    return []


def _data_arrays(path: str | None) -> dict | None:
    """The arrays of the verb's data file; None when there is none, or it is unreadable (the verb
    reports a bad data file itself)."""
    if not path:
        return None
    from dropcli.io.data import read_arrays

    if path != "-" and path.lower().endswith(".npy"):
        # the example needs two rows: a .npy file is mapped, not read (the verb reads it all later)
        import numpy as np

        with contextlib.suppress(Exception):
            return {"x": np.load(path, mmap_mode="r", allow_pickle=False)}
    try:
        return read_arrays(path)
    except DropcliError:
        return None


def data_example(path: str | None, names: Sequence[str], arrays: dict | None = None) -> tuple | None:
    """An example input from the first two rows of the verb's data file (``arrays``: that file
    already read): the model's inputs by name when the file names them, else its arrays in order
    (labels left out), with their dtypes (integers as int64: token ids)."""
    import numpy as np

    from dropcli.io.data import label_key

    arrays = arrays if arrays is not None else _data_arrays(path)
    if arrays is None:
        return None
    if names and all(n in arrays for n in names):
        chosen = [arrays[n] for n in names]
    else:
        lk = label_key(list(arrays))
        chosen = [v for k, v in arrays.items() if k != lk]
        if names and len(chosen) != len(names):
            return None
    out = []
    for a in chosen:
        a = np.asarray(a[:2])
        if a.ndim == 0 or not len(a):
            return None
        t = torch.from_numpy(np.ascontiguousarray(a))
        out.append(t.long() if a.dtype.kind in "iub" and a.dtype != np.bool_ else t.float() if a.dtype.kind == "f" else t)
    return tuple(out) or None


def example_from_modules(model: nn.Module, n_inputs: int = 1) -> tuple[torch.Tensor, ...] | None:
    """Guess an example input from the first weighted layer (works for MLPs); a model whose first
    layer is an ``Embedding`` takes token ids (every input int64: ids, mask, type ids)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding) or getattr(m, "original_name", "") == "Embedding":
            return tuple(torch.ones(2, 8, dtype=torch.long) for _ in range(n_inputs))
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM, nn.GRU, LayerSite)):
            break
        if getattr(m, "original_name", "") in ("Linear", "Conv1d", "Conv2d", "Conv3d", "LSTM", "GRU"):
            break
    if n_inputs > 1:
        return None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (torch.zeros(2, m.in_features),)
        if isinstance(m, LayerSite):  # a dropcli site that replaced the layer (dropconnect, standout, ...)
            return (torch.zeros(2, m.weight.shape[1]),) if m.layer_cls == LINEAR else None
        if isinstance(m, nn.Embedding):
            return (torch.zeros(2, 8, dtype=torch.long),)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM, nn.GRU)):
            return None
        orig = getattr(m, "original_name", "")
        if orig == "Linear" and hasattr(m, "weight"):
            return (torch.zeros(2, m.weight.shape[1]),)
        if orig in ("Conv1d", "Conv2d", "Conv3d", "LSTM", "GRU"):
            return None
    return None


class SiteAwareTracer(fx.Tracer):
    """``symbolic_trace`` that keeps dropcli sites as modules.

    Traced through, a site would be specialised on its ``dropcli_mc`` buffer's current value
    (buffers are concrete during fx tracing): a re-loaded dropcli pickle would lose its MC
    switch and its sites. dropcli's sparse-VD layers (``dropcli_leaf = True``) stay modules too,
    so ``dropcli prune`` finds their learned variances.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (isinstance(m, SiteModule) or getattr(type(m), "dropcli_leaf", False)
                or super().is_leaf_module(m, module_qualified_name))


def strip_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's input-constraint checks: they break tracing, and dropcli checks inputs itself."""
    gm._forward_pre_hooks.clear()
    # ... and export's paired exit hook (a lambda: it would also make the module unpicklable)
    gm._forward_hooks.clear()
    gm._forward_hooks_always_called.clear()
    g = gm.graph
    for n in list(g.nodes):
        if n.op == "call_module" and n.target in GUARD_TARGETS:
            g.erase_node(n)
    with contextlib.suppress(Exception):
        gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def stored_program(ts: torch.jit.ScriptModule, data: bytes, example: tuple | None, path: Path) -> tuple[fx.GraphModule, tuple]:
    """The torch.export program dropcli stored in a TorchScript archive it wrote, checked against
    the archive's own graph (inference mode, on the stored example) so that a TorchScript edited
    since then is refused rather than silently replaced by the old program."""
    import io

    try:
        with quiet():
            ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"cannot read the program stored in TorchScript archive {path}: {short_error(e)}",
                           "re-create the file with dropcli, or pass the .pt2 / ONNX output instead") from e
    if example is None:
        ex = getattr(ep, "example_inputs", None)
        example = tuple(ex[0]) if ex else None
    gm = ep.module()
    if example is not None:
        g = torch.Generator().manual_seed(0)
        probe = tuple(torch.randn(t.shape, generator=g).to(t.dtype) if t.is_floating_point() else t for t in example)
        with torch.no_grad(), quiet():
            a, b = ts(*probe), gm(*probe)
        same = all(torch.allclose(x, y, rtol=1e-4, atol=1e-5)
                   for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)))
        if not same:
            raise DropcliError(f"TorchScript archive {path} no longer matches the program dropcli stored in it "
                               "(its weights or graph were changed after dropcli wrote it)",
                               "export the changed model again with torch.export (.pt2) or ONNX and pass that")
    return gm, example


def load_program(path: Path, extra: dict[str, Any]):
    """``torch.export.load``, with the pytree types the program's signature names registered first.

    A program whose output is a transformers ``ModelOutput`` (``return_dict=True``, the default)
    names that class in its tree specs; torch can read it only once the class is registered in
    its pytree, which transformers does when the class's module is imported. torch logs the
    real cause and raises a generic error, so the names are read from the archive itself."""
    try:
        with quiet(), open(path, "rb") as fh:
            return torch.export.load(fh, extra_files=extra)
    except Exception as e:  # noqa: BLE001
        first = e
    missing = unregistered_types(path)
    if missing:
        register_types(missing, path)
        try:
            with quiet(), open(path, "rb") as fh:
                return torch.export.load(fh, extra_files=extra)
        except Exception as e:  # noqa: BLE001
            first = e
    raise DropcliError(f"cannot load torch.export program {path}: {short_error(first)}",
                       "re-save it with torch.export.save") from first


_TYPE_RE = re.compile(rb'\\"type\\": \\"([A-Za-z_][\w.]*)\\"')


def unregistered_types(path: Path) -> list[str]:
    """The pytree type names in a .pt2 archive's tree specs that torch does not know (yet)."""
    import zipfile

    from torch.utils import _pytree

    names: set[str] = set()
    with contextlib.suppress(Exception), zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if info.filename.endswith("models/model.json") or info.filename.endswith(".json") and "/models/" in info.filename:
                names |= {m.decode() for m in _TYPE_RE.findall(z.read(info))}
    return sorted(n for n in names if n not in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE)


def register_types(names: list[str], path: Path) -> None:
    """Import the modules of transformers' output classes (importing one registers its classes in
    torch's pytree); any other unknown type is the user's to register (``--import``)."""
    import importlib

    from torch.utils import _pytree

    for name in names:
        module = name.rpartition(".")[0]
        if name.startswith("transformers."):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise DropcliError(
                    f"torch.export program {path} returns {name}, which torch can only read with transformers installed "
                    f"({short_error(e)})",
                    "install transformers (pip install transformers), or re-export the model with return_dict=False") from e
        if name not in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise DropcliError(
                f"torch.export program {path} uses type {name}, which is not registered in torch's pytree",
                f"pass --import {module or 'MODULE'} (a module or .py file that defines it and registers it with "
                "torch.utils._pytree.register_pytree_node)")


def program_example(ep: Any) -> tuple | None:
    """The example inputs stored in an exported program, positional then keyword (in the order
    of the program's signature); None when it stored none."""
    ex = getattr(ep, "example_inputs", None)
    if not ex:
        return None
    args, kwargs = ex
    example = tuple(args) + tuple(kwargs[k] for k in keyword_inputs(ep.module_call_graph[0].signature.in_spec) if k in kwargs)
    return example or None


def keyword_inputs(in_spec: Any) -> list[str]:
    """The keyword inputs of an exported call signature ``((args...), {kwargs...})`` in order."""
    with contextlib.suppress(Exception):
        kw = in_spec.child(1)
        if kw.type is dict:
            return list(kw.context)
    return []


def json_or_empty(text: str | bytes) -> dict:
    import json

    with contextlib.suppress(Exception):
        obj = json.loads(text) if text else {}
        return obj if isinstance(obj, dict) else {}
    return {}


def stored_example(text: str | bytes) -> tuple | None:
    """The example inputs that dropcli stored in a TorchScript archive it wrote (zeros of that shape)."""
    import json

    if not text:
        return None
    with contextlib.suppress(Exception):
        return tuple(torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"])) for e in json.loads(text))
    return None


def traced_inputs(ts: torch.jit.ScriptModule) -> tuple | None:
    with contextlib.suppress(Exception):
        d = ts._c._retrieve_traced_inputs()
        vals = d.get("forward")
        if vals:
            return tuple(vals)
    return None


class ScriptReader:
    """A TorchScript module as a GraphModule: read directly (:mod:`dropcli.backends.torch.tsgraph`),
    checked against the module itself on the example input, else through torch's converter
    (:func:`ts_to_fx`). ``--debug`` logs which route ran and why."""

    def __init__(self, ts: torch.jit.ScriptModule, names: Sequence[str], path: Path):
        self.ts, self.names, self.path = ts, list(names), path
        self.direct: fx.GraphModule | None = None
        self.why_not = ""

    def graph(self, example: tuple) -> fx.GraphModule:
        """The graph, checked at ``example``; a DropcliError when the module itself fails there."""
        from dropcli.backends.torch.tsgraph import Unsupported, translate

        if self.direct is None and not self.why_not:
            try:
                self.direct = translate(self.ts, self.names)
            except Unsupported as e:
                self.why_not = str(e)
            except Exception as e:  # noqa: BLE001 - an unforeseen graph: the converter may still read it
                self.why_not = f"{type(e).__name__}: {short_error(e)}"
        if self.direct is not None:
            why = same_outputs(self.ts, self.direct, example, self.path)
            if not why:
                LOG.debug("TorchScript %s: read directly into an aten graph (%d nodes)", self.path, len(self.direct.graph.nodes))
                return self.direct
            LOG.debug("TorchScript %s: the direct reading %s", self.path, why)
        else:
            LOG.debug("TorchScript %s: cannot read it directly (%s)", self.path, self.why_not)
        LOG.debug("TorchScript %s: converting with torch._export.converter (slower)", self.path)
        return ts_to_fx(self.ts, example, self.path)


def same_outputs(ts: torch.jit.ScriptModule, gm: fx.GraphModule, example: tuple, path: Path) -> str:
    """Run ``ts`` and ``gm`` on ``example`` (and on one row more, when ``ts`` runs there):
    '' when they agree, else why not. A DropcliError when ``ts`` itself fails on ``example``."""
    n = example[0].shape[0] if example and example[0].dim() else 0
    probes = [example]
    if n:
        probes.append(tuple(torch.cat([t, t[:1]]) if t.dim() and t.shape[0] == n else t for t in example))
    for i, probe in enumerate(probes):
        # the executor's optimisation passes cost more than the two small runs (0.13 s on a tiny MLP)
        with torch.no_grad(), quiet(), torch.jit.optimized_execution(False):
            try:
                want = ts(*probe)
            except Exception as e:  # noqa: BLE001
                if i:
                    return ""  # the module itself runs only at the traced batch: nothing to compare
                raise DropcliError(f"TorchScript model {path} fails on the example input: {short_error(e)}",
                                   "check --input-shape, or the data's shape") from e
            try:
                got = gm(*probe) if i else _MarkValues(gm).run(*probe)
            except Exception as e:  # noqa: BLE001
                return f"fails at {len(probe[0]) if n else '?'} rows ({short_error(e)})"
        a, b = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
        if len(a) != len(b):
            return f"gives {len(b)} outputs, the module {len(a)}"
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
                return "gives an output of another type"
            if isinstance(x, torch.Tensor) and (x.shape != y.shape or x.dtype != y.dtype or not torch.allclose(
                    x, y, rtol=1e-5, atol=1e-6, equal_nan=True)):
                return f"differs from the module (at {len(probe[0]) if n else '?'} rows)"
    return ""


class _MarkValues(fx.Interpreter):
    """Runs the graph and records, on each node whose value is not a tensor, that value's kind
    (``meta['val']``: a size as its int, a tuple of outputs as meta tensors), as torch.export
    records them: dropcli puts no site on an LSTM's (output, state) tuple or on a size."""

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if not isinstance(out, torch.Tensor) and n.op not in ("placeholder", "output", "get_attr"):
            n.meta["val"] = torch.utils._pytree.tree_map(
                lambda v: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v, out)
        return out


def ts_to_fx(ts: torch.jit.ScriptModule, example: tuple, path: Path) -> fx.GraphModule:
    try:
        from torch._export.converter import TS2EPConverter

        with quiet():
            ep = TS2EPConverter(ts, example).convert()
    except Exception as e:  # noqa: BLE001
        raise DropcliError(
            f"cannot convert TorchScript model {path} into a graph dropcli can rewrite: {short_error(e)}",
            "check --input-shape, or export the model with torch.export (.pt2) or ONNX instead",
        ) from e
    gm = ep.module()
    fix_feature_widths(gm, example)
    return gm


def fix_feature_widths(gm: fx.GraphModule, example: tuple) -> None:
    """TorchScript conversion marks every input dimension dynamic. A float ``[N, D]`` input
    (features) has its width fixed by the trace, so record it: data of another width is then
    refused with the shape the model expects, not a matrix-multiply error from inside the graph."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, t in zip(phs, example):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and t.is_floating_point() and t.dim() == 2 and val.dim() == 2:
            mode = getattr(val, "fake_mode", None)
            try:  # keep the batch symbolic (inspect shows it as N); only the width is fixed
                with mode if mode is not None else contextlib.nullcontext():
                    n.meta["val"] = val.new_empty((val.shape[0], t.shape[1]))
            except Exception:  # noqa: BLE001
                n.meta["val"] = torch.empty((2, t.shape[1]), dtype=t.dtype, device="meta")


def unpickle_module(path: Path) -> nn.Module:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)  # user passed --trust-pickle
    except (AttributeError, ModuleNotFoundError) as e:
        msg = str(e)
        m = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", msg)
        if m:
            raise DropcliError(
                f"the pickle references class {m.group(2)}.{m.group(1)}, which cannot be found",
                "pass --import MODULE_OR_FILE that defines it",
            ) from e
        m = re.search(r"No module named '([^']+)'", msg)
        if m:
            raise DropcliError(
                f"the pickle references module {m.group(1)}, which cannot be imported",
                "pass --import MODULE_OR_FILE, or add it to PYTHONPATH",
            ) from e
        raise DropcliError(f"cannot unpickle {path}: {short_error(e)}") from e
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"cannot unpickle {path}: {short_error(e)}", "check that the file is complete") from e
    if not isinstance(obj, nn.Module):
        raise DropcliError(f"{path} holds a pickled {type(obj).__name__}, not an nn.Module")
    return obj
