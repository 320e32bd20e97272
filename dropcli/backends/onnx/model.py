"""ONNX backend: node-level rewrites with stock ops, runnable in stock onnxruntime.

Sites are built from random ops (RandomUniformLike, RandomNormalLike), never from
``Dropout(training_mode=True)``: onnxruntime's EliminateDropout rule deletes Dropout nodes
even in training mode (docs/onnx.md).

Every rewritten model gets one bool graph input ``dropcli_mc`` whose default (an
initializer of the same name) is ``False``: inference behaviour. Feed ``True`` to sample.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dropcli.model import formats
from dropcli.errors import DropcliError, UsageError
from dropcli.io.files import atomic_dir, atomic_path, write_errors
from dropcli.model import naming, residual
from dropcli.model.naming import MC_INPUT, MODEL_META, SITES_META, join_scopes
from dropcli.model.selection import WEIGHTED, Layer, canonical_kind
from dropcli.model.kinds import REPLACE, RESIDUAL
from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo, opset_of
from dropcli.backends.onnx.layers import OnnxLayer, absorbable_activation, const_value, describe_node
from dropcli.model.patterns import Match, OnnxPatternView, find_patterns

if TYPE_CHECKING:  # the variants' module imports torch; loading an ONNX model must not
    from dropcli.variants.base import VariantSpec

MIN_OPSET = 13
# ops we describe as weighted layers when their weight is an initializer
_MATMUL_LIKE = {"MatMul", "Gemm"}


class OnnxModel:
    backend = "onnx"
    format = formats.ONNX

    def __init__(self, model: onnx.ModelProto, source: str = "", external: bool = False):
        self.model = model
        self.source = source
        self.external = external
        self._site_count = naming.next_site_index(naming.node_sites(n.name for n in model.graph.node))
        self._infer()

    @property
    def model_meta(self) -> dict[str, Any]:
        """Facts dropcli stored about the whole model (``tau`` from ``dropcli finetune``)."""
        return model_record(self.model)

    @classmethod
    def load(cls, path: str | Path) -> "OnnxModel":
        path = Path(path)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"cannot read ONNX model {path}: {type(e).__name__}", "check that the file is complete") from e
        external = any(
            t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer
        )
        if external:
            try:
                from onnx.external_data_helper import load_external_data_for_model

                load_external_data_for_model(model, str(path.resolve().parent))
            except Exception as e:  # noqa: BLE001
                raise DropcliError(
                    f"cannot read the external data of ONNX model {path}: {e}",
                    "keep the .data file(s) next to the model, as when it was saved",
                ) from e
        opset = opset_of(model)
        if opset < MIN_OPSET:
            raise DropcliError(
                f"ONNX model {path} uses opset {opset}; dropcli needs opset {MIN_OPSET} or newer",
                "convert it with onnx.version_converter.convert_version(model, 17)",
            )
        try:
            onnx.checker.check_model(model)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"ONNX model {path} is invalid: {str(e).splitlines()[0][:200]}", "re-export the model") from e
        return cls(model, str(path), external)

    # ------------------------------------------------------------------ description
    def _infer(self) -> None:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # noqa: BLE001
            inferred = self.model
        self._vi: dict[str, onnx.ValueInfoProto] = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            self._vi[vi.name] = vi
        self._inits = {t.name: t for t in self.model.graph.initializer}
        self._const_outputs = {o for n in self.model.graph.node if n.op_type == "Constant" for o in n.output}

    def tensor_info(self, name: str) -> TensorInfo:
        vi = self._vi.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            return TensorInfo(None, None)
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            return TensorInfo(None, None, tt.elem_type or TensorProto.FLOAT)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        return TensorInfo(len(dims), dims, tt.elem_type or TensorProto.FLOAT)

    def graph_inputs(self) -> list[onnx.ValueInfoProto]:
        return [i for i in self.model.graph.input if i.name not in self._inits]

    def _is_const(self, name: str) -> bool:
        return name in self._inits or name in self._const_outputs

    def _kind(self, node: onnx.NodeProto) -> str:
        if node.op_type in _MATMUL_LIKE and len(node.input) > 1 and self._is_const(node.input[1]):
            return "linear"
        if node.op_type == "Gather" and node.input and not self._is_const(node.input[0]):
            return "gather"  # indexing an activation (x[:, -1]), not an embedding table
        return canonical_kind(node.op_type)

    def _display_names(self, hidden: set[int] | None = None) -> list[str]:
        """Exporter names like ``/fc1/Gemm`` read as ``fc1``; duplicates keep the full name.
        ``hidden`` nodes (inside an activation pattern) are not listed, so they don't count."""
        hidden = hidden or set()
        raw = []
        for i, n in enumerate(self.model.graph.node):
            nm = n.name or (n.output[0] if n.output else f"node{i}")
            parts = [p for p in nm.split("/") if p]
            if len(parts) >= 2 and parts[-1].split("_")[0] == n.op_type:
                nm = join_scopes(parts[:-1])
            elif nm.startswith("/"):
                nm = nm[1:]
            raw.append(nm)
        counts: dict[str, int] = {}
        for i, (n, nm) in enumerate(zip(self.model.graph.node, raw)):
            if n.op_type != "Constant" and i not in hidden:  # not listed as layers, so they don't make a name ambiguous
                counts[nm] = counts.get(nm, 0) + 1
        return [nm if counts.get(nm, 0) <= 1 else (self.model.graph.node[i].name or nm) for i, nm in enumerate(raw)]

    def layers(self) -> list[Layer]:
        g = self.model.graph
        rows: list[Layer] = []
        for gi in self.graph_inputs():
            if gi.name == MC_INPUT:
                continue
            info = self.tensor_info(gi.name)
            rows.append(Layer(gi.name, "input", "input", info.shape, 0, is_input=True, ref=("input", gi.name)))
        ctx = self._layer_ctx()
        roots, interior = self.activation_patterns(ctx)
        names = self._display_names(interior)
        producers = {o: i for i, n in enumerate(g.node) for o in n.output}
        kinds = [self._kind(n) for n in g.node]
        region = self._output_region(producers, kinds)
        anc = self._ancestors(producers)
        records = site_records(self.model)
        for i, n in enumerate(g.node):
            if n.op_type == "Constant" or i in interior:
                continue
            site = naming.node_site(n.name)
            if site is not None:
                if n.op_type == "Where" and naming.is_select(n.name):
                    rec = records.get(site, {}).get("layer")
                    op = f"dropcli({rec.get('name') or rec.get('cls')})" if isinstance(rec, dict) else "dropcli"
                    rows.append(Layer(site, "dropout", op, self.tensor_info(n.output[0]).shape,
                                      dropout_p=naming.doc_p(n.doc_string), dropout_variant=naming.doc_variant(n.doc_string),
                                      ref=("node", i)))
                continue
            params = sum(int(np.prod(self._inits[x].dims)) for x in n.input if x in self._inits)
            kind, op = kinds[i], n.op_type
            if i in roots:  # an activation spelled as several ops: one layer, the site after it all
                kind, op = roots[i].kind, f"{roots[i].name}({'/'.join(self._pattern_ops(roots[i]))})"
                params = 0
            dp = self._dropout_ratio(n) if kind == "dropout" else None
            rows.append(Layer(
                names[i], kind, op, self.tensor_info(n.output[0]).shape if n.output else None, params,
                dropout_p=dp, dropout_variant="dropout" if kind == "dropout" else None,
                is_output=i in region, residual=kind == "add" and self._residual_branch(i, producers, anc, kinds) is not None,
                layer_class=self._layer_class(i, ctx, kind), ref=("node", i),
            ))
        return rows

    def activation_patterns(self, ctx: tuple | None = None) -> tuple[dict[int, Match], set[int]]:
        """Activations spelled as several ops (:mod:`dropcli.model.patterns`): the index of each
        one's last node with its match, and the indices of the nodes inside them."""
        nodes, const, _, outs = ctx or self._layer_ctx()
        view = OnnxPatternView(nodes, const, outs)
        where = {n.output[0]: i for i, n in enumerate(nodes) if n.output}
        matches = find_patterns(view, [n.output[0] for n in nodes if n.output and n.op_type != "Constant"])
        roots = {where[m.root]: m for m in matches}
        interior = {where[v] for m in matches for v in m.interior if v != m.root}
        return roots, interior

    def _pattern_ops(self, m: Match) -> list[str]:
        nodes = self.model.graph.node
        return [n.op_type for n in nodes if n.output and n.output[0] in m.interior]

    # ------------------------------------------------------------------ layers REPLACE variants rewrite
    def _layer_ctx(self) -> tuple:
        g = self.model.graph
        nodes = list(g.node)
        consts = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.output}
        inits = {t.name: t for t in g.initializer if t.name != MC_INPUT}
        graph_in = {i.name for i in g.input}
        users: dict[str, list[int]] = {}
        for j, n in enumerate(nodes):
            for x in n.input:
                if x:
                    users.setdefault(x, []).append(j)

        def const(name: str):
            if name in graph_in and name in inits:
                return None  # an overridable input, not a constant
            return const_value(name, inits, consts)

        return nodes, const, users, {o.name for o in g.output}

    def describe_layer(self, i: int, ctx: tuple | None = None) -> OnnxLayer | None:
        nodes, const, users, outs = ctx or self._layer_ctx()
        return describe_node(nodes, i, const, users, outs, self.tensor_info)

    def _layer_class(self, i: int, ctx: tuple, kind: str) -> str | None:
        if kind not in ("linear", "conv", "pool", "lstm", "gru"):
            return None
        layer = self.describe_layer(i, ctx)
        return layer.cls if layer is not None else None

    def _dropout_ratio(self, n: onnx.NodeProto) -> float:
        for a in n.attribute:
            if a.name == "ratio":
                return round(float(a.f), 7)  # a float32: 0.2, not 0.20000000298023224
        if len(n.input) > 1 and n.input[1]:
            if n.input[1] in self._inits:
                return round(float(numpy_helper.to_array(self._inits[n.input[1]])), 7)
            for c in self.model.graph.node:
                if c.op_type == "Constant" and c.output[0] == n.input[1]:
                    return round(float(numpy_helper.to_array(c.attribute[0].t)), 7)
        return 0.5

    def _output_region(self, producers: dict[str, int], kinds: list[str]) -> set[int]:
        region: set[int] = set()
        stack = [producers[o.name] for o in self.model.graph.output if o.name in producers]
        while stack:
            i = stack.pop()
            if i in region:
                continue
            region.add(i)
            if kinds[i] in WEIGHTED:
                continue
            stack.extend(producers[x] for x in self.model.graph.node[i].input if x in producers)
        return region

    def _ancestors(self, producers: dict[str, int]) -> dict[int | str, set[int | str]]:
        """Every node's ancestors: node indices, and the graph inputs (by name) they read."""
        nodes = self.model.graph.node

        def inputs(i: int) -> list[int | str]:
            out: list[int | str] = []
            for x in nodes[i].input:
                j = producers.get(x)
                if j is not None and j < i:
                    out.append(j)
                elif x and j is None and not self._is_const(x):
                    out.append(x)  # a graph input
            return out

        return residual.ancestors(range(len(nodes)), inputs)

    def _residual_branch(self, i: int, producers: dict[str, int], anc: dict, kinds: list[str]) -> str | None:
        """The branch operand of residual add ``nodes[i]`` (:func:`dropcli.model.residual.residual_branch`
        on the node graph; graph inputs count for identity skips, not as fork points)."""
        n = self.model.graph.node[i]
        if n.op_type != "Add" or len(n.input) != 2:
            return None
        a, b = n.input
        if a == b or self._is_const(a) or self._is_const(b):
            return None
        pa, pb = producers.get(a), producers.get(b)
        k = residual.residual_branch(a if pa is None else pa, b if pb is None else pb, anc,
                                     lambda j: isinstance(j, int) and kinds[j] in WEIGHTED,
                                     is_source=lambda j: isinstance(j, str))
        return None if k is None else (a, b)[k]

    def dropout_after(self, layer: Layer) -> list:
        """The refs of the dropout that reads ``layer``'s output, when everything that reads it is
        dropout (the model's own, or a dropcli site); else []."""
        kind, ref = layer.ref
        node = None if kind == "input" else self.model.graph.node[ref]
        name = ref if kind == "input" else (node.output[0] if node.output else "")
        users = [(j, n) for j, n in enumerate(self.model.graph.node) if name and name in n.input]
        if users and all(n.op_type == "Dropout" or naming.node_site(n.name) is not None for _, n in users):
            return [("node", j) for j, _ in users]
        return []

    def in_recurrence(self, layers: Sequence[Layer]) -> list[Layer]:
        """The ``layers`` that sit inside an unrolled recurrence (an RNN the dynamo exporter writes
        out step by step): their output is read through a *recurrent* weight, one that both makes
        the input of one of these layers (the nearest MatMul/Gemm upstream) and reads its output
        (the nearest downstream). A site there would resample the recurrent state at every step,
        which the non-recurrent placement avoids (Zaremba et al., 2014)."""
        g = self.model.graph
        consts = set(self._inits) | set(self._const_outputs)
        producers: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:  # topological: a node whose inputs are all constant makes a constant (W^T)
            if n.input and all(i in consts or not i for i in n.input):
                consts.update(o for o in n.output if o)
            for o in n.output:
                producers[o] = n
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        mm = ("MatMul", "Gemm")

        def weights(n: onnx.NodeProto) -> set[str]:
            return {i for i in n.input if i in consts}

        def before(node: onnx.NodeProto) -> set[str]:
            found: set[str] = set()
            stack, seen = [i for i in node.input if i], set()
            while stack and len(seen) < 64:
                v = stack.pop()
                if v in seen or v in consts:
                    continue
                seen.add(v)
                p = producers.get(v)
                if p is not None and p.op_type in mm:
                    found |= weights(p)
                elif p is not None:
                    stack.extend(i for i in p.input if i)
            return found

        def after(node: onnx.NodeProto) -> set[str]:
            found: set[str] = set()
            stack, seen = [o for o in node.output if o], set()
            while stack and len(seen) < 64:
                v = stack.pop()
                if v in seen:
                    continue
                seen.add(v)
                for u in consumers.get(v, []):
                    if u.op_type in mm:
                        found |= weights(u)
                    else:
                        stack.extend(o for o in u.output if o)
            return found

        sides = {id(l): (before(g.node[l.ref[1]]), after(g.node[l.ref[1]])) for l in layers if l.ref[0] == "node"}
        recurrent = set().union(*(b & a for b, a in sides.values())) if sides else set()
        return [l for l in layers if id(l) in sides and sides[id(l)][1] & recurrent]

    # ------------------------------------------------------------------ rewriting
    def claim_site_name(self) -> str:
        """The next free ``dropcli_site_N`` (for a site about to be built)."""
        name = naming.site_name(self._site_count)
        self._site_count += 1
        return name

    def _ensure_mc_input(self) -> str:
        g = self.model.graph
        if not any(i.name == MC_INPUT for i in g.input):
            g.input.append(helper.make_tensor_value_info(MC_INPUT, TensorProto.BOOL, []))
        if not any(t.name == MC_INPUT for t in g.initializer):
            g.initializer.append(numpy_helper.from_array(np.array(False), MC_INPUT))
        if self.model.ir_version < 4:
            self.model.ir_version = 4
        return MC_INPUT

    def _taken_names(self) -> set[str]:
        g = self.model.graph
        names = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            names.update(n.output)
            names.add(n.name)
        return names

    def _build_site(self, spec: VariantSpec, params: dict[str, Any], x: str, info: TensorInfo, out: str) -> list[onnx.NodeProto]:
        name = self._last_site = self.claim_site_name()
        mc = self._ensure_mc_input()
        b = OnnxBuilder(opset_of(self.model), name, self._taken_names())
        stoch, det = spec.onnx_builder(b, x, info, **params)
        sel = helper.make_node("Where", [mc, stoch, det], [out], name=naming.select_name(name))
        sel.doc_string = naming.select_doc(spec.name, params.get("p"))
        b.nodes.append(sel)
        self.model.graph.initializer.extend(b.initializers)
        return b.nodes

    def _insert_nodes(self, at: int, nodes: Sequence[onnx.NodeProto]) -> None:
        g = self.model.graph
        all_nodes = list(g.node)
        all_nodes[at:at] = list(nodes)
        del g.node[:]
        g.node.extend(all_nodes)

    def replaceable(self, spec: VariantSpec) -> list[Layer]:
        """The nodes a ``REPLACE`` variant can replace (not ones a dropcli site already replaced)."""
        rep = spec.replacement
        names = self._display_names()
        rows = []
        for i, n in enumerate(self.model.graph.node):
            kind = rep.onnx_match(n) if rep is not None else None
            if kind and not any(o.endswith(naming.DET_SUFFIX) for o in n.output):
                rows.append(Layer(names[i], kind, n.op_type, self.tensor_info(n.output[0]).shape if n.output else None,
                                  ref=("node", i)))
        return rows

    def insert(self, layer: Layer, spec: VariantSpec, params: dict[str, Any]) -> str:
        g = self.model.graph
        kind, ref = layer.ref
        if spec.attaches == REPLACE:
            if spec.replacement is not None:  # a variant with its own rewriter (the recurrent family)
                return spec.replacement.onnx_apply(self, ref, spec, params)
            return self.replace_layer(layer, spec, params)
        spec.check_rank(layer.rank, f"layer {layer.name}")
        if kind == "input":
            x = ref
            info = self.tensor_info(x)
            out = f"{x}__dropcli"
            nodes = self._build_site(spec, params, x, info, out)
            for n in g.node:
                for k, inp in enumerate(n.input):
                    if inp == x:
                        n.input[k] = out
            self._insert_nodes(0, nodes)
        elif spec.attaches == RESIDUAL:
            node = g.node[ref]
            producers = {o: i for i, n in enumerate(g.node) for o in n.output}
            kinds = [self._kind(n) for n in g.node]
            branch = self._residual_branch(ref, producers, self._ancestors(producers), kinds)
            if branch is None:
                raise UsageError(f"{layer.name} is not a residual add", "droppath goes on residual adds (see `dropcli inspect`)")
            info = self.tensor_info(branch)
            out = f"{branch}__dropcli_{self._site_count}"
            nodes = self._build_site(spec, params, branch, info, out)
            for k, inp in enumerate(node.input):
                if inp == branch:
                    node.input[k] = out
            self._insert_nodes(ref, nodes)
        else:
            self._insert_after(ref, spec, params)
        return self._last_site

    def _insert_after(self, ref: int, spec: VariantSpec, params: dict[str, Any]) -> None:
        node = self.model.graph.node[ref]
        v = node.output[0]
        info = self.tensor_info(v)
        pre = f"{v}__dropcli_in"
        node.output[0] = pre
        nodes = self._build_site(spec, params, pre, info, v)
        self._insert_nodes(ref + 1, nodes)
        self._vi[pre] = self._vi.get(v, helper.make_empty_tensor_value_info(pre))

    def replace_layer(self, layer: Layer, spec: VariantSpec, params: dict[str, Any]) -> str:
        """Replace the layer at ``layer.ref`` (and the activation right after it, when the
        variant absorbs it) by the variant's subgraph of stock ops; ``dropcli_mc`` selects
        between its MC rule and its test rule."""
        _, i = layer.ref
        return self._replace_layer_at(i, spec, params, layer.name)

    def _replace_layer_at(self, i: int, spec: VariantSpec, params: dict[str, Any], label: str) -> str:
        g = self.model.graph
        ctx = self._layer_ctx()
        lay = self.describe_layer(i, ctx)
        if lay is None or lay.cls not in spec.replaces:
            what = lay.cls if lay is not None else f"a {g.node[i].op_type} node it can't rewrite"
            raise UsageError(f"{spec.name} rewrites {', '.join(spec.replaces)} layers, but {label} is {what}",
                             "choose other layers with --layers/--after (see `dropcli inspect`)")
        nodes, _, users, outs = ctx
        lay.act_node, lay.act = absorbable_activation(nodes, lay, users, outs, spec.absorbs)
        name = self._last_site = self.claim_site_name()
        mc = self._ensure_mc_input()
        b = OnnxBuilder(opset_of(self.model), name, self._taken_names())
        stoch, det = spec.onnx_builder(b, lay, **params)
        stoch = [stoch] if isinstance(stoch, str) else list(stoch)
        det = [det] if isinstance(det, str) else list(det)
        finals = lay.outputs
        if len(stoch) != len(finals) or len(det) != len(finals):
            raise DropcliError(f"internal error: {spec.name}'s ONNX builder made {len(stoch)} outputs for {len(finals)}")
        for k, (s_, d_, out) in enumerate(zip(stoch, det, finals)):
            if not out:
                continue
            sel = helper.make_node("Where", [mc, s_, d_], [out], name=naming.select_name(name, k))
            sel.doc_string = naming.select_doc(spec.name, params.get("p"))
            b.nodes.append(sel)
        replaced = lay.replaced_nodes
        rec = {"variant": spec.name, **params, "layer": {"cls": lay.cls, "name": label, "outputs": finals,
                                                         "nodes": [_node_b64(n) for n in replaced]}}
        gone = {id(n) for n in replaced}
        all_nodes = [n for n in g.node if id(n) not in gone]
        pos = sum(1 for n in list(g.node)[:i] if id(n) not in gone)
        all_nodes[pos:pos] = b.nodes
        del g.node[:]
        g.node.extend(all_nodes)
        g.initializer.extend(b.initializers)
        records = site_records(self.model)
        records[name] = rec
        set_site_records(self.model, records)
        return name

    def replace_dropout(self, layer: Layer, spec: VariantSpec | None, params: dict[str, Any]) -> str | None:
        g = self.model.graph
        _, i = layer.ref
        node = g.node[i]
        restored = self._restore_layer_site(node)
        if restored is not None:
            first, last = restored
            if spec is None:
                return layer.name
            if spec.attaches == REPLACE:
                return self._replace_layer_at(first, spec, params, layer.name)
            spec.check_rank(layer.rank, f"layer {layer.name}")
            self._insert_after(last, spec, params)
            return self._last_site
        if spec is not None and spec.attaches == REPLACE:
            raise UsageError(
                f"{spec.name} rewrites {', '.join(spec.replaces)} layers; it can't take the place of the dropout layer {layer.name}",
                f"inject it with `dropcli inject --variant {spec.name}` (it picks the layers; narrow with --layers)",
            )
        all_nodes = list(g.node)
        if node.op_type == "Where" and naming.is_select(node.name):
            # one of dropcli's own sites: its nodes share the name prefix; its input is the one
            # value they read that none of them makes (besides constants and dropcli_mc)
            prefix = naming.site_scope(naming.node_site(node.name))
            block = [j for j, n in enumerate(all_nodes) if n.name.startswith(prefix)]
            made = {o for j in block for o in all_nodes[j].output}
            consts = {t.name for t in g.initializer} | {MC_INPUT}
            ext = {x for j in block for x in all_nodes[j].input if x and x not in made and x not in consts}
            if len(ext) != 1:
                raise DropcliError(f"cannot find the input of dropcli site {layer.name}")
            x, y = ext.pop(), node.output[0]
            keep_inits = [t for t in g.initializer if not t.name.startswith(prefix)]
            del g.initializer[:]
            g.initializer.extend(keep_inits)
            for j in reversed(block[:-1]):
                del all_nodes[j]
            i = block[0]
        else:
            x, y = node.input[0], node.output[0]
            mask_used = len(node.output) > 1 and any(node.output[1] in n.input for n in g.node)
            if mask_used:
                raise DropcliError(f"dropout {layer.name} has its mask output in use; dropcli can't rewrite it")
        if spec is None:
            new_nodes = [helper.make_node("Identity", [x], [y], name=f"{node.name or y}/removed_dropout")]
        else:
            spec.check_rank(layer.rank, f"layer {layer.name}")
            new_nodes = self._build_site(spec, params, x, self.tensor_info(x), y)
        all_nodes[i:i + 1] = new_nodes
        del g.node[:]
        g.node.extend(all_nodes)
        return self._last_site if spec is not None else layer.name

    def _restore_layer_site(self, node: onnx.NodeProto) -> tuple[int, int] | None:
        """A site that replaced a layer turns back into the layer's original nodes (kept in the
        model's metadata); returns the indices of the first and last restored node, or None
        when ``node`` is not such a site's select node."""
        if not (node.op_type == "Where" and naming.is_select(node.name, any_output=True)):
            return None
        site = naming.node_site(node.name)
        records = site_records(self.model)
        rec = records.get(site, {}).get("layer")
        if not isinstance(rec, dict):
            return None
        g = self.model.graph
        prefix = naming.site_scope(site)
        try:
            originals = [_node_from_b64(t) for t in rec["nodes"]]
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"site {site}: the record of the layer it replaced is unreadable ({e})",
                               "inject again from the original model") from e
        all_nodes = list(g.node)
        block = [j for j, n in enumerate(all_nodes) if n.name.startswith(prefix)]
        selects = {n.name: n for n in all_nodes if n.name.startswith(prefix) and n.op_type == "Where" and naming.is_select(n.name, any_output=True)}
        # the outputs consumers read now (a later site may have renamed them)
        current = []
        for k, orig in enumerate(rec.get("outputs", [])):
            sel = selects.get(naming.select_name(site, k))
            current.append(sel.output[0] if sel is not None else orig)
        rename = {o: c for o, c in zip(rec.get("outputs", []), current) if o != c}
        for n in originals:
            for k, o in enumerate(n.output):
                if o in rename:
                    n.output[k] = rename[o]
        keep_inits = [t for t in g.initializer if not t.name.startswith(prefix)]
        del g.initializer[:]
        g.initializer.extend(keep_inits)
        at = block[0]
        rest = [n for j, n in enumerate(all_nodes) if j not in set(block)]
        rest[at:at] = originals
        del g.node[:]
        g.node.extend(rest)
        records.pop(site, None)
        set_site_records(self.model, records)
        return at, at + len(originals) - 1

    def finalize(self) -> None:
        g = self.model.graph
        if not any(MC_INPUT in n.input for n in g.node):  # every site removed: drop the switch too
            for field in (g.input, g.initializer):
                keep = [v for v in field if v.name != MC_INPUT]
                del field[:]
                field.extend(keep)
        try:
            onnx.checker.check_model(self.model)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"internal error: the rewritten ONNX graph is invalid: {str(e).splitlines()[0][:300]}") from e
        self._infer()

    # ------------------------------------------------------------------ running / saving
    def session(self, disable_dropout_elimination: bool = True, providers: Sequence[str] | None = None,
                deterministic: bool = False):
        """An onnxruntime session on the model. ``deterministic``: the model's own ``Dropout``
        nodes run in inference mode even when exported with ``training_mode=True`` (a model
        exported in training mode would otherwise sample in every run); dropcli's sites follow
        ``dropcli_mc`` as always."""
        import onnxruntime as ort

        model = self.model
        if deterministic and any(n.op_type == "Dropout" and len(n.input) > 2 and n.input[2] for n in model.graph.node):
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            for n in model.graph.node:
                if n.op_type == "Dropout" and len(n.input) > 2:
                    del n.input[2:]  # training_mode defaults to False
        so = ort.SessionOptions()
        so.log_severity_level = 4  # failures raise and are reported in one line
        kwargs: dict[str, Any] = {}
        if disable_dropout_elimination:
            kwargs["disabled_optimizers"] = ["EliminateDropout"]
        return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers or ["CPUExecutionProvider"]), **kwargs)

    def default_output_format(self) -> str:
        return formats.ONNX

    def save(self, path: str | Path, fmt: str | None = None) -> str:
        fmt = fmt or formats.ONNX
        if fmt != formats.ONNX:
            raise UsageError(
                f"dropcli can't convert an ONNX model to {fmt}",
                "write ONNX (the default), or start from the torch model",
            )
        save_onnx(self.model, path, external=self.external)
        return fmt


def save_onnx(model: onnx.ModelProto, path: str | Path, external: bool = False) -> None:
    """Write atomically; with ``external`` the weights go to ``<name>.data`` beside the model."""
    path = Path(path)
    if not external and model.ByteSize() < 1_900_000_000:
        with atomic_path(path) as tmp:
            onnx.save(model, str(tmp))
        return
    if str(path) == "-":
        raise DropcliError("this ONNX model keeps its weights in an external .data file (or is over 2 GB), "
                           "which can't go to stdout", "give -o a file path")
    data_name = path.name + ".data"
    with write_errors(path), atomic_dir(path.resolve().parent) as tmpdir:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        # onnx refuses a location that exists relative to the CURRENT folder (not the model's): a
        # previous output's .data in the working folder would stop the write; save from the
        # temporary folder
        here = os.getcwd()
        os.chdir(tmpdir)
        try:
            onnx.save(m, str(tmpdir / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name, size_threshold=1024)
        finally:
            os.chdir(here)
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, path.resolve().parent / data_name)
        os.replace(tmpdir / path.name, path)


def _json_prop(model: onnx.ModelProto, key: str) -> dict[str, Any]:
    import json

    for p in model.metadata_props:
        if p.key == key:
            with contextlib.suppress(Exception):
                obj = json.loads(p.value)
                return obj if isinstance(obj, dict) else {}
    return {}


def _set_json_prop(model: onnx.ModelProto, key: str, obj: dict[str, Any]) -> None:
    import json

    keep = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if obj:
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=json.dumps(obj, sort_keys=True)))


def site_records(model: onnx.ModelProto) -> dict[str, Any]:
    """The records of the sites that replaced layers, from the model's metadata."""
    return _json_prop(model, SITES_META)


def set_site_records(model: onnx.ModelProto, records: dict[str, Any]) -> None:
    _set_json_prop(model, SITES_META, records)


def model_record(model: onnx.ModelProto) -> dict[str, Any]:
    """What dropcli learned about the whole model (e.g. ``tau`` from ``dropcli finetune``)."""
    return _json_prop(model, MODEL_META)


def set_model_record(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    _set_json_prop(model, MODEL_META, record)


def _node_b64(n: onnx.NodeProto) -> str:
    import base64

    return base64.b64encode(n.SerializeToString()).decode("ascii")


def _node_from_b64(text: str) -> onnx.NodeProto:
    import base64

    n = onnx.NodeProto()
    n.ParseFromString(base64.b64decode(text))
    return n
