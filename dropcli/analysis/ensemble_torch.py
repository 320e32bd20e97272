"""Capturing the units after each dropout site of a torch (fx) model for `dropcli analyze`."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dropcli.analysis.ensemble import SiteUnits, var_delta
from dropcli.errors import DropcliError
from dropcli.backends.torch.fx import ATEN_DROPOUT, DROPOUT_FUNCS, aten_name, fetch_attr, fname, is_linear, linear_input
from dropcli.engines.torch_mc import MIN_ROWS, TorchMC
from dropcli.variants.base import SiteModule, set_mc

# ops that only move or reshape values (a dropout mask passes through them element for element)
_PASS = {"view", "reshape", "flatten", "_unsafe_view", "clone", "contiguous", "alias", "detach"}
_ACTS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "gelu": "gelu", "silu": "silu",
         "elu": "elu", "leaky_relu": "leaky_relu", "softplus": "softplus", "hardtanh": "hardtanh",
         "softmax": "softmax", "_softmax": "softmax", "log_softmax": "log_softmax"}
_ACT_MODULES = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.GELU: "gelu", nn.SiLU: "silu",
                nn.ELU: "elu", nn.LeakyReLU: "leaky_relu", nn.Softplus: "softplus", nn.Softmax: "softmax"}


def _act_kind(n: fx.Node, modules: dict) -> str | None:
    if n.op == "call_module":
        m = modules.get(n.target)
        for cls, k in _ACT_MODULES.items():
            if isinstance(m, cls):
                return k
        return None
    return _ACTS.get(fname(n) or "")


def site_bernoulli(n: fx.Node, modules: dict) -> tuple[float, str] | None:
    """(keep q, convention) for an elementwise Bernoulli site, else None."""
    if n.op == "call_module":
        m = modules.get(n.target)
        if isinstance(m, SiteModule):
            name = m.spec.name
            if name in ("standard", "vanilla"):
                return 1.0 - float(m.p), ("inverted" if name == "standard" else "vanilla")
            return None
        if type(m) is nn.Dropout:
            return 1.0 - float(m.p), "inverted"
        return None
    if n.op == "call_function":
        name = aten_name(n.target)
        if n.target in (F.dropout, torch.dropout) or name in ("dropout", "native_dropout"):
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            return 1.0 - float(p), "inverted"
    return None


class TorchAnalyzer:
    def __init__(self, model: Any, device: str = "cpu", classification: bool = True):
        gm = model.gm
        self.engine = TorchMC(gm, device)
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.units: list[SiteUnits] = []
        self.nodes: list[tuple[fx.Node | None, fx.Node | None, fx.Node]] = []  # (S, O, site output)
        self.inputs: list[fx.Node | None] = []  # each site's input I
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        # a dropcli site saved to TorchScript/.pt2 is a where(dropcli_mc, ...) over raw random
        # ops: one site, read at its where node, with its variant and p from the saved record
        inlined = model.inlined_sites() if hasattr(model, "inlined_sites") else {}
        inside = set().union(*(v[2] for v in inlined.values())) if inlined else set()
        sites: list[tuple[fx.Node, str, fx.Node | None, tuple[float, str] | None, str | None]] = []
        for w, (name, x, _) in inlined.items():
            meta = getattr(model, "site_meta", {}).get(name, {})
            conv = {"standard": "inverted", "vanilla": "vanilla"}.get(meta.get("variant", ""))
            bern = (1.0 - float(meta["p"]), conv) if conv and meta.get("p") is not None else None
            sites.append((w, name, x, bern, None))
        for site in self.engine.site_nodes:
            if site in inside:
                continue
            name = str(site.target) if site.op == "call_module" else site.name
            x = site.args[0] if site.args and isinstance(site.args[0], fx.Node) else None
            skip = "a random op outside any known dropout site" if aten_name(site.target) not in (None, *ATEN_DROPOUT) \
                and site.op == "call_function" and site.target not in DROPOUT_FUNCS else None
            sites.append((site, name, x, site_bernoulli(site, self.modules), skip))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        sites.sort(key=lambda s: order[s[0]])
        for site, name, x, bern, skip0 in sites:
            det_in = x is not None and x not in self.engine.stochastic
            S, O, kind, skip = (None, None, "?", skip0) if skip0 else self._follow(site, out_node, classification)
            u = SiteUnits(name, bern[0] if bern else None, bern[1] if bern else None,
                          S.name if S is not None else None, (O.name if O is not None else None) if kind != "softmax" else "softmax(output)",
                          kind, det_in, skip)
            self.units.append(u)
            self.nodes.append((S, O, site))
            self.inputs.append(x)

    def _follow(self, site: fx.Node, out_node: fx.Node, classification: bool):
        n = site
        while True:
            users = list(n.users)
            if len(users) != 1:
                return None, None, "?", f"{n.name} feeds {len(users)} ops; no single layer follows the site"
            nxt = users[0]
            if is_linear(nxt, self.modules) and linear_input(nxt) is n:
                break
            if fname(nxt) in _PASS or (nxt.op == "call_module" and isinstance(self.modules.get(nxt.target), nn.Flatten)):
                n = nxt
                continue
            what = fname(nxt) or str(nxt.target)
            return None, None, "?", f"the op after the site ({what}) is not a linear layer"
        S = nxt
        users = list(S.users)
        if len(users) == 1 and users[0].op != "output":
            kind = _act_kind(users[0], self.modules)
            if kind:
                return S, users[0], kind, None
        is_out = any(u is out_node for u in users) or (len(users) == 1 and users[0].op == "output")
        if is_out and classification:
            return S, S, "softmax", None
        return S, S, "linear", None

    # ------------------------------------------------------------------ passes
    def capture_nodes(self) -> list[fx.Node]:
        want: list[fx.Node] = []
        for S, O, _ in self.nodes:
            for v in (S, O):
                if v is not None and v not in want:
                    want.append(v)
        return want

    def eval_values(self, xs: Sequence[torch.Tensor]) -> dict[fx.Node, torch.Tensor]:
        """Deterministic pass, keeping every value (the site inputs and the units)."""
        B0 = xs[0].shape[0]
        if B0 < MIN_ROWS:
            xs = [torch.cat([x, x[:1].expand((MIN_ROWS - B0,) + tuple(x.shape[1:]))]) for x in xs]
        keep = set(self.capture_nodes()) | {x for x in self.inputs if x is not None}
        vals: dict[fx.Node, torch.Tensor] = {}

        class Cap(fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                if n in keep:
                    vals[n] = r[:B0]
                return r

        set_mc(self.gm, False)
        try:
            with torch.no_grad():
                Cap(self.gm).run(*[x.to(self.engine.device) for x in xs])
        finally:
            set_mc(self.gm, True)
        return vals

    def varS_formula(self, k: int, vals: dict[fx.Node, torch.Tensor]) -> np.ndarray | None:
        """sum_i w_i^2 I_i^2 Var(delta) per unit of S, for an elementwise Bernoulli site directly
        (or through reshapes) before S; I from the deterministic pass."""
        S, _, site = self.nodes[k]
        u = self.units[k]
        if S is None or u.q is None or u.convention is None:
            return None
        I = vals.get(self.inputs[k]) if self.inputs[k] is not None else None
        if I is None:
            return None
        x = I.double() ** 2 * var_delta(u.q, u.convention)
        # follow the reshapes between the site and S
        n = site
        while True:
            nxt = next(iter(n.users))
            if nxt is S:
                break
            if nxt.op == "call_module":
                x = self.modules[nxt.target](x)
            else:
                args = fx.node.map_arg(nxt.args, lambda a: x if a is n else a)
                kwargs = fx.node.map_arg(nxt.kwargs, lambda a: x if a is n else a)
                if nxt.op == "call_method":
                    x = getattr(args[0], nxt.target)(*args[1:], **kwargs)
                else:
                    x = nxt.target(*args, **kwargs)
            n = nxt
        with torch.no_grad():
            return self._apply_sq(S, x).detach().cpu().numpy().reshape(x.shape[0], -1)

    def _weight(self, a: Any) -> torch.Tensor:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return fetch_attr(self.gm, a.target)
        raise DropcliError("the layer after a site takes its weight from a computed value; Var(S) is not available")

    def _apply_sq(self, S: fx.Node, x: torch.Tensor) -> torch.Tensor:
        """S's op applied to x with squared weights and no bias."""
        if S.op == "call_module":
            m = self.modules[S.target]
            w2 = m.weight.double() ** 2
            if isinstance(m, nn.Linear):
                return F.linear(x, w2)
            return m._conv_forward(x, w2, None)
        name = fname(S)
        if name == "linear":
            return F.linear(x, self._weight(S.args[1]).double() ** 2)
        if name == "addmm":
            return x @ (self._weight(S.args[2]).double() ** 2)
        if name in ("mm", "matmul"):
            return x @ (self._weight(S.args[1]).double() ** 2)
        w2 = self._weight(S.args[1]).double() ** 2
        args = list(S.args) + [None] * 9
        if name in ("conv1d", "conv2d", "conv3d"):
            fn = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[name]
            return fn(x, w2, None, *[a for a in S.args[3:]])
        # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        stride, padding, dilation, transposed, out_pad, groups = args[3], args[4], args[5], args[6], args[7], args[8]
        return torch.ops.aten.convolution(x, w2, None, stride, padding, dilation, transposed, out_pad, groups)

    def penalty(self, k: int, vals: dict[fx.Node, torch.Tensor]) -> float | None:
        """0.5 * sum_j sum_i w_ji^2 I_i^2 Var(delta), averaged over examples."""
        v = self.varS_formula(k, vals)
        if v is None:
            return None
        return float(0.5 * v.sum(-1).mean())


def analyze_torch(model: Any, xs: Sequence[np.ndarray], labels: np.ndarray | None, T: int, seed: int,
                  batch_size: int = 64, device: str = "cpu", classification: bool = True,
                  progress: Any = None) -> dict[str, Any]:
    """The whole `dropcli analyze` report for a torch model (see dropcli.analyze)."""
    from dropcli.analysis.ensemble import assemble

    an = TorchAnalyzer(model, device, classification)
    if not an.units:
        raise DropcliError("the model has no stochastic dropout sites, so there is no ensemble to analyse",
                           "inject some first with `dropcli inject` (e.g. --variant standard --p 0.2)")
    want = an.capture_nodes()
    n = len(xs[0])
    cap: dict[fx.Node, list[np.ndarray]] = {c: [] for c in want}
    ev: dict[fx.Node, list[np.ndarray]] = {c: [] for c in want}
    vsf: list[list[np.ndarray]] = [[] for _ in an.nodes]
    outs, eouts = [], []
    for i0 in range(0, n, batch_size):
        i1 = min(n, i0 + batch_size)
        chunk = [torch.from_numpy(np.ascontiguousarray(x[i0:i1])) for x in xs]
        out = an.engine.run(chunk, list(range(i0, i1)), seed, T, 0, capture=want)
        outs.append(out.float().cpu().numpy().reshape(i1 - i0, T, -1))
        for c in want:
            cap[c].append(an.engine.captured[c].double().cpu().numpy().reshape(i1 - i0, T, -1))
        vals = an.eval_values(chunk)
        for c in want:
            ev[c].append(vals[c].double().cpu().numpy().reshape(i1 - i0, -1))
        eouts.append(an.engine.run_eval(chunk).float().cpu().numpy().reshape(i1 - i0, -1))
        for k in range(len(an.nodes)):
            v = an.varS_formula(k, vals)
            if v is not None:
                vsf[k].append(v)
        if progress:
            progress(i1 - i0)
    samples = np.swapaxes(np.concatenate(outs), 0, 1)  # [T, N, K]
    eval_out = np.concatenate(eouts)
    per_site = []
    for k, (S, O, site) in enumerate(an.nodes):
        u = an.units[k]
        if u.skip:
            per_site.append((u, None, None, None, None, None))
            continue
        Sv, Ss = np.concatenate(cap[S]), np.concatenate(ev[S])
        Ov, Os = (None, None) if u.o_kind == "softmax" else (np.concatenate(cap[O]), np.concatenate(ev[O]))
        per_site.append((u, Sv, Ss, Ov, Os, np.concatenate(vsf[k]) if vsf[k] else None))
    return assemble(per_site, samples, eval_out, labels, classification)
