"""The one bridge between the backends: a torch model written as ONNX.

``backends/torch/*`` and ``backends/onnx/*`` never import each other; the torch backend's
``save(..., "onnx")`` comes here, and this module uses both: ``torch.onnx.export`` on the
captured program, then the ONNX backend's conventions for the result (one ``dropcli_mc``
input, sites labelled ``dropcli_site_N/...``, dropcli's metadata, an atomic write).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dropcli.backends.onnx.model import save_onnx, set_model_record
from dropcli.errors import DropcliError
from dropcli.model import naming
from dropcli.model.naming import MC_INPUT
from dropcli.model.quiet import quiet, short_error


def promote_mc_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Merge the per-site ``*.dropcli_mc`` buffers of an exported torch model into one input."""
    g = model.graph
    mc_inits = [t for t in g.initializer if naming.reads_mc(t.name) and t.name != MC_INPUT]
    if not mc_inits:
        return model
    names = {t.name for t in mc_inits}
    keep = [t for t in g.initializer if t.name not in names]
    del g.initializer[:]
    g.initializer.extend(keep)
    keep_in = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep_in)
    for n in g.node:
        for k, x in enumerate(n.input):
            if x in names:
                n.input[k] = MC_INPUT
    g.input.append(helper.make_tensor_value_info(MC_INPUT, TensorProto.BOOL, []))
    g.initializer.append(numpy_helper.from_array(np.array(False), MC_INPUT))
    return model


def label_exported_sites(model: onnx.ModelProto, sites: dict[str, dict[str, Any]]) -> int:
    """Name the nodes the torch exporter made for each dropcli site ``dropcli_site_N/...`` (from
    the exporter's name scopes) and mark the site's final ``Where`` on ``dropcli_mc`` as
    ``dropcli_site_N/select`` with its variant and p, as :meth:`OnnxModel.insert` does, so that
    `dropcli inspect` and re-loading see the sites and their rates. Returns how many were labelled."""
    import ast

    done = set()
    for n in model.graph.node:
        scopes = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if not scopes:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            parts = ast.literal_eval(scopes)
            site = next((x for x in parts if isinstance(x, str) and x in sites), None)
            if site is None:
                continue
            if n.op_type == "Where" and n.input and n.input[0] == MC_INPUT:
                n.name = naming.select_name(site)
                meta = sites[site]
                n.doc_string = naming.select_doc(meta.get("variant"), meta.get("p"))
                done.add(site)
            else:
                n.name = naming.scoped(site, n.name)
    return len(done)


def export_torch_program(ep: Any, example: tuple, path: str | Path, sites: dict[str, dict[str, Any]] | None = None,
                         model_meta: dict[str, Any] | None = None) -> None:
    """torch.export program -> ONNX with one ``dropcli_mc`` input (default False); ``sites``
    (name -> variant, p) labels the sites' nodes (:func:`label_exported_sites`)."""
    import torch

    try:
        with quiet():
            prog = torch.onnx.export(ep, example, dynamo=True, optimize=True, verbose=False)
        model = prog.model_proto
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"cannot convert the model to ONNX: {short_error(e)}", "try --format torchscript or export") from e
    # The onnxscript optimizer may fold the mc buffer into constants; keep it an input.
    promote_mc_inputs(model)
    if sites:
        label_exported_sites(model, sites)
    if model_meta:
        set_model_record(model, model_meta)
    onnx.checker.check_model(model)
    save_onnx(model, path)
