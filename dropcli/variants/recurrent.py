"""The recurrent dropout family (docs/variants.md, recurrent variants): masks inside an LSTM/GRU recurrence.

These variants *replace* an ``nn.LSTM`` / ``nn.GRU`` (a fused op) with a cell-level loop on
the same trained weights (:class:`dropcli.rnn.RecurrentLoop`). Inference mode runs the fused
op on those weights, so it is exactly the original layer; MC mode runs the loop with masks.
``p`` is the DROP probability, ``q = 1 - p`` the keep probability.

- **rnndrop** (Moon et al. 2015, "RNNDROP: a novel dropout for RNNs in ASR"):
  ``c_t = m * (f_t*c_{t-1} + i_t*g_t)``, one mask ``m ~ Bern(q)`` per sequence (per example,
  layer and direction) reused at every step, applied to the cell state ``c_{t-1}``'s update
  (not ``h_{t-1}``), and **not rescaled** inside the recurrence (a ``1/q`` would compound as
  ``q^-t``). LSTM only: docs/variants.md defines it on the cell state and gives no GRU rule, and
  a GRU has no cell state, so a GRU is refused with a pointer to ``recurrent``/``variational``.
- **recurrent** (Semeniuta et al. 2016, "Recurrent dropout without memory loss"):
  ``c_t = f_t*c_{t-1} + i_t*d(g_t)`` with inverted dropout ``d(g) = g*m/q`` on the candidate
  only; GRU: ``h_t = (1-z_t)*d(n_t) + z_t*h_{t-1}`` (the candidate ``h~ = n_t``). The mask is
  drawn per step (``--mask-per step``, default) or once per sequence (``--mask-per sequence``).
- **variational** (Gal & Ghahramani 2016, "A theoretically grounded application of dropout
  in RNNs"): masks on ``x_t`` and ``h_{t-1}`` drawn once per sequence and reused at every step,
  inverted (``x*m/q``), before the input and recurrent projections, so the biases are never
  scaled. ``--tie tied`` (one mask for all gates) or ``untied`` (one per gate). Every layer's
  input gets the input mask (for layers above the first, that is the layer below's output).
  Defaults ``p_x = p_h = 0.3`` (the paper's). Not ``nn.LSTM(dropout=)``, which only drops
  between stacked layers.

Every mask is drawn through the noise API (:func:`keep_mask_like`), batch-first
(``[B, ...]``), so the MC engine keys it per example. Draw order (also the ONNX graph's):
layer by layer, direction by direction; variational draws the input mask, then the hidden one.

ONNX: the rewrite keeps the original ``LSTM``/``GRU`` node as the inference branch and adds a
``Scan`` (any sequence length; reverse directions by ``scan_input_directions``) for the
stochastic branch, selected by ``Where(dropcli_mc, ...)`` per output. Masks are drawn outside
the Scan from ``RandomUniformLike`` (per-step masks as one ``[B, S, H]`` draw), so onnxruntime
keeps them stochastic and dropcli's ONNX MC engine can feed keyed noise.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo, opset_of
from dropcli.errors import DropcliError, UsageError
from dropcli.model import naming
from dropcli.model.naming import PASS_MARK
from dropcli.backends.torch.fx import aten_name, fetch_attr
from dropcli.backends.torch.rnn import GATES, GRU, LSTM, RecurrentLoop, StepMasks
from dropcli.variants.base import P_PARAM, REPLACE, Param, Replacement, SiteModule, VariantSpec, tracing, check_p, keep_mask_like
from dropcli.variants.registry import register



def _check_mask_per(v: str) -> str | None:
    return None if v in ("step", "sequence") else "must be 'step' or 'sequence'"


def _check_tie(v: str) -> str | None:
    return None if v in ("tied", "untied") else "must be 'tied' or 'untied'"


def _check_opt_p(v: float) -> str | None:
    return check_p(v)


# ------------------------------------------------------------------------------ torch


class RecurrentSite(SiteModule):
    """Base of the recurrent sites: wraps a :class:`RecurrentLoop` and replaces the layer.

    ``forward(x, hx=None)`` returns what the fused layer returns. Inference: the fused op on
    the same weights (bitwise the original). MC: the loop with this variant's masks.
    """

    modes: tuple[str, ...] = (LSTM, GRU)

    def __init__(self, p: float = 0.5, *, rnn: nn.Module | None = None, **params: Any):
        super().__init__(p, **params)
        if rnn is None:
            raise DropcliError(f"{type(self).__name__} replaces a recurrent layer: pass rnn=nn.LSTM/nn.GRU or a RecurrentLoop")
        if isinstance(rnn, (nn.LSTM, nn.GRU)):
            # nn.LSTM(dropout=) acts between stacked layers in training mode only: eval ignores it
            rnn = RecurrentLoop.from_module(rnn)
        if not isinstance(rnn, RecurrentLoop):
            raise DropcliError(f"cannot rewrite {type(rnn).__name__}: dropcli's recurrent variants take nn.LSTM and nn.GRU")
        if rnn.mode not in self.modes:
            raise UsageError(self.refusal(rnn.mode), "choose --variant recurrent or variational for GRU layers")
        self.rnn = rnn

    @classmethod
    def refusal(cls, mode: str) -> str:
        return f"{cls.__name__} does not apply to {mode.upper()} layers"

    # -- masks ------------------------------------------------------------------------
    def masks(self, x: torch.Tensor) -> list[Optional[StepMasks]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _like(self, x: torch.Tensor, *dims: int) -> torch.Tensor:
        """A tensor [B, *dims] of x's dtype/device (only its shape matters to the noise API)."""
        B = x.size(0) if self.rnn.batch_first else x.size(1)
        return x.new_zeros((B,) + tuple(dims))

    def _mask(self, x: torch.Tensor, q: float, scale: float, *dims: int) -> torch.Tensor:
        keep = keep_mask_like(self._like(x, *dims), q)
        m = keep.to(x.dtype)
        return m * scale if scale != 1.0 else m

    def _seq_len(self, x: torch.Tensor) -> int:
        return x.size(1) if self.rnn.batch_first else x.size(0)

    def layer_dirs(self):
        r = self.rnn
        for layer in range(r.num_layers):
            for d in range(r.num_directions):
                in_size = r.input_size(layer)
                yield layer, d, in_size

    # -- running ----------------------------------------------------------------------
    def sample(self, x: torch.Tensor, hx=None):
        return self.rnn(x, hx, masks=self.masks(x))

    def infer(self, x: torch.Tensor, hx=None):
        return self.rnn.fused(x, hx)

    def forward(self, x: torch.Tensor, hx=None):
        if hx is not None and self.params.get("hx_batch_first", False):
            # initial states handed over batch-first ([B, L*D, H]) so an MC engine that tiles dim 0
            # tiles them with the input; the fused op and the loop take [L*D, B, H]
            hx = tuple(h.transpose(0, 1).contiguous() for h in hx) if isinstance(hx, (tuple, list)) else hx.transpose(0, 1).contiguous()
        if tracing():
            s, i = self.sample(x, hx), self.infer(x, hx)
            mc = self.dropcli_mc
            if self.rnn.mode == LSTM:
                return (torch.where(mc, s[0], i[0]), (torch.where(mc, s[1][0], i[1][0]), torch.where(mc, s[1][1], i[1][1])))
            return torch.where(mc, s[0], i[0]), torch.where(mc, s[1], i[1])
        if bool(self.dropcli_mc):
            return self.sample(x, hx)
        return self.infer(x, hx)


class RNNDropSite(RecurrentSite):
    """RNNDrop (Moon et al. 2015): ``c_t = m * (f_t*c_{t-1} + i_t*g_t)``, ``m ~ Bern(q)`` once per
    sequence, no rescaling inside the recurrence. LSTM only. Test: the plain LSTM."""

    modes = (LSTM,)

    @classmethod
    def refusal(cls, mode: str) -> str:
        return ("rnndrop masks the LSTM cell state c_t (Moon 2015); a GRU has no cell state and the variant "
                "catalogue defines no GRU rule")

    def masks(self, x: torch.Tensor) -> list[Optional[StepMasks]]:
        H = self.rnn.hidden_size
        return [StepMasks(c=self._mask(x, self.q, 1.0, H)) for _ in self.layer_dirs()]


class SemeniutaSite(RecurrentSite):
    """Recurrent dropout without memory loss (Semeniuta et al. 2016): inverted dropout on the
    candidate (LSTM ``g_t``, GRU ``n_t``), per step or per sequence. Test: the plain layer."""

    def masks(self, x: torch.Tensor) -> list[Optional[StepMasks]]:
        H = self.rnn.hidden_size
        out: list[Optional[StepMasks]] = []
        per_step = self.params.get("mask_per", "step") == "step"
        S = self._seq_len(x)
        for _ in self.layer_dirs():
            if per_step:
                g = self._mask(x, self.q, 1.0 / self.q, S, H).transpose(0, 1)  # [B, S, H] -> time-major
            else:
                g = self._mask(x, self.q, 1.0 / self.q, H)
            out.append(StepMasks(g=g))
        return out


class VariationalRNNSite(RecurrentSite):
    """Variational RNN dropout (Gal & Ghahramani 2016): per-sequence inverted masks on ``x_t``
    and ``h_{t-1}``, tied or one per gate. Test: the plain layer."""

    def _ps(self) -> tuple[float, float]:
        p_in = self.params.get("p_input")
        p_h = self.params.get("p_hidden")
        return (self.p if p_in is None else float(p_in)), (self.p if p_h is None else float(p_h))

    def masks(self, x: torch.Tensor) -> list[Optional[StepMasks]]:
        p_in, p_h = self._ps()
        untied = self.params.get("tie", "tied") == "untied"
        G = GATES[self.rnn.mode]
        Ho = self.rnn.out_size
        out: list[Optional[StepMasks]] = []
        for _, _, I in self.layer_dirs():
            mx = mh = None
            if p_in > 0:
                mx = self._mask(x, 1.0 - p_in, 1.0 / (1.0 - p_in), *((G, I) if untied else (I,)))
                if untied:
                    mx = mx.transpose(0, 1)  # [B, G, I] -> [G, B, I]
            if p_h > 0:
                mh = self._mask(x, 1.0 - p_h, 1.0 / (1.0 - p_h), *((G, Ho) if untied else (Ho,)))
                if untied:
                    mh = mh.transpose(0, 1)
            out.append(StepMasks(x=mx, h=mh))
        return out


def wrap(spec: VariantSpec, layer: nn.Module, params: dict[str, Any]) -> RecurrentSite:
    """The site that replaces ``layer`` (an nn.LSTM / nn.GRU / RecurrentLoop)."""
    return spec.torch_module(rnn=layer, **params)


_ATEN_RNN = {"lstm": LSTM, "gru": GRU}


def fx_rnn_mode(gm: "torch.fx.GraphModule", n: "torch.fx.Node") -> str | None:
    """``lstm`` / ``gru`` when fx node ``n`` is a recurrent layer dropcli can replace, else None."""
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return LSTM if isinstance(m, nn.LSTM) else GRU if isinstance(m, nn.GRU) else None
    if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
        name = aten_name(n.target)
        if name in _ATEN_RNN and n.target._overloadname == "input":
            return _ATEN_RNN[name]
    return None


def replace_in_fx(gm: "torch.fx.GraphModule", n: "torch.fx.Node", spec: VariantSpec, params: dict[str, Any],
                  site_name: str) -> RecurrentSite:
    """Replace the recurrent layer at fx node ``n`` (an ``nn.LSTM``/``nn.GRU`` call_module, or an
    ``aten.lstm.input``/``aten.gru.input`` call with its flat weights) by ``spec``'s site, added
    to ``gm`` as submodule ``site_name``. The caller recompiles. Initial states go to the site
    batch-first (a transpose in the graph), so MC engines that tile dim 0 tile them too."""
    from torch import fx

    mode = fx_rnn_mode(gm, n)
    if mode is None:
        raise UsageError(f"{spec.name} replaces LSTM and GRU layers; node {n.name} is neither")
    if n.op == "call_module":
        layer = gm.get_submodule(n.target)
        x = n.args[0] if n.args else n.kwargs.get("input")
        hx = n.args[1] if len(n.args) > 1 else n.kwargs.get("hx")
        loop = RecurrentLoop.from_module(layer)
    else:
        x, hx, flat, has_biases, num_layers, _dropout, train, bidirectional, batch_first = n.args[:9]
        if train:
            raise DropcliError(f"{n.name} runs the recurrent layer in training mode; dropcli rewrites eval-mode graphs")
        weights = []
        for w in flat:
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                raise DropcliError(f"{n.name}: a weight of the {mode.upper()} is computed in the graph; dropcli needs stored weights")
            weights.append(fetch_attr(gm, w.target))
        loop = RecurrentLoop.from_flat(mode, weights, has_biases=bool(has_biases), num_layers=int(num_layers),
                                       bidirectional=bool(bidirectional), batch_first=bool(batch_first))
    if not loop.batch_first:
        # dropcli's MC engines keep examples on dim 0; a time-major layer inside a batch-first
        # model is fed transposed values, which they can't tile
        raise UsageError(f"{n.name} is a time-major (batch_first=False) {mode.upper()}",
                         "dropcli rewrites batch_first recurrent layers; export the model with batch_first=True")
    site = spec.torch_module(rnn=loop, **params, hx_batch_first=hx is not None)
    gm.add_submodule(site_name, site)
    g = gm.graph
    with g.inserting_before(n):
        hx_arg = None
        if hx is not None:
            hs = list(hx) if isinstance(hx, (list, tuple)) else [hx]
            ts = [g.call_function(torch.transpose, (h, 0, 1)) for h in hs]
            hx_arg = tuple(ts) if isinstance(hx, (list, tuple)) else ts[0]
        new = g.call_module(site_name, (x, hx_arg) if hx_arg is not None else (x,))
    if n.op == "call_module" or mode == GRU:
        n.replace_all_uses_with(new)  # the same outputs as the fused op
    else:
        # aten.lstm.input returns (output, h_n, c_n); the site returns (output, (h_n, c_n))
        with g.inserting_after(new):
            out = g.call_function(operator.getitem, (new, 0))
            with g.inserting_after(out):
                hc = g.call_function(operator.getitem, (new, 1))
                with g.inserting_after(hc):
                    hn = g.call_function(operator.getitem, (hc, 0))
                    with g.inserting_after(hn):
                        cn = g.call_function(operator.getitem, (hc, 1))
        parts = [out, hn, cn]
        for u in list(n.users):
            if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
                u.replace_all_uses_with(parts[u.args[1]])
                g.erase_node(u)
            else:
                raise DropcliError(f"{n.name}'s output tuple is used as a whole; dropcli can't rewire it")
    g.erase_node(n)
    return site


# ------------------------------------------------------------------------------ ONNX


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def check_onnx_rnn(node: onnx.NodeProto, variant: str) -> tuple[str, int, int]:
    """(mode, hidden size, directions) of an ONNX LSTM/GRU node dropcli can rewrite, or a clear error."""
    where = f"{node.op_type} node {node.name or node.output[0]}"
    if node.op_type not in ("LSTM", "GRU"):
        raise UsageError(f"{variant} replaces LSTM and GRU layers; {where} is neither")
    mode = node.op_type.lower()
    if variant == "rnndrop" and mode == GRU:
        raise UsageError(f"{where}: " + RNNDropSite.refusal(mode), "choose --variant recurrent or variational for GRU layers")
    H = _attr(node, "hidden_size")
    if H is None:
        raise DropcliError(f"{where} has no hidden_size attribute")
    direction = _attr(node, "direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise DropcliError(f"{where} has an unknown direction {direction!r}")
    acts = _attr(node, "activations")
    default = ["Sigmoid", "Tanh", "Tanh"] if mode == LSTM else ["Sigmoid", "Tanh"]
    if acts:
        acts = [a.decode() if isinstance(a, bytes) else a for a in acts]
        if acts != default * (len(acts) // len(default)):
            raise UsageError(f"{where} uses activations {acts}; dropcli rewrites only the standard ones {default}")
    if _attr(node, "clip") is not None:
        raise UsageError(f"{where} clips its cell (clip attribute); dropcli does not rewrite clipped cells")
    if mode == LSTM and _attr(node, "input_forget", 0):
        raise UsageError(f"{where} couples the input and forget gates (input_forget=1); dropcli does not rewrite it")
    if mode == GRU and _attr(node, "linear_before_reset", 0) != 1:
        raise UsageError(f"{where} has linear_before_reset=0; dropcli rewrites GRUs in torch's form (linear_before_reset=1)")
    if int(_attr(node, "layout", 0)) != 0:
        raise UsageError(f"{where} uses the batch-major layout=1, which onnxruntime does not run",
                         "export the model with the default layout (torch.onnx.export does)")
    if len(node.input) > 4 and node.input[4]:
        raise UsageError(f"{where} takes sequence_lens (padded sequences); dropcli rewrites only unpadded sequences",
                         "export the model without packed/padded sequences")
    if mode == LSTM and len(node.input) > 7 and node.input[7]:
        raise UsageError(f"{where} has peephole weights; dropcli does not rewrite peephole LSTMs")
    return mode, int(H), 2 if direction == "bidirectional" else 1


def build_onnx_rnn(b: OnnxBuilder, node: onnx.NodeProto, variant: str, params: dict[str, Any],
                   x_info: TensorInfo) -> list[str]:
    """Stochastic versions of an ONNX LSTM/GRU node's outputs (``""`` where the node has none).

    ``params`` as resolved by the spec. ``x_info``: the node's input X (for the input size).
    """
    mode, H, D = check_onnx_rnn(node, variant)
    G = GATES[mode]
    reverse_only = _attr(node, "direction", "forward") == "reverse"
    et = x_info.elem_type or TensorProto.FLOAT
    if x_info.shape is None or len(x_info.shape) != 3 or x_info.shape[2] is None:
        raise UsageError(f"{node.op_type} node {node.name}: the input size (last dim of X) is unknown",
                         "export the model with a fixed feature size")
    I = int(x_info.shape[2])
    S_static = x_info.shape[0]  # layout 0 (checked): X is [S, B, I]
    ins = list(node.input) + [""] * (8 - len(node.input))
    X, W, R, Bias, _, h_init, c_init = ins[:7]
    p = float(params.get("p", 0.5))
    q = 1.0 - p
    fl = lambda v: b.const(v, np.float32 if et == TensorProto.FLOAT else helper.tensor_dtype_to_np_dtype(et))  # noqa: E731

    # batch-first views: [B, S, I]; states [B, H] per direction
    Xb = b.op("Transpose", X, perm=[1, 0, 2])
    batch = b.op("Slice", b.op("Shape", Xb), b.i64([0]), b.i64([1]))

    def state(init: str, d: int) -> str:
        if init:  # [D, B, H]
            return b.op("Gather", init, b.i64(d), axis=0)
        shape = b.op("Concat", batch, b.i64([H]), axis=0)
        return b.op("ConstantOfShape", shape, value=helper.make_tensor("value", et, [1], [0]))

    def mask_like(*dims: int) -> str:
        """A float [B, *dims] zero tensor that depends on the input (the like-shape of a mask)."""
        shape = b.op("Concat", batch, b.i64(list(dims)), axis=0)
        return b.op("ConstantOfShape", shape, value=helper.make_tensor("value", et, [1], [0]))

    def keep(like: str, qq: float, scale: float) -> str:
        u = b.op("RandomUniformLike", like, dtype=et)
        m = b.op("Cast", b.op("Less", u, fl(qq)), to=et)
        return b.op("Mul", m, fl(scale)) if scale != 1.0 else m

    # untied masks are drawn in torch's gate order (LSTM i, f, g, o; GRU r, z, n), as the torch
    # site draws them; ONNX orders the gates i, o, f, c and z, r, h
    gate_of = [0, 3, 1, 2] if mode == LSTM else [1, 0, 2]
    if variant == "weightdrop" and params.get("mask_per", "row") == "pass":
        return _weightdrop_pass(b, node, params, et, fl)
    # weight masks (weightdrop) are drawn [B, G*H, K] in torch's row order and gathered into ONNX's
    onnx_rows = b.i64([gate_of[k] * H + j for k in range(G) for j in range(H)])
    ys, hs, cs = [], [], []
    for d in range(D):
        reverse = reverse_only or d == 1
        Wd = b.op("Gather", W, b.i64(d), axis=0)  # [G*H, I]
        Rd = b.op("Gather", R, b.i64(d), axis=0)  # [G*H, H]
        Wb = Rb = None
        if Bias:
            Bd = b.op("Gather", Bias, b.i64(d), axis=0)  # [2*G*H]
            Wb = b.op("Slice", Bd, b.i64([0]), b.i64([G * H]))
            Rb = b.op("Slice", Bd, b.i64([G * H]), b.i64([2 * G * H]))
        # --- masks, drawn in the torch site's order
        xmask = hmask = cmask = gmask = None
        Wrows = Rrows_t = None
        gmask_step = False
        untied = False
        if variant == "rnndrop":
            cmask = keep(mask_like(H), q, 1.0)
        elif variant == "recurrent":
            if params.get("mask_per", "step") == "step":
                if S_static is None:
                    gm = keep(b.op("ConstantOfShape", b.op("Concat", b.op("Slice", b.op("Shape", Xb), b.i64([0]), b.i64([2])),
                                                            b.i64([H]), axis=0),
                                   value=helper.make_tensor("value", et, [1], [0])), q, 1.0 / q)
                else:
                    gm = keep(mask_like(int(S_static), H), q, 1.0 / q)
                gmask, gmask_step = gm, True  # [B, S, H]: a scan input
            else:
                gmask = keep(mask_like(H), q, 1.0 / q)
        elif variant == "variational":
            p_in = params.get("p_input")
            p_h = params.get("p_hidden")
            p_in = p if p_in is None else float(p_in)
            p_h = p if p_h is None else float(p_h)
            untied = params.get("tie", "tied") == "untied"
            if p_in > 0:
                xmask = keep(mask_like(*((G, I) if untied else (I,))), 1.0 - p_in, 1.0 / (1.0 - p_in))
            if p_h > 0:
                hmask = keep(mask_like(*((G, H) if untied else (H,))), 1.0 - p_h, 1.0 / (1.0 - p_h))
        elif variant == "weightdrop":
            which = params.get("weight", "hh")
            if which in ("ih", "both"):  # per-row masked W: [B, G*H, I]
                wm = b.op("Gather", keep(mask_like(G * H, I), q, 1.0 / q), onnx_rows, axis=1)
                Wrows = b.op("Mul", Wd, wm)
            if which in ("hh", "both"):  # per-row masked R: [B, G*H, H]
                rm = b.op("Gather", keep(mask_like(G * H, H), q, 1.0 / q), onnx_rows, axis=1)
                Rrows_t = b.op("Transpose", b.op("Mul", Rd, rm), perm=[0, 2, 1])  # [B, H, G*H]
        else:
            raise DropcliError(f"internal error: {variant} is not a recurrent variant")
        # --- input projection of all steps: [B, S, G*H]
        Wt = b.op("Transpose", Wd, perm=[1, 0])  # [I, G*H]
        if Wrows is not None:  # batched: [B, S, I] @ [B, I, G*H]
            xw = b.op("MatMul", Xb, b.op("Transpose", Wrows, perm=[0, 2, 1]))
        elif xmask is None:
            xw = b.op("MatMul", Xb, Wt)
        elif not untied:
            xw = b.op("MatMul", b.op("Mul", Xb, b.op("Unsqueeze", xmask, b.i64([1]))), Wt)
        else:
            parts = []
            for k in range(G):
                mk = b.op("Unsqueeze", b.op("Gather", xmask, b.i64(gate_of[k]), axis=1), b.i64([1]))  # [B, 1, I]
                Wk = b.op("Slice", Wt, b.i64([k * H]), b.i64([(k + 1) * H]), b.i64([1]))  # [I, H]
                parts.append(b.op("MatMul", b.op("Mul", Xb, mk), Wk))
            xw = b.op("Concat", *parts, axis=2)
        if Wb is not None:
            if mode == LSTM:
                xw = b.op("Add", xw, b.op("Add", Wb, Rb))
            else:
                xw = b.op("Add", xw, Wb)
        Rt = b.op("Transpose", Rd, perm=[1, 0])  # [H, G*H]
        Rts = [b.op("Slice", Rt, b.i64([k * H]), b.i64([(k + 1) * H]), b.i64([1])) for k in range(G)] if untied else None
        hmasks = [b.op("Gather", hmask, b.i64(gate_of[k]), axis=1) for k in range(G)] if (untied and hmask) else None
        body, n_state = _scan_body(b, mode, H, et, Rt, Rts, Rb if mode == GRU else None, hmask, hmasks, cmask, gmask,
                                   gmask_step, Rrows_t)
        h0 = state(h_init, d)
        scan_ins = [xw] + ([gmask] if gmask_step else [])
        states = [h0] + ([state(c_init, d)] if mode == LSTM else [])
        outs = b.op("Scan", *states, *scan_ins, n_out=n_state + 1, body=body, num_scan_inputs=len(scan_ins),
                    scan_input_axes=[1] * len(scan_ins), scan_output_axes=[1],
                    scan_input_directions=[1 if reverse else 0] * len(scan_ins),
                    scan_output_directions=[1 if reverse else 0])
        h_last, y_b = outs[0], outs[-1]  # y_b: [B, S, H]
        c_last = outs[1] if mode == LSTM else None
        ys.append(b.op("Unsqueeze", b.op("Transpose", y_b, perm=[1, 0, 2]), b.i64([1])))  # [S, 1, B, H]
        hs.append(b.op("Unsqueeze", h_last, b.i64([0])))
        if c_last:
            cs.append(b.op("Unsqueeze", c_last, b.i64([0])))
    cat = lambda xs, axis: xs[0] if len(xs) == 1 else b.op("Concat", *xs, axis=axis)  # noqa: E731
    res = [cat(ys, 1), cat(hs, 0)] + ([cat(cs, 0)] if mode == LSTM else [])
    return [r if k < len(node.output) and node.output[k] else "" for k, r in enumerate(res)][: len(node.output)]


def _weightdrop_pass(b: OnnxBuilder, node: onnx.NodeProto, params: dict[str, Any], et: int, fl: Any) -> list[str]:
    """weightdrop --mask-per pass: the stock LSTM/GRU op again, on ``W``/``R`` inputs multiplied by
    one inverted mask for the whole batch (``RandomUniformLike`` on the weight). Its nodes carry
    ``dropcli_weightdrop_pass`` in their names (``dropcli uncertainty`` refuses such sites)."""
    q = 1.0 - float(params.get("p", 0.5))
    which = params.get("weight", "hh")
    ins = list(node.input)

    def masked(w: str) -> str:
        u = b.op("RandomUniformLike", w, dtype=et)
        b.nodes[-1].name = b.fresh(PASS_MARK)
        return b.op("Mul", w, b.op("Mul", b.op("Cast", b.op("Less", u, fl(q)), to=et), fl(1.0 / q)))

    if which in ("ih", "both"):
        ins[1] = masked(ins[1])
    if which in ("hh", "both"):
        ins[2] = masked(ins[2])
    outs = [b.fresh(f"{node.op_type.lower()}_out") if o else "" for o in node.output]
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.name = b.fresh(f"{PASS_MARK}_{node.op_type}")
    del new.input[:]
    new.input.extend(ins)
    del new.output[:]
    new.output.extend(outs)
    b.nodes.append(new)
    return outs


def _scan_body(b: OnnxBuilder, mode: str, H: int, et: int, Rt: str, Rts: Optional[list[str]], Rb: Optional[str],
               hmask: Optional[str], hmasks: Optional[list[str]], cmask: Optional[str], gmask: Optional[str],
               gmask_step: bool, Rrows_t: Optional[str] = None) -> tuple[onnx.GraphProto, int]:
    """One time step as a Scan body. States h (and c); scan inputs xw_t (and the step's g-mask).
    Weights and per-sequence masks are read from the outer scope. ``Rrows_t`` [B, H, G*H]: a
    recurrent weight per row (weightdrop), applied by a batched MatMul."""
    inner = OnnxBuilder(b.opset, b.prefix + "/step", b.taken)
    h_in = inner.fresh("h_prev")
    c_in = inner.fresh("c_prev") if mode == LSTM else None
    x_in = inner.fresh("xw_t")
    g_in = inner.fresh("g_mask_t") if gmask_step else None
    G = GATES[mode]
    if Rrows_t is not None:  # [B, 1, H] @ [B, H, G*H] -> [B, G*H]
        hh = inner.op("Mul", h_in, hmask) if hmask else h_in
        rec = inner.op("Squeeze", inner.op("MatMul", inner.op("Unsqueeze", hh, inner.i64([1])), Rrows_t), inner.i64([1]))
    elif Rts is not None:  # untied: one hidden mask and recurrent block per gate
        parts = [inner.op("MatMul", inner.op("Mul", h_in, hm) if hm else h_in, Rk)
                 for hm, Rk in zip(hmasks or [None] * G, Rts)]
        rec = inner.op("Concat", *parts, axis=1)
    else:
        hh = inner.op("Mul", h_in, hmask) if hmask else h_in
        rec = inner.op("MatMul", hh, Rt)
    gm = g_in if gmask_step else gmask
    if mode == LSTM:  # ONNX gate order i, o, f, c
        gates = inner.op("Add", x_in, rec)
        i, o, f, g = inner.op("Split", gates, inner.i64([H] * 4), axis=1, n_out=4)
        i, o, f = inner.op("Sigmoid", i), inner.op("Sigmoid", o), inner.op("Sigmoid", f)
        g = inner.op("Tanh", g)
        if gm:
            g = inner.op("Mul", g, gm)
        c = inner.op("Add", inner.op("Mul", f, c_in), inner.op("Mul", i, g))
        if cmask:
            c = inner.op("Mul", c, cmask)
        h = inner.op("Mul", o, inner.op("Tanh", c))
        outs = [h, c]
    else:  # GRU, linear_before_reset=1, gate order z, r, h
        if Rb is not None:
            rec = inner.op("Add", rec, Rb)
        xz, xr, xh = inner.op("Split", x_in, inner.i64([H] * 3), axis=1, n_out=3)
        rz, rr, rh = inner.op("Split", rec, inner.i64([H] * 3), axis=1, n_out=3)
        z = inner.op("Sigmoid", inner.op("Add", xz, rz))
        r = inner.op("Sigmoid", inner.op("Add", xr, rr))
        n = inner.op("Tanh", inner.op("Add", xh, inner.op("Mul", r, rh)))
        if gm:
            n = inner.op("Mul", n, gm)
        h = inner.op("Add", n, inner.op("Mul", z, inner.op("Sub", h_in, n)))  # (1-z)*n + z*h
        outs = [h]
    y_out = inner.op("Identity", outs[0])
    state_outs = [inner.op("Identity", v) for v in outs]
    vi = lambda name, rank: helper.make_tensor_value_info(name, et, [None] * rank)  # noqa: E731
    inputs = [vi(h_in, 2)] + ([vi(c_in, 2)] if c_in else []) + [vi(x_in, 2)] + ([vi(g_in, 2)] if g_in else [])
    outputs = [vi(s, 2) for s in state_outs] + [vi(y_out, 2)]
    graph = helper.make_graph(inner.nodes, inner.fresh("body"), inputs, outputs, initializer=inner.initializers)
    return graph, len(state_outs)


def replace_onnx_rnn(om: Any, node_index: int, spec: VariantSpec, params: dict[str, Any]) -> str:
    """Rewrite the LSTM/GRU node at ``node_index`` of an :class:`OnnxModel`: the node stays as the
    inference branch; a Scan subgraph is the stochastic branch; ``Where(dropcli_mc, ...)`` selects
    per output. Returns the site name."""
    g = om.model.graph
    node = g.node[node_index]
    check_onnx_rnn(node, spec.name)
    name = om.claim_site_name()
    mc = om._ensure_mc_input()
    b = OnnxBuilder(opset_of(om.model), name, om._taken_names())
    stoch = build_onnx_rnn(b, node, spec.name, params, om.tensor_info(node.input[0]))
    for k, s in enumerate(stoch):
        if not s:
            continue
        orig = node.output[k]
        det = orig + naming.DET_SUFFIX
        node.output[k] = det
        sel = helper.make_node("Where", [mc, s, det], [orig], name=naming.select_name(name, k))
        sel.doc_string = naming.select_doc(spec.name, params.get("p"))
        b.nodes.append(sel)
    om.model.graph.initializer.extend(b.initializers)
    om._insert_nodes(node_index + 1, b.nodes)
    return name


# ------------------------------------------------------------------------------ specs


def _onnx_rnn_kind(node: onnx.NodeProto) -> str | None:
    return {"LSTM": LSTM, "GRU": GRU}.get(node.op_type)


def _torch_replace(gm, n, spec, params, site_name):
    if fx_rnn_mode(gm, n) == GRU and spec.name == "rnndrop":
        raise UsageError(f"rnndrop masks the LSTM cell state; {n.name} is a GRU, which has none",
                         "use --variant recurrent or variational on GRUs, or select only LSTMs with --after lstm")
    return replace_in_fx(gm, n, spec, params, site_name)


def _onnx_replace(om, index, spec, params):
    return replace_onnx_rnn(om, index, spec, params)


def rnn_replacement(kinds: tuple[str, ...]) -> Replacement:
    """The finder/rewriter of a recurrent-family variant for the layer kinds ``kinds`` (lstm, gru)."""
    return Replacement(kinds=kinds, torch_match=lambda gm, n: fx_rnn_mode(gm, n) if fx_rnn_mode(gm, n) in kinds else None,
                       torch_apply=_torch_replace, onnx_match=lambda node: _onnx_rnn_kind(node) if _onnx_rnn_kind(node) in kinds else None,
                       onnx_apply=_onnx_replace)


MASK_PER = Param("mask_per", str, "step", "recurrent: a new candidate mask every step, or one per sequence (step|sequence)",
                 _check_mask_per)
TIE = Param("tie", str, "tied", "variational: one mask for all gates (tied) or one per gate (untied)", _check_tie)
P_INPUT = Param("p_input", float, None, "variational: drop probability of x_t (default: --p)", _check_opt_p)
P_HIDDEN = Param("p_hidden", float, None, "variational: drop probability of h_{t-1} (default: --p)", _check_opt_p)

RNNDROP = VariantSpec(
    name="rnndrop", summary="per-sequence mask on the LSTM cell state, not rescaled (RNNDrop)",
    formula="c_t = m * (f_t*c_{t-1} + i_t*g_t),  m ~ Bernoulli(q) once per sequence",
    test_rule="the plain LSTM (no mask)", attaches=REPLACE,
    paper="Moon et al. 2015, RNNDROP: a novel dropout for RNNs in ASR (ASRU)",
    torch_module=RNNDropSite, onnx_builder=build_onnx_rnn, default_after=("lstm",), replaces=("lstm",), replacement=rnn_replacement((LSTM,)),
    notes="LSTM only (a GRU has no cell state; use recurrent or variational). No 1/q inside the recurrence: "
          "it would compound as q^-t. The mask is on c_{t-1}'s update, not h_{t-1}.",
)
RECURRENT = VariantSpec(
    name="recurrent", summary="inverted dropout on the candidate only (recurrent dropout without memory loss)",
    formula="c_t = f_t*c_{t-1} + i_t*g_t*m/q  (GRU: h_t = (1-z_t)*n_t*m/q + z_t*h_{t-1}),  m per step or per sequence",
    test_rule="the plain LSTM/GRU", attaches=REPLACE,
    paper="Semeniuta et al. 2016, Recurrent Dropout without Memory Loss (COLING)",
    torch_module=SemeniutaSite, onnx_builder=build_onnx_rnn, params=(P_PARAM, MASK_PER), default_after=("lstm", "gru"),
    replaces=("lstm", "gru"), replacement=rnn_replacement((LSTM, GRU)),
    aliases=("semeniuta",),
)
VARIATIONAL = VariantSpec(
    name="variational", summary="per-sequence masks on x_t and h_{t-1}, tied or per gate (variational RNN dropout)",
    formula="gates = W (x_t*m_x/q_x) + U (h_{t-1}*m_h/q_h) + b,  m_x, m_h ~ Bernoulli once per sequence",
    test_rule="the plain LSTM/GRU", attaches=REPLACE,
    paper="Gal & Ghahramani 2016, A Theoretically Grounded Application of Dropout in RNNs (NeurIPS)",
    torch_module=VariationalRNNSite, onnx_builder=build_onnx_rnn,
    params=(Param("p", float, 0.3, "drop probability of x_t and h_{t-1} (keep q = 1 - p); paper: 0.3", check_p),
            P_INPUT, P_HIDDEN, TIE),
    default_after=("lstm", "gru"), aliases=("variational-rnn", "gal"), replaces=("lstm", "gru"), replacement=rnn_replacement((LSTM, GRU)),
    notes="The bias is never scaled. Not nn.LSTM(dropout=), which drops only between stacked layers.",
)

SPECS = (RNNDROP, RECURRENT, VARIATIONAL)
for _s in SPECS:
    register(_s)


def spec_by_name(name: str) -> VariantSpec:
    for s in SPECS:
        if s.name == name or name in s.aliases:
            return s
    raise UsageError(f"unknown recurrent variant {name!r}", f"known: {', '.join(s.name for s in SPECS)}")
