"""Cell-level loops for LSTM and GRU that reuse a fused layer's trained weights exactly.

:class:`RecurrentLoop` holds the flat weights of an ``nn.LSTM`` / ``nn.GRU`` (or the flat
weight list of an fx graph's ``aten.lstm.input`` / ``aten.gru.input`` call) and computes the
same result as the fused op, step by step, so that dropout masks can be put *inside* the
recurrence (the recurrent dropout family, ``dropcli.variants.recurrent``). All layers,
bidirectional, ``batch_first``, ``proj_size`` (LSTM), given or zero initial states; outputs
as the fused op: ``(output, (h_n, c_n))`` for LSTM, ``(output, h_n)`` for GRU.

Masks (:class:`StepMasks`, one per layer and direction; every field optional, all batch
tensors of the (possibly MC-tiled) batch B):

* ``x``: on the layer input ``x_t``, ``[B, I]`` (tied) or ``[G, B, I]`` (one per gate, untied, in
  torch's gate order: LSTM i, f, g, o; GRU r, z, n);
  applied before the input projection, so the bias is never scaled;
* ``h``: on ``h_{t-1}`` before the recurrent projection, ``[B, H]`` or ``[G, B, H]``;
* ``c``: LSTM cell state after the update, ``c_t = m * (f*c_{t-1} + i*g)`` (RNNDrop), ``[B, H]``;
* ``g``: the candidate (LSTM ``g_t``, GRU ``n_t``), ``[B, H]`` per sequence or ``[S, B, H]``
  per step (time-major);
* ``whh`` / ``wih``: a per-row mask on the weight itself (weight drop / DropConnect, Merity
  et al. 2017), ``[B, G*H, H_out]`` / ``[B, G*H, I]`` in torch's layout and gate order; row b
  runs the recurrence with ``W_hh * whh[b]`` (a batched matmul per step) and projects its input
  with ``W_ih * wih[b]``. Biases are never masked.

Masks carry their own scale (for example ``m/q``); the loop only multiplies.

Speed: the input projection of all steps is one matmul before the loop; each step is one
``addmm`` plus elementwise ops. LSTM gate rows are reordered once to (i, f, o, g) so one
``sigmoid`` covers three gates. Under ``torch.jit.trace`` the per-direction loop runs as a
TorchScript function, so a traced model keeps a dynamic sequence length; under
``torch.export`` the loop unrolls for the example's length (the exported program's input
guard rejects other lengths).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from dropcli.errors import DropcliError

LSTM = "lstm"
GRU = "gru"
GATES = {LSTM: 4, GRU: 3}


@dataclass
class StepMasks:
    x: Optional[torch.Tensor] = None
    h: Optional[torch.Tensor] = None
    c: Optional[torch.Tensor] = None
    g: Optional[torch.Tensor] = None
    whh: Optional[torch.Tensor] = None
    wih: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------- step loops
# Plain functions with TorchScript-compatible signatures: run eagerly, or scripted (below).


def _lstm_dir(xg: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_hh_t: torch.Tensor,
              w_hr_t: Optional[torch.Tensor], hmask: Optional[torch.Tensor], cmask: Optional[torch.Tensor],
              gmask: Optional[torch.Tensor], reverse: bool,
              w_rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One LSTM direction over time-major ``xg`` [S, B, 4H] (input projection + both biases,
    gate blocks ordered i, f, o, g). ``w_hh_t`` is [H_out, 4H] (tied) or [G, H_out, H] (untied
    hidden masks, ``hmask`` [G, B, H_out]). ``w_rows`` [B, H_out, 4H]: a recurrent weight per
    row (weight drop), used instead of ``w_hh_t``."""
    S = xg.size(0)
    H = c.size(1)
    outs: List[torch.Tensor] = []
    untied = hmask is not None and hmask.dim() == 3
    per_step_g = gmask is not None and gmask.dim() == 3
    for k in range(S):
        t = S - 1 - k if reverse else k
        if w_rows is not None:
            hh = h * hmask if hmask is not None else h
            gates = xg[t] + torch.bmm(hh.unsqueeze(1), w_rows).squeeze(1)
        elif untied:
            assert hmask is not None
            rec = torch.bmm(h.unsqueeze(0) * hmask, w_hh_t)  # [G, B, H]
            gates = xg[t] + rec.permute(1, 0, 2).reshape(h.size(0), 4 * H)
        elif hmask is not None:
            gates = torch.addmm(xg[t], h * hmask, w_hh_t)
        else:
            gates = torch.addmm(xg[t], h, w_hh_t)
        sig = torch.sigmoid(gates[:, : 3 * H])
        g = torch.tanh(gates[:, 3 * H:])
        if gmask is not None:
            g = g * (gmask[t] if per_step_g else gmask)
        c = torch.addcmul(sig[:, H: 2 * H] * c, sig[:, :H], g)
        if cmask is not None:
            c = c * cmask
        h = sig[:, 2 * H:] * torch.tanh(c)
        if w_hr_t is not None:
            h = torch.mm(h, w_hr_t)
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs), h, c


def _gru_dir(xg: torch.Tensor, h: torch.Tensor, w_hh_t: torch.Tensor, b_hh: Optional[torch.Tensor],
             hmask: Optional[torch.Tensor], gmask: Optional[torch.Tensor],
             reverse: bool, w_rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One GRU direction over time-major ``xg`` [S, B, 3H] (input projection + b_ih; gate blocks
    r, z, n as in torch). ``w_hh_t`` [H, 3H] (tied) or [3, H, H] (untied, ``hmask`` [3, B, H]).
    ``w_rows`` [B, H, 3H]: a recurrent weight per row (weight drop), used instead of ``w_hh_t``."""
    S = xg.size(0)
    H = h.size(1)
    outs: List[torch.Tensor] = []
    untied = hmask is not None and hmask.dim() == 3
    per_step_g = gmask is not None and gmask.dim() == 3
    for k in range(S):
        t = S - 1 - k if reverse else k
        if w_rows is not None:
            hh = h * hmask if hmask is not None else h
            gh = torch.bmm(hh.unsqueeze(1), w_rows).squeeze(1)
            if b_hh is not None:
                gh = gh + b_hh
        elif untied:
            assert hmask is not None
            gh = torch.bmm(h.unsqueeze(0) * hmask, w_hh_t).permute(1, 0, 2).reshape(h.size(0), 3 * H)
            if b_hh is not None:
                gh = gh + b_hh
        else:
            hh = h * hmask if hmask is not None else h
            gh = torch.addmm(b_hh, hh, w_hh_t) if b_hh is not None else torch.mm(hh, w_hh_t)
        x = xg[t]
        rz = torch.sigmoid(x[:, : 2 * H] + gh[:, : 2 * H])
        n = torch.tanh(torch.addcmul(x[:, 2 * H:], rz[:, :H], gh[:, 2 * H:]))
        if gmask is not None:
            n = n * (gmask[t] if per_step_g else gmask)
        z = rz[:, H:]
        h = n + z * (h - n)  # (1 - z) * n + z * h
        outs.append(h)
    if reverse:
        outs.reverse()
    return torch.stack(outs), h


def _untied(m: Optional[torch.Tensor]) -> bool:
    return m is not None and m.dim() == 3


def _to_ifog(m: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return m[[0, 1, 3, 2]] if _untied(m) else m


_SCRIPTED: dict[str, object] = {}


def _scripted(name: str):
    """The TorchScript version of a step loop (compiled on first use)."""
    if name not in _SCRIPTED:
        _SCRIPTED[name] = torch.jit.script({"lstm": _lstm_dir, "gru": _gru_dir}[name])
    return _SCRIPTED[name]


def _exporting() -> bool:
    return bool(torch.compiler.is_exporting() or torch.compiler.is_compiling())


# ----------------------------------------------------------------------------- the module


class RecurrentLoop(nn.Module):
    """A fused LSTM/GRU rewritten as an explicit step loop with the same weights.

    Build it with :meth:`from_module` (an ``nn.LSTM`` / ``nn.GRU``) or :meth:`from_flat`
    (the flat weight list of ``aten.lstm.input`` / ``aten.gru.input``: per layer and
    direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``). The weights are kept as buffers in
    torch's own layout and order, so :meth:`fused` calls the fused op on exactly them.

    ``use_script``: run the per-direction loop as a TorchScript function (see
    ``benchmarks/rnn_speed.py``); it is always used under ``torch.jit.trace``.
    """

    def __init__(self, mode: str, weights: Sequence[torch.Tensor], *, hidden_size: int, num_layers: int = 1,
                 bidirectional: bool = False, batch_first: bool = False, has_biases: bool = True,
                 proj_size: int = 0, use_script: bool = False):
        super().__init__()
        if mode not in GATES:
            raise DropcliError(f"unknown recurrent layer type {mode!r}; dropcli rewrites LSTM and GRU")
        if proj_size and mode != LSTM:
            raise DropcliError("proj_size is an LSTM option; a GRU has none")
        self.mode = mode
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bidirectional = bool(bidirectional)
        self.batch_first = bool(batch_first)
        self.has_biases = bool(has_biases)
        self.proj_size = int(proj_size)
        self.use_script = bool(use_script)
        self.num_directions = 2 if bidirectional else 1
        per = 2 + (2 if has_biases else 0) + (1 if proj_size else 0)
        n = self.num_layers * self.num_directions
        if len(weights) != n * per:
            raise DropcliError(
                f"a {mode.upper()} with {num_layers} layer(s), {'2 directions' if bidirectional else '1 direction'}, "
                f"biases={has_biases}, proj_size={proj_size} has {n * per} weight tensors, got {len(weights)}")
        G, H = GATES[mode], self.hidden_size
        self._names: list[str] = []
        for k, w in enumerate(weights):
            layer, d = divmod(k // per, self.num_directions)
            field = ["w_ih", "w_hh", "b_ih", "b_hh", "w_hr"][k % per if has_biases else (k % per) + (2 if k % per >= 2 else 0)]
            name = f"{field}_l{layer}{'_reverse' if d else ''}"
            # the very same tensor objects: the fused op then takes the kernel path the original
            # layer took (it differs in the last bits between tensors that require grad and not)
            if isinstance(w, nn.Parameter):
                self.register_parameter(name, w)
            else:
                self.register_buffer(name, w)
            self._names.append(name)
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                w_ih = self._w("w_ih", layer, d)
                if w_ih.shape[0] != G * H:
                    raise DropcliError(f"{mode.upper()} weight_ih of layer {layer} has {w_ih.shape[0]} rows, expected {G}x{H}")
        self._prepare()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_module(cls, m: nn.Module, use_script: bool = False) -> "RecurrentLoop":
        if isinstance(m, nn.LSTM):
            mode = LSTM
        elif isinstance(m, nn.GRU):
            mode = GRU
        else:
            raise DropcliError(f"{type(m).__name__} is not an nn.LSTM or nn.GRU")
        return cls(mode, list(m._flat_weights), hidden_size=m.hidden_size, num_layers=m.num_layers,
                   bidirectional=m.bidirectional, batch_first=m.batch_first, has_biases=m.bias,
                   proj_size=getattr(m, "proj_size", 0), use_script=use_script)

    @classmethod
    def from_flat(cls, mode: str, params: Sequence[torch.Tensor], *, has_biases: bool, num_layers: int,
                  bidirectional: bool, batch_first: bool, use_script: bool = False) -> "RecurrentLoop":
        """From an ``aten.lstm.input`` / ``aten.gru.input`` call's arguments."""
        w_hh = params[1]
        per = 2 + (2 if has_biases else 0)
        extra = len(params) - per * num_layers * (2 if bidirectional else 1)
        proj = 0
        if mode == LSTM and extra == num_layers * (2 if bidirectional else 1):
            proj = int(params[per].shape[0])  # w_hr: [proj_size, hidden_size]
        hidden = int(w_hh.shape[0]) // GATES[mode]
        return cls(mode, list(params), hidden_size=hidden, num_layers=num_layers, bidirectional=bidirectional,
                   batch_first=batch_first, has_biases=has_biases, proj_size=proj, use_script=use_script)

    def _w(self, field: str, layer: int, d: int) -> Optional[torch.Tensor]:
        name = f"{field}_l{layer}{'_reverse' if d else ''}"
        return getattr(self, name, None)

    def _prepare(self) -> None:
        """Derived per-direction tensors for the loop (LSTM gates reordered to i, f, o, g)."""
        G, H = GATES[self.mode], self.hidden_size
        order = None
        if self.mode == LSTM:  # torch: i, f, g, o  ->  i, f, o, g
            order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        self._dirs: list[dict[str, Optional[str]]] = []
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                w_ih, w_hh = self._w("w_ih", layer, d), self._w("w_hh", layer, d)
                b_ih, b_hh, w_hr = self._w("b_ih", layer, d), self._w("b_hh", layer, d), self._w("w_hr", layer, d)
                if order is not None:
                    w_ih, w_hh = w_ih[order], w_hh[order]
                    b_ih = b_ih[order] if b_ih is not None else None
                    b_hh = b_hh[order] if b_hh is not None else None
                derived: dict[str, Optional[torch.Tensor]] = {
                    "w_ih": w_ih,  # [G*H, I]
                    "w_hh_t": w_hh.t().contiguous(),  # [H_out, G*H]
                    "w_hh_g": w_hh.reshape(G, H, -1).transpose(1, 2).contiguous(),  # [G, H_out, H]
                    "w_hr_t": w_hr.t().contiguous() if w_hr is not None else None,
                    "b_x": ((b_ih + b_hh) if self.mode == LSTM else b_ih) if b_ih is not None else None,
                    "b_hh": b_hh if self.mode == GRU else None,
                }
                entry: dict[str, Optional[str]] = {}
                k = len(self._dirs)
                for key, t in derived.items():
                    if t is None:
                        entry[key] = None
                    else:
                        # derived, not saved: rebuilt from the weights; moves with .to()
                        self.register_buffer(f"_loop{k}_{key}", t.detach().contiguous(), persistent=False)
                        entry[key] = f"_loop{k}_{key}"
                self._dirs.append(entry)

    def _derived(self, k: int) -> dict[str, Optional[torch.Tensor]]:
        return {key: (getattr(self, name) if name is not None else None) for key, name in self._dirs[k].items()}

    def flat_weights(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self._names]

    @property
    def out_size(self) -> int:
        return self.proj_size or self.hidden_size

    def extra_repr(self) -> str:
        return (f"{self.mode}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}"
                + (f", proj_size={self.proj_size}" if self.proj_size else ""))

    def input_size(self, layer: int) -> int:
        return int(self._w("w_ih", layer, 0).shape[1])

    # -- running -----------------------------------------------------------------------
    def initial_state(self, x: torch.Tensor, hx=None):
        """``(h0, c0)`` (LSTM) or ``h0`` (GRU), zeros when not given: [L*D, B, H]."""
        B = x.size(0) if self.batch_first else x.size(1)
        n = self.num_layers * self.num_directions
        if hx is not None:
            return hx
        h0 = x.new_zeros((n, B, self.out_size))
        if self.mode == LSTM:
            return h0, x.new_zeros((n, B, self.hidden_size))
        return h0

    def fused(self, x: torch.Tensor, hx=None):
        """The fused op on the same weights: bitwise what the original layer computes."""
        hx = self.initial_state(x, hx)
        flat = self.flat_weights()
        if self.mode == LSTM:
            h0, c0 = hx
            out, h, c = torch.lstm(x, (h0, c0), flat, self.has_biases, self.num_layers, 0.0, False,
                                   self.bidirectional, self.batch_first)
            return out, (h, c)
        out, h = torch.gru(x, hx, flat, self.has_biases, self.num_layers, 0.0, False, self.bidirectional, self.batch_first)
        return out, h

    def forward(self, x: torch.Tensor, hx=None, masks: Optional[Sequence[Optional[StepMasks]]] = None):
        """The step loop. ``masks``: one :class:`StepMasks` (or None) per (layer, direction),
        layer-major."""
        if x.dim() != 3:
            raise DropcliError(f"the rewritten {self.mode.upper()} takes batched 3-D input, got {x.dim()}-D")
        hx = self.initial_state(x, hx)
        if self.mode == LSTM:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        seq = x.transpose(0, 1) if self.batch_first else x  # time-major [S, B, I]
        tracing = torch.jit.is_tracing()
        script = (self.use_script or tracing) and not _exporting()
        hn: list[torch.Tensor] = []
        cn: list[torch.Tensor] = []
        G, H = GATES[self.mode], self.hidden_size
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                k = layer * self.num_directions + d
                e = self._derived(k)
                m = masks[k] if masks is not None else None
                if m is not None and self.mode == LSTM and (_untied(m.x) or _untied(m.h)):
                    # untied masks come in torch's gate order (i, f, g, o); the loop runs i, f, o, g
                    m = StepMasks(x=_to_ifog(m.x), h=_to_ifog(m.h), c=m.c, g=m.g, whh=m.whh, wih=m.wih)
                xg = self._input_projection(seq, e, m.x if m is not None else None, G, H,
                                            self._loop_order(m.wih) if m is not None and m.wih is not None else None)
                hmask = m.h if m is not None else None
                w_hh = e["w_hh_g"] if hmask is not None and hmask.dim() == 3 else e["w_hh_t"]
                gmask = m.g if m is not None else None
                w_rows = None
                if m is not None and m.whh is not None:
                    # per-row masked recurrent weight, transposed for h @ W^T: [B, H_out, G*H]
                    w_rows = self._loop_order(m.whh).transpose(1, 2) * e["w_hh_t"]
                if self.mode == LSTM:
                    fn = _scripted("lstm") if script else _lstm_dir
                    y, h, c = fn(xg, h0[k], c0[k], w_hh, e["w_hr_t"], hmask, m.c if m is not None else None, gmask, d == 1,
                                 w_rows)
                    cn.append(c)
                else:
                    fn = _scripted("gru") if script else _gru_dir
                    y, h = fn(xg, h0[k], w_hh, e["b_hh"], hmask, gmask, d == 1, w_rows)
                outs.append(y)
                hn.append(h)
            seq = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        out = seq.transpose(0, 1) if self.batch_first else seq
        h_n = torch.stack(hn)
        if self.mode == LSTM:
            return out, (h_n, torch.stack(cn))
        return out, h_n

    def _loop_order(self, wmask: torch.Tensor) -> torch.Tensor:
        """A per-row weight mask [B, G*H, K] in torch's gate order, reordered to the loop's
        (LSTM i, f, g, o -> i, f, o, g; GRU unchanged)."""
        if self.mode != LSTM:
            return wmask
        H = self.hidden_size
        return torch.cat([wmask[:, : 2 * H], wmask[:, 3 * H:], wmask[:, 2 * H: 3 * H]], dim=1)

    @staticmethod
    def _input_projection(seq: torch.Tensor, e: dict, xmask: Optional[torch.Tensor], G: int, H: int,
                          wmask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x_t W_ih^T + b`` for all steps at once: [S, B, G*H]; masks before the matmul.
        ``wmask`` [B, G*H, I] (loop gate order): a per-row mask on ``W_ih`` (weight drop)."""
        w, b = e["w_ih"], e["b_x"]
        if wmask is not None:
            xs = seq * xmask if xmask is not None and xmask.dim() == 2 else seq
            xg = torch.bmm(xs.transpose(0, 1), (wmask * w).transpose(1, 2)).transpose(0, 1)  # [S, B, G*H]
            return xg + b if b is not None else xg
        if xmask is None:
            xg = torch.matmul(seq, w.t())
        elif xmask.dim() == 2:  # tied: one mask [B, I], the same at every step
            xg = torch.matmul(seq * xmask, w.t())
        else:  # untied: one mask per gate [G, B, I]
            S, B, _ = seq.shape
            xm = seq.unsqueeze(0) * xmask.unsqueeze(1)  # [G, S, B, I]
            wg = w.reshape(G, H, -1).transpose(1, 2)  # [G, I, H]
            xg = torch.matmul(xm.reshape(G, S * B, -1), wg).reshape(G, S, B, H).permute(1, 2, 0, 3).reshape(S, B, G * H)
        return xg + b if b is not None else xg
