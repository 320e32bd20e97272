"""Monte-Carlo dropout engine for ONNX models (onnxruntime).

The model's graph is rewritten ONCE, at construction, into an *MC graph*; each chunk of
B examples x T samples is then ONE session run:

* MC mode: ``Where(dropcli_mc, stochastic, deterministic)`` becomes ``Identity(stochastic)``
  (and any other use of ``dropcli_mc`` reads a constant True); the deterministic branches
  and every output but the first are pruned.
* Noise from outside the graph: every random node (RandomUniformLike, RandomNormalLike,
  RandomUniform, RandomNormal, Bernoulli) whose output is ``[rows, *rest]`` with a static
  ``rest`` (rows on the output's batch axis, :func:`batch_axes`; a ``Transpose`` moves them
  there from axis 0 of the fed input) is replaced by a graph input ``dropcli_noise_k`` fed from
  :class:`dropcli.noise.KeyedNoise` (keyed by seed, call, example index and sample block), so
  an example's samples do not depend on its batch, its neighbours or the chunking. A uniform
  draw read only by ``Less(u, q)`` with a constant q is fed as the bool keep-mask itself
  (KeyedNoise.keep_mask_like: the same bits the torch engine draws). Stock ``Dropout``
  nodes become inverted dropout ``x * Cast(keep) * (1/q)`` with such a fed keep-mask.
  Random nodes whose shape depends on the batch beyond dim 0 (dropcorr's [N, N] noise) stay
  in-graph RNG with a ``seed`` attribute derived from --seed: reproducible for the same
  chunking, but not batch-invariant (:attr:`OnnxRunner.batch_invariant` is False).
* Prefix once: nodes that depend on no noise (transitively) run on the B examples. Every
  float value (or batch-shaped value) the suffix reads from the prefix is tiled in-graph,
  i-major (row = i*T + t): Unsqueeze(1) -> Expand [B, T, ...] -> Reshape [B*T, ...], with T
  from the int64 input ``dropcli_T`` (shape [1]). The axis tiled is the value's own batch axis
  (:func:`batch_axes`: where symbolic shape inference carries the inputs' batch dim), so an
  ONNX LSTM's initial state [dirs, B, hidden] becomes [dirs, B*T, hidden] and its Y
  [seq, dirs, B, hidden] becomes [seq, dirs, B*T, hidden]; axis 0 where the dim is not traced.
  Non-float values that depend on the inputs
  (Shape/Gather/Concat chains, indices, masks) are recomputed in the suffix from the tiled tensors, so the
  suffix sees a batch of B*T. Constants pass through.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dropcli.backends.onnx.model import OnnxModel
from dropcli.model.naming import MC_INPUT, node_site
from dropcli.io.data import InputSpec
from dropcli.errors import DropcliError
from dropcli.engines.keyed import MIN_ROWS, DrawAhead, keep_masks, padded_indices

T_INPUT = "dropcli_T"
NOISE_PREFIX = "dropcli_noise_"
RANDOM_OPS = {"RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "Bernoulli"}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_NP_OF = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
          TensorProto.BOOL: np.bool_}


@dataclass
class NoiseFeed:
    """One external noise input: what to draw, for which call number."""

    name: str
    kind: str  # "uniform" | "normal" | "keep"
    rest: tuple[int, ...]
    call: int
    q: float = 1.0  # keep probability, for kind "keep"
    site: str = ""
    scale: float | None = None  # kind "keep": fed as a float32 mask {0, scale} instead of bool


# --------------------------------------------------------------------------------- helpers
def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names read inside a node's subgraphs (If/Loop/Scan bodies)."""
    out: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            made = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                made.update(n.output)
            for n in g.node:
                out.update(x for x in n.input if x and x not in made)
                out.update(x for x in _subgraph_reads(n) if x not in made)
    return out


def _reads(node: onnx.NodeProto) -> list[str]:
    r = [x for x in node.input if x]
    sub = _subgraph_reads(node)
    return r + sorted(sub - set(r)) if sub else r


def _const_value(name: str, inits: dict[str, onnx.TensorProto], consts: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    n = consts.get(name)
    if n is not None:
        for a in n.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name == "value_float":
                return np.array(a.f, dtype=np.float32)
    return None


def _scope(name: str) -> str | None:
    return name.rsplit("/", 1)[0] if "/" in name else None


def _seed_for(*parts: int) -> float:
    h = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=4).digest()
    return float(int.from_bytes(h, "little") & 0xFFFFFF)  # exactly representable in float32


class _Names:
    def __init__(self, taken: set[str]):
        self.taken = taken

    def __call__(self, hint: str) -> str:
        k = 0
        name = hint
        while name in self.taken:
            k += 1
            name = f"{hint}_{k}"
        self.taken.add(name)
        return name


def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        inferred = model
    g = inferred.graph
    vi = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        if t.name not in vi:
            vi[t.name] = helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    return vi


def _shape_of(vi: onnx.ValueInfoProto | None) -> tuple[int | None, list[int | None] | None]:
    """(elem type, dims) with None for dynamic dims; dims None when the rank is unknown."""
    if vi is None or not vi.type.HasField("tensor_type"):
        return None, None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return tt.elem_type or None, None
    return tt.elem_type or None, [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def batch_axes(vi: dict[str, onnx.ValueInfoProto], batch_dims: set[str]) -> dict[str, int]:
    """The batch axis of each value whose inferred shape carries the inputs' batch dimension.

    ``vi`` is symbolic shape inference's result (:func:`_value_infos`, which propagates the
    inputs' dim names through the graph, shape chains included), ``batch_dims`` the dim names of
    the data inputs' axis 0. A value has a batch axis when exactly one of its axes is one of those
    names: axis 2 for an LSTM's ``Y [seq, dirs, batch, hidden]``, axis 1 for its initial state
    ``[dirs, batch, hidden]``. Values where the name is lost (``unk__`` dims, unknown rank) or
    appears on several axes (a ``[B, B]`` matrix) are left out: the caller decides."""
    out: dict[str, int] = {}
    if not batch_dims:
        return out
    for name, v in vi.items():
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        hits = [k for k, d in enumerate(v.type.tensor_type.shape.dim) if d.dim_param and d.dim_param in batch_dims]
        if len(hits) == 1:
            out[name] = hits[0]
    return out


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DropcliError(
                f"--device {device}: this onnxruntime build has no CUDAExecutionProvider "
                f"(it has {', '.join(ort.get_available_providers())})",
                "install onnxruntime-gpu, or use --device cpu",
            )
        dev_id = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": dev_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def intra_op_threads() -> int:
    """onnxruntime's intra-op threads: OMP_NUM_THREADS when set (as torch reads it), else the CPUs
    this process may run on. onnxruntime's own default ran a chunk 1.6x slower on a 2-CPU machine
    than 2 threads set explicitly (benchmarks/peers.py's job)."""
    import os

    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------- runner
class OnnxRunner:
    """MC dropout over an :class:`OnnxModel`, with the interface of ``dropcli.mc.TorchRunner``."""

    draws_ahead = True  # run(..., then=next chunk): the next chunk's noise is drawn while this one runs
    min_rows = MIN_ROWS  # smaller batches are padded to this (0 for a model saved with a fixed batch)

    def __init__(self, model: OnnxModel, device: str = "cpu"):
        self.model = model
        self.device_name = device
        self._providers = _providers(device)
        self.original = onnx.ModelProto()
        self.original.CopyFrom(model.model)  # the runner sees the model as it is now
        g = self.original.graph
        self._inits = {t.name for t in g.initializer}
        self._inputs = [i for i in g.input if i.name not in self._inits and i.name != MC_INPUT]
        if not self._inputs:
            raise DropcliError("the ONNX model has no inputs")
        if not g.output:
            raise DropcliError("the ONNX model has no outputs")
        self._sites = self._logical_sites(self.original)
        self.noise_feeds: list[NoiseFeed] = []
        self.ingraph_random: list[str] = []  # node names of random ops left in the graph
        self.prefix_nodes: list[str] = []
        self.suffix_nodes: list[str] = []
        self.tiled_values: list[str] = []
        self.duplicated_nodes: list[str] = []
        self.session_runs = 0
        self._mc_session = None
        self._eval_session = None
        self._row_bytes: int | None = None
        self._ahead = DrawAhead()
        self.mc_model: onnx.ModelProto | None = None
        self._pending_inputs: list[onnx.ValueInfoProto] = []
        self._pending_inits: list[onnx.TensorProto] = []
        if self._sites:
            self.mc_model = self._build_mc_model()

    # ------------------------------------------------------------------ description
    @staticmethod
    def _logical_sites(model: onnx.ModelProto) -> list[str]:
        """Sites as a user counts them: a dropcli site (its Where on dropcli_mc) is one site,
        a stock Dropout node is one, and a random op outside any such site is one."""
        names: list[str] = []
        scopes: set[str] = set()
        for n in model.graph.node:
            if n.op_type == "Where" and n.input and n.input[0] == MC_INPUT:
                nm = node_site(n.name) or _scope(n.name) or n.name or n.output[0]
                if nm in names:
                    continue  # a site with several outputs (a rewritten recurrent layer) is one site
                names.append(nm)
                if node_site(n.name):
                    scopes.add(node_site(n.name))  # type: ignore[arg-type]
                elif _scope(n.name):
                    scopes.add(_scope(n.name))  # type: ignore[arg-type]
        for n in model.graph.node:
            if n.op_type == "Dropout":
                names.append(n.name or n.output[0])
            elif n.op_type in RANDOM_OPS:
                s = node_site(n.name) or _scope(n.name)
                if s is None or s not in scopes:
                    names.append(n.name or n.output[0])
        return names

    @property
    def n_sites(self) -> int:
        return len(self._sites)

    def site_names(self) -> list[str]:
        return list(self._sites)

    @property
    def batch_invariant(self) -> bool:
        """True when every random draw is fed from KeyedNoise (no in-graph RNG is left)."""
        return not self.ingraph_random

    def input_specs(self) -> list[InputSpec]:
        specs = []
        for vi in self._inputs:
            et, dims = _shape_of(vi)
            shape = list(dims) if dims is not None else None
            if shape:
                shape[0] = None
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(et)) if et else np.dtype(np.float32)
            specs.append(InputSpec(vi.name, shape, dtype))
        return specs

    # ------------------------------------------------------------------ the rewrite
    def _build_mc_model(self) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(self.original)
        g = m.graph
        taken = {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            taken.update(n.output)
            taken.add(n.name)
        fresh = _Names(taken)

        # inputs: batch dim symbolic; dropcli_mc a constant True; only the first output
        for vi in g.input:
            tt = vi.type.tensor_type
            if vi.name not in self._inits and tt.HasField("shape") and len(tt.shape.dim) > 0:
                d0 = tt.shape.dim[0]
                if d0.HasField("dim_value") or not d0.dim_param:
                    d0.Clear()
                    d0.dim_param = "dropcli_B"
        keep_in = [i for i in g.input if i.name != MC_INPUT]
        del g.input[:]
        g.input.extend(keep_in)
        inits = [t for t in g.initializer if t.name != MC_INPUT]
        del g.initializer[:]
        g.initializer.extend(inits)
        if any(MC_INPUT in _reads(n) for n in g.node):
            g.initializer.append(numpy_helper.from_array(np.array(True), MC_INPUT))
        del g.output[1:]
        nodes = list(g.node)
        for i, n in enumerate(nodes):
            if n.op_type == "Where" and len(n.input) == 3 and n.input[0] == MC_INPUT:
                nodes[i] = helper.make_node("Identity", [n.input[1]], list(n.output), name=n.name)

        # stochastic nodes, numbered in graph order like the torch engine's noise calls
        init_map = {t.name: t for t in g.initializer}
        consts = {n.output[0]: n for n in nodes if n.op_type == "Constant"}
        vi = _value_infos(m)
        users: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for x in _reads(n):
                users.setdefault(x, []).append(i)
        graph_out = {o.name for o in g.output}
        depends_in = self._input_dependence(nodes, {i.name for i in g.input})
        # a random op's rows may sit on another axis (a site on an LSTM's Y [seq, dirs, B, H])
        axes = batch_axes(vi, {i.type.tensor_type.shape.dim[0].dim_param for i in g.input
                               if i.name not in self._inits and len(i.type.tensor_type.shape.dim) > 0})
        new_nodes: list[list[onnx.NodeProto]] = [[n] for n in nodes]
        replaced_less: dict[int, list[onnx.NodeProto]] = {}
        roots: set[str] = set()  # values that are noise inputs or in-graph random outputs
        call = 0
        for i, n in enumerate(nodes):
            if n.op_type not in RANDOM_OPS and n.op_type != "Dropout":
                continue
            site = n.name or n.output[0]
            if n.op_type == "Dropout":
                new_nodes[i] = self._rewrite_dropout(n, i, call, vi, init_map, consts, users, nodes, graph_out, fresh, roots)
                call += 1
                continue
            out = n.output[0]
            et, dims = _shape_of(vi.get(out))
            shape_src = n.input[0] if n.op_type in ("RandomUniformLike", "RandomNormalLike", "Bernoulli") else None
            a = axes.get(out, 0)
            feedable = (shape_src is not None and shape_src in depends_in and dims is not None and len(dims) > a
                        and dims[a] is None and all(d is not None for k, d in enumerate(dims) if k != a))
            if not feedable:
                # keep in-graph (seed set per run), not batch-invariant
                self.ingraph_random.append(site)
                roots.add(out)
                call += 1
                continue
            rest = tuple(int(d) for k, d in enumerate(dims) if k != a)  # type: ignore[arg-type]
            out_type = _attr(n, "dtype")
            if out_type is None:
                out_type = et or TensorProto.FLOAT
            noise = fresh(f"{NOISE_PREFIX}{len(self.noise_feeds)}")
            roots.add(noise)
            fed, at_axis = noise, []  # the noise is fed as [rows, *rest]: rows go back to axis a
            if a:
                fed = fresh(f"{noise}__dropcli_axis{a}")
                perm = [*range(1, a + 1), 0, *range(a + 1, len(dims))]
                at_axis = [helper.make_node("Transpose", [noise], [fed], perm=perm, name=fresh(f"{site}/dropcli_noise_axis"))]
            # a uniform read only by Less(u, const q): feed the keep mask itself
            less_users = [nodes[j] for j in users.get(out, [])]
            q = None
            if n.op_type == "RandomUniformLike" and out not in graph_out and less_users and all(
                    u.op_type == "Less" and u.input[0] == out for u in less_users):
                qs = {None if (v := _const_value(u.input[1], init_map, consts)) is None or v.size != 1 else round(float(v.reshape(())), 7)
                      for u in less_users}
                lo, hi = float(_attr(n, "low", 0.0)), float(_attr(n, "high", 1.0))
                if len(qs) == 1 and None not in qs and lo == 0.0 and hi == 1.0:
                    q = qs.pop()
            fused = self._scaled_keep(users.get(out, []), nodes, users, graph_out, init_map, consts) if q is not None else None
            if fused is not None:
                # Less -> Cast -> Mul(x, .) -> Mul(., 1/q): one Mul by a fed float mask {0, 1/q}
                (cast_j, mul_j, scale_j), x_in, scale = fused
                self.noise_feeds.append(NoiseFeed(noise, "keep", rest, call, q=q, site=site, scale=scale))
                g.input.append(helper.make_tensor_value_info(noise, TensorProto.FLOAT, ["dropcli_rows", *rest]))
                new_nodes[i] = at_axis
                less_j = users[out][0]
                replaced_less[less_j] = []
                new_nodes[cast_j] = new_nodes[mul_j] = []
                sn = nodes[scale_j]
                new_nodes[scale_j] = [helper.make_node("Mul", [x_in, fed], [sn.output[0]], name=fresh(f"{sn.name}/dropcli_keep"))]
            elif q is not None:
                self.noise_feeds.append(NoiseFeed(noise, "keep", rest, call, q=q, site=site))
                g.input.append(helper.make_tensor_value_info(noise, TensorProto.BOOL, ["dropcli_rows", *rest]))
                new_nodes[i] = at_axis
                for j in users.get(out, []):
                    u = nodes[j]
                    replaced_less[j] = [helper.make_node("Identity", [fed], [u.output[0]], name=fresh(f"{u.name}/dropcli_keep"))]
                    roots.add(u.output[0])
            else:
                kind = "normal" if n.op_type == "RandomNormalLike" else "uniform"
                self.noise_feeds.append(NoiseFeed(noise, kind, rest, call, site=site))
                g.input.append(helper.make_tensor_value_info(noise, TensorProto.FLOAT, ["dropcli_rows", *rest]))
                new_nodes[i] = at_axis + self._noise_transform(n, fed, out, out_type, fresh, init_map, g)
            call += 1
        for j, repl in replaced_less.items():
            new_nodes[j] = repl
        nodes = [x for group in new_nodes for x in group]
        self.n_calls = call
        nodes = self._prune(nodes, {o.name for o in g.output})
        nodes = self._split_and_tile(m, nodes, roots, fresh)
        del g.node[:]
        g.node.extend(nodes)
        self._prune_graph(m)
        del g.value_info[:]
        try:
            onnx.checker.check_model(m)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"internal error: the MC graph is invalid: {str(e).splitlines()[0][:300]}") from e
        self._mc_vi = _value_infos(m)
        return m

    @staticmethod
    def _scaled_keep(less_js: list[int], nodes, users, graph_out, init_map, consts):
        """An inverted-dropout pattern on a keep mask: ``Less -> Cast(float) -> Mul(x, mask) ->
        Mul(., c)`` with a scalar constant c, each value read once. ((cast, mul, scale) node
        indices, x, c), or None. Fed as one float mask {0, c}: x * (m * c) is bitwise x * m * c
        (m is 0 or 1), one pass over the tiled rows instead of three."""
        def only_user(name: str) -> int | None:
            us = users.get(name, [])
            return us[0] if len(us) == 1 and name not in graph_out else None

        if len(less_js) != 1:
            return None
        cast_j = only_user(nodes[less_js[0]].output[0])
        if cast_j is None or nodes[cast_j].op_type != "Cast" or _attr(nodes[cast_j], "to") != TensorProto.FLOAT:
            return None
        m = nodes[cast_j].output[0]
        mul_j = only_user(m)
        if mul_j is None or nodes[mul_j].op_type != "Mul" or list(nodes[mul_j].input).count(m) != 1:
            return None
        x_in = [v for v in nodes[mul_j].input if v != m][0]
        scale_j = only_user(nodes[mul_j].output[0])
        if scale_j is None or nodes[scale_j].op_type != "Mul":
            return None
        a, b = nodes[scale_j].input
        c_name = b if a == nodes[mul_j].output[0] else a if b == nodes[mul_j].output[0] else None
        c = _const_value(c_name, init_map, consts) if c_name and c_name != nodes[mul_j].output[0] else None
        if c is None or c.size != 1 or c.dtype != np.float32:
            return None
        return (cast_j, mul_j, scale_j), x_in, float(c.reshape(()))

    @staticmethod
    def _input_dependence(nodes: Sequence[onnx.NodeProto], inputs: set[str]) -> set[str]:
        dep = set(inputs)
        for n in nodes:
            if any(x in dep for x in _reads(n)):
                dep.update(o for o in n.output if o)
        return dep

    def _rewrite_dropout(self, n, i, call, vi, init_map, consts, users, nodes, graph_out, fresh, roots):
        x, y = n.input[0], n.output[0]
        if len(n.output) > 1 and n.output[1] and (users.get(n.output[1]) or n.output[1] in graph_out):
            raise DropcliError(f"Dropout node {n.name or y} has its mask output in use; dropcli can't run it as an MC site")
        ratio = _attr(n, "ratio")
        if ratio is None and len(n.input) > 1 and n.input[1]:
            v = _const_value(n.input[1], init_map, consts)
            if v is None:
                raise DropcliError(f"Dropout node {n.name or y} has a ratio that is not a constant")
            ratio = float(v.reshape(()))
        p = round(float(0.5 if ratio is None else ratio), 7)
        q = 1.0 - p
        et, dims = _shape_of(vi.get(x))
        if dims is None or len(dims) < 1 or dims[0] is not None or any(d is None for d in dims[1:]):
            raise DropcliError(f"Dropout node {n.name or y}: the non-batch sizes of its input are unknown or dynamic",
                               "export the model with fixed non-batch sizes")
        rest = tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
        et = et or TensorProto.FLOAT
        noise = fresh(f"{NOISE_PREFIX}{len(self.noise_feeds)}")
        nm = n.name or y
        if et == TensorProto.FLOAT and q > 0.0:  # one Mul by a fed float mask {0, 1/q}
            scale = float(np.float32(1.0 / q))
            self.noise_feeds.append(NoiseFeed(noise, "keep", rest, call, q=q, site=nm, scale=scale))
            self._pending_inputs.append(helper.make_tensor_value_info(noise, TensorProto.FLOAT, ["dropcli_rows", *rest]))
            roots.add(noise)
            return [helper.make_node("Mul", [x, noise], [y], name=fresh(f"{nm}/dropcli_keep"))]
        self.noise_feeds.append(NoiseFeed(noise, "keep", rest, call, q=q, site=nm))
        self._pending_inputs.append(helper.make_tensor_value_info(noise, TensorProto.BOOL, ["dropcli_rows", *rest]))
        roots.add(noise)
        if q <= 0.0:
            return [helper.make_node("Mul", [x, self._scalar(0.0, et, fresh)], [y], name=fresh(f"{nm}/dropcli_zero"))]
        mask = fresh(f"{nm}/dropcli_mask")
        xm = fresh(f"{nm}/dropcli_xm")
        return [
            helper.make_node("Cast", [noise], [mask], to=et, name=fresh(f"{nm}/dropcli_cast")),
            helper.make_node("Mul", [x, mask], [xm], name=fresh(f"{nm}/dropcli_mul")),
            helper.make_node("Mul", [xm, self._scalar(1.0 / q, et, fresh)], [y], name=fresh(f"{nm}/dropcli_scale")),
        ]

    def _scalar(self, value: float, et: int, fresh: _Names) -> str:
        name = fresh("dropcli_const")
        self._pending_inits.append(numpy_helper.from_array(np.array(value, dtype=helper.tensor_dtype_to_np_dtype(et)), name))
        return name

    def _noise_transform(self, n, noise, out, out_type, fresh, init_map, g) -> list[onnx.NodeProto]:
        """Nodes that turn the fed U(0,1) / N(0,1) noise into what the random node made."""
        nm = n.name or out
        res: list[onnx.NodeProto] = []
        cur = noise
        if n.op_type == "Bernoulli":
            less = fresh(f"{nm}/dropcli_less")
            res.append(helper.make_node("Less", [noise, self._cast_like(n.input[0], res, fresh, nm)], [less], name=fresh(f"{nm}/dropcli_lt")))
            res.append(helper.make_node("Cast", [less], [out], to=out_type, name=fresh(f"{nm}/dropcli_cast")))
            return res
        if n.op_type == "RandomNormalLike":
            a, b = float(_attr(n, "mean", 0.0)), float(_attr(n, "scale", 1.0))
        else:
            lo, hi = float(_attr(n, "low", 0.0)), float(_attr(n, "high", 1.0))
            a, b = lo, hi - lo
        if b != 1.0:
            t = fresh(f"{nm}/dropcli_scaled")
            res.append(helper.make_node("Mul", [cur, self._scalar(b, TensorProto.FLOAT, fresh)], [t], name=fresh(f"{nm}/dropcli_mul")))
            cur = t
        if a != 0.0:
            t = fresh(f"{nm}/dropcli_shifted")
            res.append(helper.make_node("Add", [cur, self._scalar(a, TensorProto.FLOAT, fresh)], [t], name=fresh(f"{nm}/dropcli_add")))
            cur = t
        if out_type != TensorProto.FLOAT:
            res.append(helper.make_node("Cast", [cur], [out], to=out_type, name=fresh(f"{nm}/dropcli_cast")))
        else:
            res.append(helper.make_node("Identity", [cur], [out], name=fresh(f"{nm}/dropcli_noise")))
        return res

    def _cast_like(self, p: str, res: list, fresh: _Names, nm: str) -> str:
        """Bernoulli's probabilities as float32 (the fed uniform's type)."""
        c = fresh(f"{nm}/dropcli_p32")
        res.append(helper.make_node("Cast", [p], [c], to=TensorProto.FLOAT, name=fresh(f"{nm}/dropcli_castp")))
        return c

    @staticmethod
    def _prune(nodes: Sequence[onnx.NodeProto], needed_outputs: set[str]) -> list[onnx.NodeProto]:
        need = set(needed_outputs)
        keep = []
        for n in reversed(nodes):
            if any(o in need for o in n.output):
                keep.append(n)
                need.update(_reads(n))
        return list(reversed(keep))

    @staticmethod
    def _prune_graph(m: onnx.ModelProto) -> None:
        g = m.graph
        used = {x for n in g.node for x in _reads(n)} | {o.name for o in g.output}
        inits = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(inits)

    def _split_and_tile(self, m: onnx.ModelProto, nodes: list[onnx.NodeProto], roots: set[str],
                        fresh: _Names) -> list[onnx.NodeProto]:
        g = m.graph
        # inputs added while rewriting
        g.input.extend(self._pending_inputs)
        g.initializer.extend(self._pending_inits)
        self._pending_inputs, self._pending_inits = [], []
        tmp = onnx.ModelProto()
        tmp.CopyFrom(m)
        del tmp.graph.node[:]
        tmp.graph.node.extend(nodes)
        vi = _value_infos(tmp)
        noise_names = {f.name for f in self.noise_feeds}
        data_inputs = {i.name for i in g.input if i.name not in noise_names}
        # stochastic closure
        stoch_vals = set(roots)
        suffix: list[onnx.NodeProto] = []
        prefix: list[onnx.NodeProto] = []
        for n in nodes:
            if any(x in stoch_vals for x in _reads(n)) or n.op_type in RANDOM_OPS:
                stoch_vals.update(n.output)
                suffix.append(n)
            else:
                prefix.append(n)
        dep = self._input_dependence(prefix, data_inputs)
        made_by = {o: n for n in prefix for o in n.output}
        mid: list[onnx.NodeProto] = []
        mapped: dict[str, str] = {}
        T = T_INPUT
        g.input.append(helper.make_tensor_value_info(T_INPUT, TensorProto.INT64, [1]))
        one = fresh("dropcli_one")
        g.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), one))
        zero = fresh("dropcli_zero_i")
        g.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), zero))
        big = fresh("dropcli_big")
        g.initializer.append(numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), big))
        minus1 = fresh("dropcli_minus1")
        g.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), minus1))

        tiles: dict[str, tuple[str, str, str, str, int, int]] = {}
        # each crossing value is tiled along ITS batch axis (an LSTM's state is [dirs, batch, hidden])
        axes = batch_axes(vi, {d.dim_param for i in g.input if i.name in data_inputs
                               for d in i.type.tensor_type.shape.dim[:1] if d.dim_param})

        def tile(v: str) -> str:
            a = axes.get(v, 0)
            s = fresh(f"{v}__dropcli_shape")
            head = fresh(f"{v}__dropcli_b")
            tail = fresh(f"{v}__dropcli_rest")
            u = fresh(f"{v}__dropcli_unsq")
            bt = fresh(f"{v}__dropcli_btshape")
            e = fresh(f"{v}__dropcli_exp")
            rs = fresh(f"{v}__dropcli_rowshape")
            out = fresh(f"{v}__dropcli_tiled")
            mid.append(helper.make_node("Shape", [v], [s], name=fresh(f"{v}/dropcli_tile_shape")))
            if a == 0:
                at1, lead = one, []
            else:  # [*lead, B, *rest] -> [*lead, B, T, *rest] -> [*lead, B*T, *rest]
                at, at1, pre = (fresh(f"{v}__dropcli_axis"), fresh(f"{v}__dropcli_axis1"), fresh(f"{v}__dropcli_lead"))
                g.initializer.extend([numpy_helper.from_array(np.array([a], dtype=np.int64), at),
                                      numpy_helper.from_array(np.array([a + 1], dtype=np.int64), at1)])
                mid.append(helper.make_node("Slice", [s, zero, at], [pre], name=fresh(f"{v}/dropcli_tile_lead")))
                lead = [pre]
            mid.extend([
                helper.make_node("Slice", [s, zero, at1], [head], name=fresh(f"{v}/dropcli_tile_head")),
                helper.make_node("Slice", [s, at1, big], [tail], name=fresh(f"{v}/dropcli_tile_tail")),
                helper.make_node("Unsqueeze", [v, at1], [u], name=fresh(f"{v}/dropcli_tile_unsqueeze")),
                helper.make_node("Concat", [head, T, tail], [bt], axis=0, name=fresh(f"{v}/dropcli_tile_btshape")),
                helper.make_node("Expand", [u, bt], [e], name=fresh(f"{v}/dropcli_tile_expand")),
                helper.make_node("Concat", [*lead, minus1, tail], [rs], axis=0, name=fresh(f"{v}/dropcli_tile_rowshape")),
                helper.make_node("Reshape", [e, rs], [out], name=fresh(f"{v}/dropcli_tile_reshape")),
            ])
            self.tiled_values.append(v)
            if a == 0:  # fed masks are [rows, ...]: only an axis-0 tile can fuse with one
                tiles[out] = (v, u, bt, rs, len(mid) - 3, len(mid) - 1)  # the Expand and Reshape that fusing can drop
            return out

        def as_suffix(v: str, recompute: bool = False) -> str:
            """The name under which the suffix reads prefix value v. ``recompute``: rebuild v from
            the tiled tensors even when it is a float (the shape input of an in-graph random op)."""
            key = v + "\0recompute" if recompute else v
            if key in mapped:
                return mapped[key]
            if v not in dep:
                mapped[key] = v  # constants and initializer-only subgraphs
                return v
            if recompute and v in made_by and v not in axes:
                return dup(v, key)
            if v in mapped:  # a value with one batch axis: its tiled copy has the recomputed shape
                return mapped[v]
            et, dims = _shape_of(vi.get(v))
            batchy = dims is not None and len(dims) >= 1 and (dims[0] is None or v in axes)
            # floats are tiled; an integer or bool value (an index, a mask, a shape) is rebuilt from
            # the tiled values: an index such as Range(B) * S + last means rows of the batch it was
            # made for, and only a rebuilt copy means the tiled rows
            if et in _FLOAT_TYPES and (dims is None or len(dims) >= 1) or (batchy and et is None) or v in data_inputs:
                if dims is not None and len(dims) == 0:
                    mapped[v] = v
                else:
                    mapped[v] = tile(v)
                return mapped[v]
            # a non-float value computed from the inputs (a shape chain): recompute it
            return dup(v, v)

        def dup(v: str, key: str) -> str:
            n = made_by[v]
            if _subgraph_reads(n):
                raise DropcliError(f"node {n.name or v} (with subgraphs) feeds the stochastic part; dropcli's ONNX MC engine can't tile it")
            ins = [as_suffix(x) if x else "" for x in n.input]
            outs = []
            for o in n.output:
                if o:
                    name = fresh(f"{o}__dropcli_dup")
                    mapped[o if key == v else o + "\0recompute"] = name
                    outs.append(name)
                else:
                    outs.append("")
            node = onnx.NodeProto()
            node.CopyFrom(n)
            node.name = fresh(f"{n.name or v}/dropcli_dup")
            del node.input[:]
            node.input.extend(ins)
            del node.output[:]
            node.output.extend(outs)
            mid.append(node)
            self.duplicated_nodes.append(n.name or v)
            return mapped[key]

        stoch_made = {o for n in suffix for o in n.output}
        new_suffix = []
        for n in suffix:
            sub = _subgraph_reads(n)
            if any(x not in stoch_made and x in dep for x in sub):
                raise DropcliError(f"node {n.name} (with subgraphs) reads batch values in the stochastic part; "
                                   "dropcli's ONNX MC engine can't tile it")
            c = onnx.NodeProto()
            c.CopyFrom(n)
            for k, x in enumerate(n.input):
                if x and x not in stoch_made and x not in noise_names:
                    c.input[k] = as_suffix(x, recompute=n.op_type in RANDOM_OPS)
            new_suffix.append(c)
        out_name = g.output[0].name
        if out_name not in stoch_made:  # the output does not depend on noise: tile it too
            new_out = fresh(f"{out_name}__dropcli_out")
            mid.append(helper.make_node("Identity", [as_suffix(out_name)], [new_out], name=fresh("dropcli_out")))
            g.output[0].name = new_out
        new_suffix = self._fuse_tile_and_mask(new_suffix, mid, tiles, g, fresh, vi)
        self.prefix_nodes = [n.name for n in prefix]
        self.suffix_nodes = [n.name for n in new_suffix]
        return prefix + mid + new_suffix

    def _fuse_tile_and_mask(self, suffix: list[onnx.NodeProto], mid: list[onnx.NodeProto],
                            tiles: dict[str, tuple[str, str, str, str, int, int]], g: onnx.GraphProto,
                            fresh: _Names, vi: dict[str, onnx.ValueInfoProto]) -> list[onnx.NodeProto]:
        """A site right after the prefix multiplies the tiled value by its fed float mask of the
        same shape: make that ``Mul(Unsqueeze(v, 1) [B, 1, ...], mask as [B, T, ...])``, so the T
        copies of v are never written out (the same products, one pass fewer over the B*T rows).
        Masks that broadcast (one per channel, one per example) keep the tiled path."""
        scaled = {f.name: f.rest for f in self.noise_feeds if f.kind == "keep" and f.scale is not None}
        readers: dict[str, int] = {}
        for n in mid + suffix:
            for x in _reads(n):
                readers[x] = readers.get(x, 0) + 1
        outs = {o.name for o in g.output}
        drop: set[int] = set()
        res = []
        for n in suffix:
            ins = list(n.input)
            if n.op_type == "Mul" and len(ins) == 2 and len(set(ins) & set(scaled)) == 1:
                mask = ins[0] if ins[0] in scaled else ins[1]
                tiled = ins[1] if mask == ins[0] else ins[0]
                v = tiles[tiled][0] if tiled in tiles else None
                _, dims = _shape_of(vi.get(v)) if v else (None, None)
                if v and readers.get(tiled) == 1 and tiled not in outs and dims is not None \
                        and list(dims[1:]) == list(scaled[mask]):
                    _, u, bt, rs, expand_at, reshape_at = tiles[tiled]
                    m3, p3 = fresh(f"{mask}__dropcli_btk"), fresh(f"{n.output[0]}__dropcli_btk")
                    res += [helper.make_node("Reshape", [mask, bt], [m3], name=fresh(f"{n.name}/dropcli_mask_bt")),
                            helper.make_node("Mul", [u, m3], [p3], name=fresh(f"{n.name}/dropcli_tile_mul")),
                            helper.make_node("Reshape", [p3, rs], [n.output[0]], name=fresh(f"{n.name}/dropcli_rows"))]
                    drop.update((expand_at, reshape_at))
                    continue
            res.append(n)
        if drop:
            mid[:] = [n for k, n in enumerate(mid) if k not in drop]
        return res

    # ------------------------------------------------------------------ sessions
    def _session(self, model: onnx.ModelProto):
        import onnxruntime as ort

        so = ort.SessionOptions()
        # FATAL only: a failed run raises, and dropcli reports it in one line (an ERROR log would
        # print onnxruntime's own copy of it first)
        so.log_severity_level = 4
        so.intra_op_num_threads = intra_op_threads()
        # no busy-waiting after a run: the next thing is this process's own work (the next chunk's
        # noise, the other session), which spinning pool threads would slow down
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        kwargs: dict[str, Any] = {}
        if any(n.op_type == "Dropout" for n in model.graph.node):
            kwargs["disabled_optimizers"] = ["EliminateDropout"]
        try:
            return ort.InferenceSession(model.SerializeToString(), so, providers=self._providers, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise DropcliError(f"onnxruntime cannot run the model: {str(e).splitlines()[0][:300]}") from e

    def _eval_model(self) -> onnx.ModelProto:
        """The original model, dropcli_mc at its default (False) and stock Dropout in inference mode."""
        m = onnx.ModelProto()
        m.CopyFrom(self.original)
        nodes = list(m.graph.node)
        used = {x for n in nodes for x in _reads(n)} | {o.name for o in m.graph.output}
        for i, n in enumerate(nodes):
            if n.op_type == "Dropout":
                if len(n.output) > 1 and n.output[1] in used:
                    d = onnx.NodeProto()
                    d.CopyFrom(n)
                    del d.input[1:]  # no training_mode: inference
                    nodes[i] = d
                else:
                    nodes[i] = helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name)
        del m.graph.node[:]
        m.graph.node.extend(nodes)
        return m

    # ------------------------------------------------------------------ running
    def _pad(self, xs: Sequence[np.ndarray], indices: Sequence[int] | None = None):
        B0 = len(xs[0])
        if B0 >= self.min_rows:
            return [np.ascontiguousarray(x) for x in xs], list(indices or []), B0
        pad = self.min_rows - B0
        # BLAS takes other code paths for tiny matrices; padding keeps results batch-size independent
        xs = [np.concatenate([x, np.repeat(x[:1], pad, axis=0)]) for x in xs]
        idx = list(indices or []) + [-1 - k for k in range(pad)]
        return xs, idx, B0

    def _feeds(self, xs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if len(xs) != len(self._inputs):
            raise DropcliError(f"the model takes {len(self._inputs)} inputs, got {len(xs)}")
        return {vi.name: x for vi, x in zip(self._inputs, xs)}

    def run(self, xs: Sequence[np.ndarray], indices: Sequence[int], seed: int, T: int, t0: int = 0,
            then: tuple[Sequence[int], int, int] | None = None) -> np.ndarray:
        """Outputs of T samples for B examples: [B, T, ...] float32 (first model output).

        ``then``: (indices, T, t0) of the chunk that comes next, with the same seed; its noise
        is drawn in a background thread while this chunk's session runs (the same bits)."""
        if self.mc_model is None:
            raise DropcliError("the model has no dropout sites, so MC dropout has nothing to sample")
        xs, idx, B0 = self._pad(xs, indices)
        B = len(xs[0])
        feeds = self._feeds(xs)
        feeds[T_INPUT] = np.array([T], dtype=np.int64)
        rows = B * T
        noise = self._ahead.take((int(seed), tuple(idx), int(t0), int(T)))
        if noise is None:
            noise = self.draw_noise(seed, idx, t0, T)
        if then is not None:
            nidx, nT, nt0 = padded_indices(then[0]), int(then[1]), int(then[2])
            self._ahead.submit((int(seed), tuple(nidx), nt0, nT), self.draw_noise, seed, nidx, nt0, nT)
        feeds.update(noise)
        del noise
        sess = self._mc_sess(seed, idx, t0)
        self.session_runs += 1
        out = sess.run([self.mc_model.graph.output[0].name], feeds)[0]
        out = np.asarray(out)
        if out.shape[0] != rows:
            raise DropcliError(f"internal error: the MC graph returned {out.shape[0]} rows, expected {B}x{T}")
        return out.reshape((B, T) + out.shape[1:])[:B0].astype(np.float32, copy=False)

    def draw_noise(self, seed: int, idx: Sequence[int], t0: int, T: int) -> dict[str, np.ndarray]:
        """The noise inputs of one chunk: the same draws as the torch engine's KeyedNoise. Keep-masks
        come from dropcli.engines.keyed (numpy, all of a chunk's generators in one pass); torch is
        imported only for uniform or normal noise (the noise variants) or a keep-mask that torch
        draws as uniforms."""
        out: dict[str, np.ndarray] = {}
        keeps = [f for f in self.noise_feeds if f.kind == "keep"]
        masks = keep_masks(seed, idx, t0, t0 + T, [(f.call, f.rest, f.q) for f in keeps], [f.scale for f in keeps])
        rest = [f for f, m in zip(keeps, masks) if m is None]
        out.update({f.name: m for f, m in zip(keeps, masks) if m is not None})
        rest += [f for f in self.noise_feeds if f.kind != "keep"]
        if rest:
            import torch

            from dropcli.engines.noise import KeyedNoise

            noise = KeyedNoise(seed, idx, t0, t0 + T)
            for f in rest:
                noise.call = f.call
                if f.kind == "keep":
                    m = noise.keep_mask_like(torch.empty((len(idx) * T,) + f.rest), f.q).numpy()
                    out[f.name] = m if f.scale is None else np.where(m, np.float32(f.scale), np.float32(0))
                elif f.kind == "uniform":
                    out[f.name] = noise.uniform_np(f.rest)
                else:
                    out[f.name] = noise.normal_np(f.rest)
        return out

    def _mc_sess(self, seed: int, idx: Sequence[int], t0: int):
        assert self.mc_model is not None
        if not self.ingraph_random:
            if self._mc_session is None:
                self._mc_session = self._session(self.mc_model)
            return self._mc_session
        # in-graph RNG: seeds derived from (--seed, chunk), in a fresh session, so a seeded run
        # repeats (for the same chunking)
        m = onnx.ModelProto()
        m.CopyFrom(self.mc_model)
        k = 0
        for n in m.graph.node:
            if n.op_type in RANDOM_OPS:
                for a in list(n.attribute):
                    if a.name == "seed":
                        n.attribute.remove(a)
                n.attribute.append(helper.make_attribute("seed", _seed_for(int(seed), k, int(idx[0]), len(idx), int(t0))))
                k += 1
        return self._session(m)

    def run_eval(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        """The deterministic (inference-mode) pass of the original model: [B, ...]."""
        xs, _, B0 = self._pad(xs)
        if self._eval_session is None:
            self._eval_session = self._session(self._eval_model())
        out = self._eval_session.run([self.original.graph.output[0].name], self._feeds(xs))[0]
        return np.asarray(out)[:B0].astype(np.float32, copy=False)

    def row_bytes(self, inputs: Sequence[np.ndarray]) -> int:
        """Bytes per tiled row of all suffix values (noise feeds included), from shape inference
        on the MC graph; a value with unknown non-batch sizes counts as the largest known one."""
        if self._row_bytes is not None:
            return self._row_bytes
        if self.mc_model is None:
            return 1
        vi = self._mc_vi
        names: list[str] = [f.name for f in self.noise_feeds]
        suffix = set(self.suffix_nodes)
        for n in self.mc_model.graph.node:
            if n.name in suffix or "__dropcli_tiled" in "".join(n.output):
                names.extend(o for o in n.output if o)
        # the noise feeds count twice: the next chunk's noise is drawn while this chunk runs
        names += [f.name for f in self.noise_feeds]
        sizes: list[int] = []
        unknown = 0
        for v in names:
            et, dims = _shape_of(vi.get(v))
            if dims is None or len(dims) == 0 or any(d is None for d in dims[1:]) or et is None:
                unknown += 1
                continue
            item = np.dtype(helper.tensor_dtype_to_np_dtype(et)).itemsize
            sizes.append(int(np.prod([int(d) for d in dims[1:]], dtype=np.int64)) * item)
        total = sum(sizes) + unknown * (max(sizes) if sizes else 4096)
        self._row_bytes = max(1, total)
        return self._row_bytes

    def __getstate__(self):  # pragma: no cover - sessions don't pickle
        d = dict(self.__dict__)
        d["_mc_session"] = d["_eval_session"] = None
        return d
