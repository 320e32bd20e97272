"""The torch backend's model: one ``torch.fx.GraphModule`` (whatever the file format, see
:mod:`dropcli.backends.torch.load`), described as :class:`~dropcli.model.selection.Layer` rows
and edited in place.

Rewrites are fx edits: a dropcli :class:`~dropcli.variants.base.SiteModule` is added as a
submodule and called on the chosen value; a REPLACE variant's site takes the place of the
layer it was built from (and turns back into it when removed). Sites saved into
TorchScript/.pt2 come back inlined (``where(<site>.dropcli_mc, ...)``) and are recognised as
such. Saving is :mod:`dropcli.backends.torch.save`; residual adds are found by
:mod:`dropcli.model.residual`.
"""

from __future__ import annotations

import contextlib
import io
import operator
import re
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from dropcli.backends.torch.fx import FxPatternView, aten_name, fetch_attr, fname
from dropcli.backends.torch.layers import (TorchLayer, activation_module, activation_of_call, activation_of_module, call_layer_class,
                                           describe_call, describe_module, stock_module)
from dropcli.backends.torch.load import GUARD_TARGETS, load_graph
from dropcli.backends.torch.save import require_example, save_graph, to_exported
from dropcli.errors import DropcliError, UsageError
from dropcli.model import formats, naming, residual
from dropcli.model.patterns import find_patterns
from dropcli.model.quiet import quiet
from dropcli.model.selection import KNOWN_KINDS, WEIGHTED, Layer, canonical_kind
from dropcli.variants.base import REPLACE, LayerSite, SiteModule, VariantSpec


class TorchModel:
    backend = "torch"

    def __init__(self, gm: fx.GraphModule, fmt: str, example_inputs: tuple | None, source: str = "",
                 site_meta: dict[str, dict[str, Any]] | None = None, model_meta: dict[str, Any] | None = None):
        self.gm = gm
        # facts about the whole model, kept across rewrites (``tau`` from ``dropcli finetune``)
        self.model_meta: dict[str, Any] = dict(model_meta or {})
        self.format = fmt
        self.example_inputs = example_inputs
        self.source = source
        self.site_meta: dict[str, dict[str, Any]] = dict(site_meta or {})
        names = [n for n, _ in gm.named_children()] + list(self.site_meta)
        names += [str(n.target).split(".")[0] for n in gm.graph.nodes if n.op == "get_attr"]
        self._site_count = naming.next_site_index(names)
        self._shapes_done = False

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, path: str | Path, fmt: str, *, trust_pickle: bool = False, imports: Sequence[str] = (),
        arch: str | None = None, input_shape: str | None = None, example_data: str | None = None, **_: Any,
    ) -> "TorchModel":
        """Load a torch format (see :mod:`dropcli.backends.torch.load`)."""
        got = load_graph(path, fmt, trust_pickle=trust_pickle, imports=imports, arch=arch, input_shape=input_shape,
                         example_data=example_data)
        return cls(got.gm, fmt, got.example, str(Path(path)), got.site_meta, got.model_meta)

    # ------------------------------------------------------------------ description
    def _ensure_shapes(self) -> None:
        if self._shapes_done:
            return
        self._shapes_done = True
        if self.example_inputs is None:
            return
        if all("val" in n.meta or n.op in ("output", "get_attr") for n in self.gm.graph.nodes):
            return
        try:
            from torch.fx.passes.shape_prop import ShapeProp

            # ShapeProp prints the traceback of a failed node itself: keep it off the user's stderr
            with torch.no_grad(), quiet(), contextlib.redirect_stderr(io.StringIO()):
                ShapeProp(self.gm).propagate(*self.example_inputs)
        except Exception:  # noqa: BLE001 - shapes are a nicety for inspect
            pass

    def _node_shape(self, n: fx.Node) -> list | None:
        val = n.meta.get("val")
        tm = n.meta.get("tensor_meta")
        if isinstance(val, torch.Tensor):
            dims = [int(d) if isinstance(d, int) else None for d in val.shape]
            if self.format == formats.TORCHSCRIPT and tm is not None and len(getattr(tm, "shape", ())) == len(dims):
                # TS2EP marks every input dim dynamic; only the batch dim really is.
                dims = [None if i == 0 and d is None else int(tm.shape[i]) if d is None else d for i, d in enumerate(dims)]
            return dims
        if tm is not None and hasattr(tm, "shape"):
            dims = list(tm.shape)
            ex = self.example_inputs
            if self.format == formats.TORCHSCRIPT and dims and ex and ex[0].dim() and dims[0] == ex[0].shape[0]:
                dims[0] = None  # a TorchScript graph read directly is shaped at the example: its batch is N
            return dims
        return None

    def _module_of(self, n: fx.Node) -> nn.Module | None:
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)
        return None

    def layers(self) -> list[Layer]:
        """Describe every compute node (plus inputs) as a :class:`Layer`."""
        self._ensure_shapes()
        g = self.gm.graph
        nodes = [n for n in g.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method")]
        nodes = [n for n in nodes if not (n.op == "call_module" and n.target in GUARD_TARGETS)]
        params = _weights(self.gm)
        inlined = self.inlined_sites()
        hidden = set().union(*(internal for _, _, internal in inlined.values())) if inlined else set()
        patterns = {m.root: m for m in find_patterns(FxPatternView(self.gm), [n for n in g.nodes if n.op != "output"])}
        hidden |= {v for m in patterns.values() for v in m.interior if v is not m.root}
        nodes = [n for n in nodes if n not in hidden]
        rows: list[Layer] = []
        info: dict[fx.Node, tuple[str, str, str, int]] = {}
        scope_terminals: dict[str, list[fx.Node]] = {}
        for n in nodes:
            info[n] = self._raw_info(n, params)
            if n in patterns:  # an activation spelled as several ops: one layer, the site after it all
                m = patterns[n]
                ops = "/".join(fname(v) or str(v.target) for v in g.nodes if v in m.interior)
                info[n] = (f"{m.name}({ops})", m.kind, "", 0)
        # A recurrent module called in a symbolic trace returns (output, state): its row is the
        # getitem of the output sequence (as in an exported graph), so a site after it gets a tensor
        seq_of = self._recurrent_outputs(nodes)
        nodes = [n for n in nodes if n not in seq_of.values()]
        for g0, call in seq_of.items():
            info[g0] = info[call]
        # Name nodes: module path where the node ends a module call, else path/node.
        paths = {n: str(seq_of[n].target) if n in seq_of else _scope_path(n, params) for n in nodes}
        for n in nodes:
            path = paths[n]
            if path and n.op != "placeholder":
                users_outside = not n.users or any(paths.get(u, None) != path for u in n.users)
                if users_outside:
                    scope_terminals.setdefault(path, []).append(n)
        names: dict[fx.Node, str] = {}
        for path, terms in scope_terminals.items():
            for i, t in enumerate(terms):
                names[t] = path if len(terms) == 1 else f"{path}@{i}"
        for n in nodes:
            if n not in names:
                path = paths[n]
                names[n] = f"{path}/{n.name}" if path and n.op != "call_module" else (n.target if n.op == "call_module" else n.name)
        output_region = self._output_region(info)
        seen_sites: set[str] = set()
        for n in nodes:
            op, kind, _, nparams = info[n]
            val = n.meta.get("val")
            if n.op != "placeholder" and val is not None and not isinstance(val, torch.Tensor):
                # tuples (e.g. native batch norm), sizes, symbols: not sites
                continue
            if n.op != "placeholder" and not n.users:
                continue  # runtime asserts and other side-effect-only nodes
            mod = self._module_of(n)
            path = paths.get(n, "")
            ends_module = bool(path) and n.op != "call_module" and (names[n] == path or names[n].startswith(path + "@"))
            leaf_type = _leaf_type(n) if ends_module else None
            if leaf_type and canonical_kind(leaf_type) in KNOWN_KINDS:
                # a node that ends a leaf module call takes the module's kind (Linear, ReLU...)
                kind = canonical_kind(leaf_type)
                op = f"{leaf_type}({op})"
            dropout_p, dropout_variant = None, None
            if n in inlined:
                site = inlined[n][0]
                if site in seen_sites:
                    continue  # a multi-output site (a recurrent layer) is one row
                seen_sites.add(site)
                meta = self.site_meta.get(site, {})
                dropout_variant = meta.get("variant", "dropcli")
                dropout_p = meta.get("p")
                rec = meta.get("layer")
                op = f"dropcli.{dropout_variant}" + (f"({rec.get('name', rec.get('cls'))})" if isinstance(rec, dict) else "")
                rows.append(Layer(name=site, kind="dropout", op=op, shape=self._node_shape(n),
                                  dropout_p=dropout_p, dropout_variant=dropout_variant, ref=n))
                continue
            layer_class = None
            if isinstance(mod, SiteModule):
                has_p = any(q.name == "p" for q in mod.spec.params)
                kind, dropout_p, dropout_variant = "dropout", mod.p if has_p else None, mod.spec.name
            elif kind == "dropout":
                dropout_p, dropout_variant = _dropout_p(n, mod), "dropout"
            elif kind in _REWRITABLE_KINDS:
                layer_node = self._layer_node(n)
                info_l = self.layer_info(layer_node) if layer_node is not None else None
                layer_class = info_l.cls if info_l is not None else None
            rows.append(
                Layer(
                    name=names[n], kind="input" if n.op == "placeholder" else kind, op=op, shape=self._node_shape(n),
                    params=nparams, dropout_p=dropout_p, dropout_variant=dropout_variant,
                    is_output=n in output_region, is_input=n.op == "placeholder", layer_class=layer_class, ref=n,
                )
            )
        self._mark_residuals(rows)
        return rows

    def inlined_sites(self) -> dict[fx.Node, tuple[str, fx.Node, set[fx.Node]]]:
        """dropcli sites saved into TorchScript/.pt2 come back as plain ops ending in
        ``where(<site>.dropcli_mc, stochastic, inference)``. Map each such ``where`` node to
        (site name, the site's input, the nodes inside the site)."""
        out: dict[fx.Node, tuple[str, fx.Node, set[fx.Node]]] = {}
        anc = None
        for n in self.gm.graph.nodes:
            if not (n.op == "call_function" and len(n.args) == 3 and isinstance(n.args[0], fx.Node)):
                continue
            cond = n.args[0]
            if not (cond.op == "get_attr" and naming.reads_mc(cond.target)):
                continue
            if anc is None:
                anc = _ancestors(self.gm.graph)
            a, b = n.args[1], n.args[2]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            common = ((anc[a] | {a}) & (anc[b] | {b})) - {c for c in anc[n] if c.op == "get_attr"}
            site = naming.mc_owner(cond.target)
            # the input comes from outside the site: the latest common value whose descendants up
            # to the select read nothing else from the graph (a trace may share values by both
            # branches, e.g. DropConnect's x*x, which is then not the input)
            order_ = {m: i for i, m in enumerate(self.gm.graph.nodes)}
            # ... and never a value computed from the site's own tensors (e.g. Standout's W x + b,
            # shared by both branches, of which the whole rest of the site is a function)
            own: set[fx.Node] = set()
            for m in self.gm.graph.nodes:
                if m is n:
                    break
                if any((i.op == "get_attr" and str(i.target).startswith(site + ".")) or i in own for i in m.all_input_nodes):
                    own.add(m)
            common -= own
            chosen = None
            for c in sorted(common, key=order_.__getitem__, reverse=True):
                region = {m for m in anc[n] if c in anc[m]} | {n}
                if all(i is c or i in region or i.op == "get_attr" or _is_size(i) or not _reads_input(i, anc)
                       for m in region for i in m.all_input_nodes):
                    chosen = c
                    break
            if chosen is not None:
                common = {c for c in common if order_[c] <= order_[chosen]}
            if not common:
                continue
            x = max(common, key=order_.__getitem__)
            internal = {m for m in anc[n] if m not in anc[x] and m is not x and m.op not in ("get_attr", "placeholder")}
            # side-effect-only nodes (export's runtime dtype asserts) on the site's values
            internal |= {u for m in internal for u in m.users if not u.users and u is not n}
            out[n] = (site, x, internal)
        return out

    def _recurrent_outputs(self, nodes: Sequence[fx.Node]) -> dict[fx.Node, fx.Node]:
        """``{getitem(call, 0): call}`` for each nn.LSTM/GRU/RNN module call among ``nodes`` whose
        output sequence is read (a symbolic trace's call returns the (output, state) tuple)."""
        out: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), nn.RNNBase):
                firsts = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem and u.args[1:] == (0,)]
                if len(firsts) == 1:
                    out[firsts[0]] = n
        return out

    def _raw_info(self, n: fx.Node, params: dict[str, nn.Parameter]) -> tuple[str, str, str, int]:
        if n.op == "placeholder":
            return ("input", "input", "", 0)
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            op = type(mod).__name__
            if op.endswith("GraphModuleImpl") or op == "GraphModule":
                op = "GraphModule"
            counted = not isinstance(mod, SiteModule) or isinstance(mod, LayerSite)
            nparams = sum(p.numel() for p in _weights(mod).values()) if counted else 0
            if isinstance(mod, SiteModule):
                op = f"dropcli.{mod.spec.name}"
                if isinstance(mod, LayerSite):
                    op += f"({getattr(mod, 'replaced_name', mod.layer_cls)})"
            return (op, canonical_kind(op), "", nparams)
        tgt = n.target
        if isinstance(tgt, torch._ops.OpOverload):
            op = aten_name(tgt)
        elif n.op == "call_method":
            op = str(tgt)
        else:
            op = getattr(tgt, "__name__", str(tgt))
        nparams = 0
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a.target in params:
                nparams += params[a.target].numel()
        kind = canonical_kind(op.rstrip("_"))
        if op == "getitem" and isinstance(n.args[0], fx.Node):
            src_op = self._raw_info(n.args[0], params)
            if src_op[1] in ("batchnorm", "layernorm", "groupnorm", "dropout", "pool"):
                return (src_op[0], src_op[1], "", src_op[3])
        return (op, kind, "", nparams)

    def _output_region(self, info: dict[fx.Node, tuple]) -> set[fx.Node]:
        out = next(n for n in self.gm.graph.nodes if n.op == "output")
        region: set[fx.Node] = set()
        stack = list(out.all_input_nodes)
        while stack:
            n = stack.pop()
            if n in region or n.op in ("get_attr", "placeholder"):
                continue
            region.add(n)
            if n in info and info[n][1] in WEIGHTED:
                continue
            stack.extend(n.all_input_nodes)
        return region

    def _mark_residuals(self, rows: list[Layer]) -> None:
        adds = [r for r in rows if r.kind == "add"]
        if not adds:
            return
        anc = _ancestors(self.gm.graph)
        kinds = {r.ref: r.kind for r in rows}
        for r in adds:
            branch = residual_branch(r.ref, anc, kinds)
            r.residual = branch is not None

    def dropout_after(self, layer: Layer) -> list:
        """The nodes of the dropout that reads ``layer``'s output, when everything that reads it is
        dropout (the model's own, or a dropcli site); else []."""
        n = layer.ref
        if not isinstance(n, fx.Node) or not n.users:
            return []
        sites = self.inlined_sites()
        inside = set().union(*(internal for _, _, internal in sites.values())) if sites else set()

        def is_dropout(u: fx.Node) -> bool:
            if u.op == "call_module" and isinstance(self.gm.get_submodule(u.target), SiteModule):
                return True
            return u in inside or u in sites or self._raw_info(u, {})[1] == "dropout"

        return list(n.users) if all(is_dropout(u) for u in n.users) else []

    # ------------------------------------------------------------------ rewriting
    def _claim_site_name(self) -> str:
        """The next free ``dropcli_site_N``."""
        name = naming.site_name(self._site_count)
        self._site_count += 1
        return name

    def _new_site(self, spec: VariantSpec, params: dict[str, Any]) -> tuple[str, SiteModule]:
        name = self._claim_site_name()
        module = spec.torch_module(**params)
        self.gm.add_submodule(name, module)
        return name, module

    def _call_site(self, value: fx.Node, name: str, where: fx.Node) -> fx.Node:
        g = self.gm.graph
        with g.inserting_after(where):
            new = g.call_module(name, (value,))
        if "val" in value.meta:
            new.meta["val"] = value.meta["val"]
        if "tensor_meta" in value.meta:
            new.meta["tensor_meta"] = value.meta["tensor_meta"]
        return new

    def replaceable(self, spec: VariantSpec) -> list[Layer]:
        """The layers a ``REPLACE`` variant can replace, as :class:`Layer` rows (ref = the fx node)."""
        rep = spec.replacement
        params = _weights(self.gm)
        rows = []
        for n in self.gm.graph.nodes:
            kind = rep.torch_match(self.gm, n) if rep is not None else None
            if kind:
                name = str(n.target) if n.op == "call_module" else (_scope_path(n, params) or n.name)
                op = type(self.gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target)
                rows.append(Layer(name=name, kind=kind, op=op, ref=n))
        return rows

    def insert(self, layer: Layer, spec: VariantSpec, params: dict[str, Any]) -> str:
        """Put a site after ``layer`` (or on its residual branch / input, or in its place, by the spec)."""
        from dropcli.variants.base import REPLACE, RESIDUAL

        node: fx.Node = layer.ref
        if spec.attaches == REPLACE:
            if spec.replacement is not None:  # a variant with its own rewriter (the recurrent family)
                name = self._claim_site_name()
                spec.replacement.torch_apply(self.gm, node, spec, params, name)
                self._recompile()
                return name
            return self.replace_layer(layer, spec, params)
        spec.check_rank(layer.rank, f"layer {layer.name}")
        name, _ = self._new_site(spec, params)
        if spec.attaches == RESIDUAL:
            anc = _ancestors(self.gm.graph)
            kinds = {r.ref: r.kind for r in self.layers()}
            branch = residual_branch(node, anc, kinds)
            if branch is None:
                raise UsageError(f"{layer.name} is not a residual add", "droppath goes on residual adds (see `dropcli inspect`)")
            new = self._call_site(branch, name, branch)
            node.replace_input_with(branch, new)
        else:
            where = node
            if node.op == "placeholder":
                where = [n for n in self.gm.graph.nodes if n.op == "placeholder"][-1]
            new = self._call_site(node, name, where)
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        self._recompile()
        return name

    def replace_dropout(self, layer: Layer, spec: VariantSpec | None, params: dict[str, Any]) -> str | None:
        """Swap an existing dropout for ``spec`` (or remove it when ``spec`` is None).

        A site that replaced a layer (a REPLACE variant's) first turns back into the stock
        layer it was built from; ``spec`` then rewrites that layer (REPLACE) or goes after it.
        """
        restored = self._restore_layer_site(layer)
        if restored is not None:
            layer_node, last, label = restored
            name = None
            if spec is not None and spec.attaches == REPLACE:
                name = self._replace_node(layer_node, spec, params, label)
            elif spec is not None:
                spec.check_rank(layer.rank, f"layer {layer.name}")
                name, _ = self._new_site(spec, params)
                new = self._call_site(last, name, last)
                last.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
            self._recompile()
            return name
        if spec is not None and spec.attaches == REPLACE:
            raise UsageError(
                f"{spec.name} rewrites {', '.join(spec.replaces)} layers; it can't take the place of the dropout layer {layer.name}",
                f"inject it with `dropcli inject --variant {spec.name}` (it picks the layers; narrow with --layers)",
            )
        node: fx.Node = layer.ref
        src = node
        inlined = self.inlined_sites().get(node)
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
        x = inlined[1] if inlined else (src.args[0] if src.args else src.kwargs.get("input"))
        if not isinstance(x, fx.Node):
            raise DropcliError(f"cannot find the input of dropout {layer.name}")
        name = None
        if spec is None:
            node.replace_all_uses_with(x)
        else:
            spec.check_rank(layer.rank, f"layer {layer.name}")
            name, _ = self._new_site(spec, params)
            new = self._call_site(x, name, node)
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        g = self.gm.graph
        g.erase_node(node)
        if src is not node and not src.users:
            g.erase_node(src)
        if inlined:
            # random ops count as impure for dead-code elimination: drop the old site's nodes here
            for m in reversed(list(g.nodes)):
                if m in inlined[2] and not m.users:
                    g.erase_node(m)
            self.site_meta.pop(inlined[0], None)
        self._recompile()
        return name

    # ------------------------------------------------------------------ layer rewriting (REPLACE variants)
    def _layer_node(self, n: fx.Node) -> fx.Node | None:
        """The node that calls the layer a row stands for (a recurrent layer's row is the
        getitem of its output sequence)."""
        if n.op == "call_function" and n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            if src.op == "call_function" and call_layer_class(src.target) and call_layer_class(src.target)[0] in ("lstm", "gru"):
                return src
            if src.op == "call_module" and isinstance(self.gm.get_submodule(src.target), (nn.LSTM, nn.GRU)):
                return src
            return None
        if n.op in ("call_module", "call_function"):
            return n
        return None

    def _fetch_const(self, a: Any) -> torch.Tensor | None:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            with contextlib.suppress(AttributeError):
                v = fetch_attr(self.gm, a.target)
                return v if isinstance(v, torch.Tensor) else None
        return None

    def layer_info(self, n: fx.Node) -> TorchLayer | None:
        """The trained layer a node calls (None: not a layer dropcli rewrites)."""
        if n.op == "call_module":
            mod = self.gm.get_submodule(n.target)
            if isinstance(mod, SiteModule):
                return None
            layer = describe_module(mod)
            if layer is None or n.kwargs:
                return None
            args = list(n.args)
            if layer.cls in ("lstm", "gru"):
                inputs = _rnn_module_inputs(args)
                if inputs is None:
                    return None
                layer.inputs = tuple(inputs)
            else:
                if len(args) != 1 or not isinstance(args[0], fx.Node):
                    return None
                layer.inputs = (args[0],)
            return layer
        if n.op != "call_function" or call_layer_class(n.target) is None:
            return None
        try:
            na = n.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001
            na = None
        if na is None:
            return None
        kw = dict(na.kwargs)
        layer = describe_call(n.target, kw, self._fetch_const)
        if layer is None or not isinstance(kw.get("input"), fx.Node):
            return None
        if layer.cls in ("lstm", "gru"):
            hx = kw.get("hx")
            hx = list(hx) if isinstance(hx, (list, tuple)) else [hx]
            if not all(isinstance(h, fx.Node) for h in hx):
                return None
            layer.inputs = (kw["input"], *hx)
        else:
            layer.inputs = (kw["input"],)
        return layer

    def _absorbed_activation(self, n: fx.Node, spec: VariantSpec) -> tuple[fx.Node | None, Any]:
        """The activation that is the layer's only user, when the variant absorbs it."""
        if not spec.absorbs or len(n.users) != 1:
            return None, None
        u = next(iter(n.users))
        act = None
        if u.op == "call_module":
            mod = self.gm.get_submodule(u.target)
            if len(u.args) == 1 and u.args[0] is n and not u.kwargs:
                act = activation_of_module(mod)
        elif u.op == "call_method":
            if len(u.args) == 1 and u.args[0] is n and not u.kwargs:
                act = activation_of_call(u.target, {}, method=True)
        elif u.op == "call_function":
            with contextlib.suppress(Exception):
                na = u.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
                if na is not None and na.kwargs.get("input") is n:
                    act = activation_of_call(u.target, dict(na.kwargs))
        if act is None or act.kind not in spec.absorbs:
            return None, None
        return u, act

    def replace_layer(self, layer: Layer, spec: VariantSpec, params: dict[str, Any]) -> str:
        """Swap ``layer`` (and the activation right after it, when the variant absorbs it) for
        a site built from the trained layer."""
        node = self._layer_node(layer.ref)
        if node is None:
            raise UsageError(f"layer {layer.name} is not a layer {spec.name} can rewrite", "see `dropcli inspect`")
        return self._replace_node(node, spec, params, layer.name)

    def _replace_node(self, node: fx.Node, spec: VariantSpec, params: dict[str, Any], label: str) -> str:
        info = self.layer_info(node)
        if info is None or info.cls not in spec.replaces:
            what = info.cls if info is not None else "an unsupported layer"
            raise UsageError(f"{spec.name} rewrites {', '.join(spec.replaces)} layers, but {label} is {what}",
                             "choose other layers with --layers/--after (see `dropcli inspect`)")
        act_node, act = self._absorbed_activation(node, spec)
        info.act = act
        module = spec.torch_module(info, **params)  # the variant checks the layer (UsageError)
        module.replaced_name = label
        module.replaced_act_name = _node_label(act_node) if act_node is not None else ""
        name = self._claim_site_name()
        self.gm.add_submodule(name, module)
        g = self.gm.graph
        last = act_node if act_node is not None else node
        with g.inserting_before(node):
            new = g.call_module(name, tuple(info.inputs))
        for key in ("val", "tensor_meta"):
            if key in last.meta:
                new.meta[key] = last.meta[key]
        last.replace_all_uses_with(new)
        if act_node is not None:
            g.erase_node(act_node)
        g.erase_node(node)
        self._drop_unused_attrs(info.weight_nodes)
        self._recompile()
        return name

    def _drop_unused_attrs(self, nodes: Sequence[Any]) -> None:
        """Erase get_attr nodes left without users and delete their tensors from the module
        (the site holds them now), unless another get_attr still reads the same target."""
        g = self.gm.graph
        targets = set()
        for n in nodes:
            if isinstance(n, fx.Node) and n.op == "get_attr" and not n.users and n.graph is g:
                targets.add(n.target)
                g.erase_node(n)
        still = {n.target for n in g.nodes if n.op == "get_attr"}
        for t in targets - still:
            owner_path, _, attr = t.rpartition(".")
            with contextlib.suppress(AttributeError):
                owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
                delattr(owner, attr)

    def _restore_layer_site(self, layer: Layer) -> tuple[fx.Node, fx.Node, str] | None:
        """Turn a REPLACE variant's site back into the stock layer (and activation) it was built
        from; returns (layer node, last node, layer name), or None when the row is not such a site."""
        node: fx.Node = layer.ref
        g = self.gm.graph
        inlined = self.inlined_sites().get(node)
        if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), LayerSite):
            site_mod = self.gm.get_submodule(node.target)
            tl, inputs, site = site_mod.layer, tuple(node.args), node.target
            label, act_label = getattr(site_mod, "replaced_name", ""), getattr(site_mod, "replaced_act_name", "")
            internal: set[fx.Node] = set()
        elif inlined is not None and isinstance(self.site_meta.get(inlined[0], {}).get("layer"), dict):
            site, x, internal = inlined
            rec = self.site_meta[site]["layer"]
            where_nodes = [w for w, (s2, _, _) in self.inlined_sites().items() if s2 == site]
            if len(where_nodes) != 1:
                raise DropcliError(
                    f"site {site} replaced a {rec.get('cls')} layer with several outputs; dropcli can't restore it from a "
                    "saved TorchScript/.pt2 graph", "inject again from the original model")
            try:
                tensors = {t: fetch_attr(self.gm, f"{site}.{t}") for t in rec.get("tensors", [])}
            except AttributeError as e:
                raise DropcliError(f"site {site}: the tensors of the layer it replaced are missing ({e})",
                                   "inject again from the original model") from e
            tl = TorchLayer.from_record(rec, tensors)
            inputs, label, act_label = (x,), str(rec.get("name") or ""), str(rec.get("act_name") or "")
        else:
            return None
        mod_name = _free_name(self.gm, label or f"{site}_layer")
        self.gm.add_submodule(mod_name, stock_module(tl))
        with g.inserting_before(node):
            new = g.call_module(mod_name, inputs)
        if tl.act is not None:
            act_name = _free_name(self.gm, act_label or f"{mod_name}_act")
            self.gm.add_submodule(act_name, activation_module(tl.act))
            with g.inserting_after(new):
                out = g.call_module(act_name, (new,))
        else:
            out = new
        for key in ("val", "tensor_meta"):
            if key in node.meta:
                out.meta[key] = node.meta[key]
        node.replace_all_uses_with(out)
        g.erase_node(node)
        if internal:
            for m in reversed(list(g.nodes)):
                if m in internal and not m.users:
                    g.erase_node(m)
        self._drop_unused_attrs([n for n in g.nodes if n.op == "get_attr" and str(n.target).startswith(site + ".")])
        self.site_meta.pop(site, None)
        return new, out, mod_name

    def _recompile(self) -> None:
        g = self.gm.graph
        g.eliminate_dead_code(is_impure_node=lambda n: n.op not in ("call_function", "call_method", "call_module") or _is_impure(n))
        g.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    # ------------------------------------------------------------------ running
    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.gm(*inputs)

    def site_modules(self) -> dict[str, SiteModule]:
        return {n: m for n, m in self.gm.named_children() if isinstance(m, SiteModule)}

    # ------------------------------------------------------------------ saving
    def default_output_format(self) -> str:
        if self.format == formats.HUB or (self.format in (formats.PICKLE, formats.STATE_DICT, formats.SAFETENSORS)
                                          and _is_aten_graph(self.gm)):
            # captured with torch.export (symbolic tracing could not read it): torch cannot pickle
            # such a graph, and a .pt2 keeps its batch size dynamic
            return formats.EXPORT
        return formats.TORCHSCRIPT if self.format in (formats.STATE_DICT, formats.SAFETENSORS) else self.format

    def save(self, path: str | Path, fmt: str | None = None) -> str:
        """Write the model (see :mod:`dropcli.backends.torch.save`); returns the format written."""
        return save_graph(self, path, fmt or self.default_output_format())

    def sites_meta(self) -> dict[str, dict[str, Any]]:
        """Variant, parameters (and replaced layer) of every site: the record saved beside the graph."""
        meta = dict(self.site_meta)
        for name, m in self.site_modules().items():
            has_p = any(q.name == "p" for q in m.spec.params)
            meta[name] = {"variant": m.spec.name, **({"p": m.p} if has_p else {}), **m.params}
            if isinstance(m, LayerSite):
                meta[name]["layer"] = {**m.layer_record(), "name": getattr(m, "replaced_name", ""),
                                       "act_name": getattr(m, "replaced_act_name", "")}
        return meta

    def to_exported(self, example: tuple | None = None):
        """The model captured with ``torch.export``."""
        return to_exported(self.gm, example or require_example(self.example_inputs, formats.EXPORT))


# ---------------------------------------------------------------------- helpers


_REWRITABLE_KINDS = {"linear", "conv", "pool", "lstm", "gru"}


def _rnn_module_inputs(args: list[Any]) -> list[fx.Node] | None:
    """nn.LSTM/GRU called as m(x), m(x, h0) or m(x, (h0, c0)): the tensors, flattened."""
    if not args or not isinstance(args[0], fx.Node):
        return None
    out = [args[0]]
    for a in args[1:]:
        items = list(a) if isinstance(a, (list, tuple)) else [a]
        if not all(isinstance(i, fx.Node) for i in items):
            return None
        out += items
    return out


def _node_label(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        path = _clean_path(list(stack.values())[-1][0])
        if path:
            return path
    return n.name


def _free_name(gm: nn.Module, base: str) -> str:
    base = re.sub(r"[^0-9A-Za-z_.]", "_", base) or "layer"
    name, k = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            if not hasattr(gm, name):
                return name
        name = f"{base}_{k}"
        k += 1


def _weights(gm: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by name. TorchScript conversion turns parameters into buffers,
    so buffers count too, except running statistics and dropcli's switches."""
    skip = ("running_mean", "running_var", "num_batches_tracked", naming.MC_NAME)
    out: dict[str, torch.Tensor] = dict(gm.named_parameters())
    for name, b in gm.named_buffers():
        if not name.endswith(skip) and b.is_floating_point():
            out.setdefault(name, b)
    return out


def _scope_path(n: fx.Node, params: dict[str, nn.Parameter]) -> str:
    """The module path a node belongs to (from export metadata, or from the params it reads)."""
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack")
    if stack:
        path = _clean_path(list(stack.values())[-1][0])
        if path:
            return path
    prefixes = {a.target.rsplit(".", 1)[0] for a in n.all_input_nodes if a.op == "get_attr" and "." in a.target}
    if len(prefixes) == 1:
        return prefixes.pop()
    return ""


def _clean_path(path: str) -> str:
    # export records paths like "L['self'].features.0" in strict mode; keep the dotted tail
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return path.replace("._modules['", ".").replace("']", "")


def _leaf_type(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    typ = list(stack.values())[-1][1]
    typ = typ.__name__ if isinstance(typ, type) else str(typ)
    return typ.rsplit(".", 1)[-1]


def _dropout_p(n: fx.Node, mod: nn.Module | None) -> float | None:
    if mod is not None and hasattr(mod, "p"):
        return float(mod.p)
    src = n.args[0] if n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node) else n
    if len(src.args) > 1 and isinstance(src.args[1], (int, float)):
        return float(src.args[1])
    if "p" in src.kwargs:
        return float(src.kwargs["p"])
    return None


def _is_aten_graph(gm: fx.GraphModule) -> bool:
    """Whether the graph holds aten ops (captured by torch.export), not a symbolic trace's calls."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _is_impure(n: fx.Node) -> bool:
    with contextlib.suppress(Exception):
        return n.is_impure()
    return True


def _reads_input(n: fx.Node, anc: dict[fx.Node, set[fx.Node]]) -> bool:
    """Whether ``n`` is computed from a graph input (else from weights and constants alone)."""
    return n.op == "placeholder" or any(a.op == "placeholder" for a in anc[n])


def _is_size(n: fx.Node) -> bool:
    """A node whose value is a size or other scalar (not data), e.g. ``sym_size``."""
    return isinstance(n.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _ancestors(g: fx.Graph) -> dict[fx.Node, set[fx.Node]]:
    """Every node's ancestors, weights (``get_attr``) left out."""
    return residual.ancestors(g.nodes, lambda n: [a for a in n.all_input_nodes if a.op != "get_attr"])


def residual_branch(add: fx.Node, anc: dict[fx.Node, set[fx.Node]], kinds: dict[fx.Node, str]) -> fx.Node | None:
    """For a residual ``add(skip, f(skip))`` return the branch operand ``f(skip)``
    (:func:`dropcli.model.residual.residual_branch` on the fx graph)."""
    ops = [a for a in add.args[:2] if isinstance(a, fx.Node) and a.op != "get_attr"]
    if len(ops) != 2:
        return None
    k = residual.residual_branch(ops[0], ops[1], anc, lambda n: kinds.get(n) in WEIGHTED)
    return None if k is None else ops[k]
