"""Models that already carry sparse-VD sites (``dropcli inject --variant sparse-vd``, then the
user's own training) are pruned by their own scores, without ``--data``.

:func:`modules_with_sparse_vd` turns a loaded model into the GraphModule of real modules that
``dropcli prune`` works on (:func:`dropcli.importer.to_modules`), with every sparse-VD site
back as a :class:`~dropcli.prune.layers.LinearSVD` / :class:`~dropcli.prune.layers.ConvSVD`
holding the site's trained ``theta`` and ``log sigma^2``. The pruning flow then finds those
layers and prunes by their log alpha (``prune.core.prune``, "existing" branch).

- torch (every format): the site becomes the stock layer again (the backend's own
  restore, from the module or from the sites record saved beside a TorchScript/.pt2 graph),
  then that layer becomes a sparse-VD layer with the site's ``log_sigma2``.
- ONNX: the site's nodes become the layer's original nodes again (kept in the model's
  metadata); after the import to torch, each imported Linear/Conv whose weight is a site's
  ``theta`` (as stored, or transposed for ``MatMul`` / ``Gemm transB=0``) gets that site's
  ``log sigma^2``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import numpy_helper
from torch import fx, nn

from dropcli.errors import DropcliError
from dropcli.model import naming
from dropcli.backends.torch.fx import fetch_attr, set_module
from dropcli.backends.torch.importer import to_modules
from dropcli.prune.layers import to_sparse_vd

VARIANT = "sparse-vd"


def _has_attr(gm: nn.Module, target: str) -> bool:
    try:
        fetch_attr(gm, target)
        return True
    except AttributeError:
        return False


def _torch_sites(model: Any, threshold: float) -> int:
    from dropcli.variants.base import SiteModule

    done = 0
    while True:
        gm = model.gm
        inlined = model.inlined_sites()
        rows = []
        for l in model.layers():
            if l.kind != "dropout" or l.dropout_variant not in (VARIANT, "dropcli"):
                continue
            site = inlined[l.ref][0] if l.ref in inlined else None
            # a record-less site (the user re-saved the model without dropcli's sites record) is
            # recognised by its tensors: theta beside log sigma^2
            if l.dropout_variant == VARIANT or (site and _has_attr(gm, f"{site}.log_sigma2") and _has_attr(gm, f"{site}.weight")):
                rows.append((l, site))
        if not rows:
            return done
        layer, site = rows[0]
        node: fx.Node = layer.ref
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), SiteModule):
            ls2 = gm.get_submodule(node.target).log_sigma2.detach().clone()
        else:
            try:
                ls2 = fetch_attr(gm, f"{site}.log_sigma2").detach().clone()
            except AttributeError as e:
                raise DropcliError(f"sparse-vd site {site} has no log_sigma2 tensor", "inject again from the original model") from e
        if layer.dropout_variant == VARIANT:
            restored = model._restore_layer_site(layer)
            if restored is None:
                raise DropcliError(f"cannot turn sparse-vd site {layer.name} back into its layer",
                                   "inject again from the original model")
            mod_name = restored[2]
            set_module(gm, mod_name, _sparse_vd(gm.get_submodule(mod_name), ls2, threshold, layer.name))
        else:
            _restore_recordless(model, node, inlined[node], ls2, threshold)
        model._recompile()
        done += 1


def _restore_recordless(model: Any, where: fx.Node, inlined: tuple, ls2: torch.Tensor, threshold: float) -> None:
    """Replace an inlined sparse-VD site that lost its record: its layer is read from the call
    inside it that applies ``<site>.weight`` itself to the site's input (the MC mean)."""
    from dropcli.backends.torch.layers import stock_module

    site, x, internal = inlined
    gm, g = model.gm, model.gm.graph
    layer = None
    for n in internal:
        if n.op == "call_function" and n.args and n.args[0] is x and len(n.args) > 1 \
                and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr" and n.args[1].target == f"{site}.weight":
            layer = model.layer_info(n)
            if layer is not None:
                break
    if layer is None:
        raise DropcliError(f"cannot read the layer inside sparse-vd site {site}", "inject again from the original model")
    name = f"{site}_layer"
    gm.add_submodule(name, _sparse_vd(stock_module(layer), ls2, threshold, site))
    with g.inserting_before(where):
        new = g.call_module(name, (x,))
    for key in ("val", "tensor_meta"):
        if key in where.meta:
            new.meta[key] = where.meta[key]
    where.replace_all_uses_with(new)
    g.erase_node(where)
    for m in reversed(list(g.nodes)):
        if m in internal and not m.users:
            g.erase_node(m)
    for m in list(g.nodes):
        if m.op == "get_attr" and str(m.target).startswith(site + ".") and not m.users:
            g.erase_node(m)


def _sparse_vd(stock: nn.Module, ls2: torch.Tensor, threshold: float, name: str) -> nn.Module:
    try:
        svd = to_sparse_vd(stock, threshold)
    except (TypeError, ValueError) as e:
        raise DropcliError(f"sparse-vd site {name}: its layer ({type(stock).__name__}) can't be pruned ({e})") from e
    if tuple(ls2.shape) != tuple(svd.weight.shape):
        raise DropcliError(f"sparse-vd site {name}: log_sigma2 has shape {tuple(ls2.shape)}, the weight "
                           f"{tuple(svd.weight.shape)}", "inject again from the original model")
    with torch.no_grad():
        svd.log_sigma2.copy_(ls2.to(svd.log_sigma2.dtype))
    return svd


def _onnx_sites(model: Any) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Restore every sparse-VD site of an ONNX model; return (site, theta, log sigma^2) each."""
    g = model.model.graph
    inits = {t.name: t for t in g.initializer}
    found = []
    for node in list(g.node):
        if not (node.op_type == "Where" and naming.is_select(node.name) and naming.doc_variant(node.doc_string) == VARIANT):
            continue
        site = naming.node_site(node.name)
        prefix = naming.site_scope(site)
        names = {x for n in g.node if n.name.startswith(prefix) for x in n.input}
        ls2_names = [x for x in names if x.startswith(prefix + "log_sigma2")]
        if len(ls2_names) != 1:
            raise DropcliError(f"sparse-vd site {site} has no log_sigma2 initializer", "inject again from the original model")
        ls2 = numpy_helper.to_array(inits[ls2_names[0]])
        thetas = [x for x in names if x in inits and not x.startswith(prefix) and tuple(inits[x].dims) == ls2.shape]
        if len(thetas) != 1:
            raise DropcliError(f"cannot find the weight of sparse-vd site {site}", "inject again from the original model")
        found.append((site, numpy_helper.to_array(inits[thetas[0]]), ls2))
    for site, _, _ in found:
        sel = next(n for n in g.node if n.name == naming.select_name(site))
        if model._restore_layer_site(sel) is None:
            raise DropcliError(f"cannot turn sparse-vd site {site} back into its layer", "inject again from the original model")
    return found


def modules_with_sparse_vd(model: Any, threshold: float) -> tuple[fx.GraphModule, int]:
    """The model as real modules (see :func:`dropcli.importer.to_modules`), its sparse-VD sites
    as sparse-VD layers; returns (gm, number of sites)."""
    if getattr(model, "backend", None) != "onnx":
        n = _torch_sites(model, threshold)
        return to_modules(model), n
    found = _onnx_sites(model)
    gm = to_modules(model)
    left = list(found)
    for name, mod in list(gm.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        w = mod.weight.detach().cpu().numpy()
        for k, (site, theta, ls2) in enumerate(left):
            if theta.shape == w.shape and np.array_equal(theta, w):
                scores = ls2
            elif theta.ndim == 2 and theta.T.shape == w.shape and np.array_equal(theta.T, w):
                scores = ls2.T
            else:
                continue
            set_module(gm, name, _sparse_vd(mod, torch.from_numpy(np.ascontiguousarray(scores)), threshold, site))
            del left[k]
            break
    if left:
        raise DropcliError(f"cannot match sparse-vd site {left[0][0]} to a layer of the imported model",
                           "inject again from the original model, or prune with --data")
    gm.recompile()
    return gm, len(found)
