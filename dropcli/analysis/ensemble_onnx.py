"""`dropcli analyze` for ONNX models.

The units after each site are captured through the MC engine itself: a copy of the model
gets, as its FIRST output, Concat(Flatten(model output), Flatten(S_1), Flatten(O_1), ...), so
one :class:`dropcli.mc_onnx.OnnxRunner` run draws the same keyed masks as for the model's own
output (same sites, same call order) and S, O and the output are paired sample for sample.
The deterministic values (S*, O*, the site inputs I) are extra outputs of the eval graph.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from dropcli.analysis.ensemble import SiteUnits, assemble, var_delta
from dropcli.backends.onnx.model import OnnxModel
from dropcli.backends.convert import convention_of
from dropcli.errors import DropcliError
from dropcli.model.naming import MC_INPUT, node_site, site_scope

_PASS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
_LINEAR = {"MatMul", "Gemm", "Conv"}
_ACTS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softmax": "softmax", "LeakyRelu": "leaky_relu",
         "Elu": "elu", "Gelu": "gelu", "Softplus": "softplus"}


class OnnxAnalyzer:
    def __init__(self, model: OnnxModel, classification: bool = True):
        self.model = model
        g = model.model.graph
        self.inits = {t.name: t for t in g.initializer}
        self.out_name = g.output[0].name
        self.units: list[SiteUnits] = []
        self.values: list[tuple[str | None, str | None, str | None, str | None]] = []  # (S, O, I, weight)
        layers = [l for l in model.layers() if l.kind == "dropout"]
        noisy = self._noisy()
        for l in layers:
            _, i = l.ref
            node = g.node[i]
            y = node.output[0]
            x = self._site_input(node)
            conv = convention_of(l.dropout_variant, l.op)
            q = 1.0 - float(l.dropout_p) if conv and l.dropout_p is not None else None
            S, O, kind, w, skip = self._follow(y, classification)
            det = x is not None and x not in noisy
            self.units.append(SiteUnits(l.name, q, conv, S, "softmax(output)" if kind == "softmax" else O, kind, det, skip))
            self.values.append((S, O, x, w))

    def _site_input(self, node: onnx.NodeProto) -> str | None:
        g = self.model.model.graph
        if node.op_type == "Dropout":
            return node.input[0]
        prefix = site_scope(node_site(node.name) or node.name.split("/")[0])
        block = [n for n in g.node if n.name.startswith(prefix)]
        made = {o for n in block for o in n.output}
        ext = {v for n in block for v in n.input if v and v not in made and v not in self.inits and v != MC_INPUT}
        return ext.pop() if len(ext) == 1 else None

    def _noisy(self) -> set[str]:
        """Values downstream of any random op or Dropout (the site inputs that are themselves random)."""
        g = self.model.model.graph
        out: set[str] = set()
        for n in g.node:
            if n.op_type in ("Dropout", "RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "Bernoulli") \
                    or any(v in out for v in n.input):
                out.update(n.output)
        return out

    def _follow(self, v: str, classification: bool):
        g = self.model.model.graph
        while True:
            users = [n for n in g.node if v in n.input]
            if len(users) != 1:
                return None, None, "?", None, f"{v} feeds {len(users)} ops; no single layer follows the site"
            n = users[0]
            if n.op_type in _LINEAR and n.input[0] == v:
                break
            if n.op_type in _PASS and n.input[0] == v:
                v = n.output[0]
                continue
            return None, None, "?", None, f"the op after the site ({n.op_type}) is not a linear layer"
        w = n.input[1] if n.input[1] in self.inits else None
        S = n.output[0]
        users = [m for m in g.node if S in m.input]
        if n.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add" and \
                any(a in self.inits for a in users[0].input if a != S):
            S = users[0].output[0]  # the bias add ends the pre-activation
            users = [m for m in g.node if S in m.input]
        if len(users) == 1 and users[0].op_type in _ACTS and S != self.out_name:
            return S, users[0].output[0], _ACTS[users[0].op_type], (w, n), None
        if S == self.out_name and classification:
            return S, S, "softmax", (w, n), None
        return S, S, "linear", (w, n), None

    def _varS(self, k: int, I: np.ndarray) -> np.ndarray | None:
        u = self.units[k]
        S, O, x, wn = self.values[k]
        if wn is None or u.q is None or u.convention is None:
            return None
        w, node = wn
        if w is None or node.op_type == "Conv":
            return None
        W2 = numpy_helper.to_array(self.inits[w]).astype(np.float64) ** 2
        if node.op_type == "Gemm":
            if any(a.name == "transA" and a.i for a in node.attribute):
                return None
            if any(a.name == "transB" and a.i for a in node.attribute):
                W2 = W2.T
            alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.0)
            W2 = W2 * alpha ** 2
        x2 = I.astype(np.float64).reshape(I.shape[0], -1) ** 2 * var_delta(u.q, u.convention)
        if x2.shape[1] != W2.shape[0]:
            return None
        return x2 @ W2

    def capture_model(self) -> tuple[OnnxModel, list[str]]:
        """A copy whose first output concatenates the model output and every S and O, flattened."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model.model)
        g = m.graph
        names = [self.out_name]
        for S, O, _, _ in self.values:
            for v in (S, O):
                if v is not None and v not in names:
                    names.append(v)
        flat = []
        for k, v in enumerate(names):
            f = f"dropcli_analyze_flat_{k}"
            g.node.append(helper.make_node("Flatten", [v], [f], axis=1, name=f))
            flat.append(f)
        g.node.append(helper.make_node("Concat", flat, ["dropcli_analyze_cat"], axis=1, name="dropcli_analyze_cat"))
        out = helper.make_tensor_value_info("dropcli_analyze_cat", onnx.TensorProto.FLOAT, ["dropcli_analyze_n", "dropcli_analyze_k"])
        g.output.insert(0, out)
        return OnnxModel(m, self.model.source), names


def analyze_onnx(model: OnnxModel, xs: Sequence[np.ndarray], labels: np.ndarray | None, T: int, seed: int,
                 batch_size: int = 64, device: str = "cpu", classification: bool = True, progress: Any = None) -> dict[str, Any]:
    from dropcli.engines.onnx_mc import OnnxRunner

    an = OnnxAnalyzer(model, classification)
    if not an.units:
        raise DropcliError("the model has no stochastic dropout sites, so there is no ensemble to analyse",
                           "inject some first with `dropcli inject` (e.g. --variant standard --p 0.2)")
    cap_model, names = an.capture_model()
    runner = OnnxRunner(cap_model, device)
    # the eval graph with the captured values and the site inputs as outputs
    eval_names = list(dict.fromkeys(names + [x for _, _, x, _ in an.values if x is not None]))
    em = runner._eval_model()
    del em.graph.output[:]
    em.graph.output.extend([helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in eval_names])
    esess = runner._session(em)
    n = len(xs[0])
    chunks, evals = [], {v: [] for v in eval_names}
    for i0 in range(0, n, batch_size):
        i1 = min(n, i0 + batch_size)
        part = [x[i0:i1] for x in xs]
        chunks.append(runner.run(part, list(range(i0, i1)), seed, T, 0))  # [B, T, total]
        padded, _, B0 = runner._pad(part)
        res = esess.run(eval_names, runner._feeds(padded))
        for v, r in zip(eval_names, res):
            evals[v].append(np.asarray(r)[:B0].reshape(B0, -1).astype(np.float64))
        if progress:
            progress(i1 - i0)
    cat = np.concatenate(chunks)  # [N, T, total]
    ev = {v: np.concatenate(a) for v, a in evals.items()}
    sizes = [ev[v].shape[1] for v in names]
    offs = np.cumsum([0] + sizes)
    cols = {v: cat[:, :, offs[k]:offs[k + 1]].astype(np.float64) for k, v in enumerate(names)}
    samples = np.swapaxes(cols[an.out_name], 0, 1).astype(np.float32)
    eval_out = ev[an.out_name].astype(np.float32)
    per_site = []
    for k, u in enumerate(an.units):
        S, O, x, _ = an.values[k]
        if u.skip:
            per_site.append((u, None, None, None, None, None))
            continue
        vf = an._varS(k, ev[x]) if x is not None else None
        Ov, Os = (None, None) if u.o_kind == "softmax" else (cols[O], ev[O])
        per_site.append((u, cols[S], ev[S], Ov, Os, vf))
    return assemble(per_site, samples, eval_out, labels, classification)
