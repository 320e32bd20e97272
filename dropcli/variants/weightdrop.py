"""Weight drop (Merity et al. 2017, AWD-LSTM): DropConnect on an LSTM/GRU's weight matrices.

``W_hh -> W_hh * m / q`` with ``m ~ Bernoulli(q)`` elementwise on the *weight* (not on the
activations), one mask for a whole forward pass, so the same dropped connections act at every
time step of a sequence. ``--weight hh`` (default, the paper's choice: the hidden-to-hidden
weights), ``ih`` or ``both``. Biases are never masked. Inverted scaling (``/q``), so the test
rule is the unmasked weight: inference mode is exactly the original layer (the fused op on the
trained weights). ``p`` is the DROP probability, ``q = 1 - p``.

Two mask granularities (``--mask-per``):

* ``row`` (default): every row of the batch draws its own weight mask, reused at every step of
  its sequence. dropcli's MC engines run T samples of B examples as one tiled batch of B*T rows
  and key noise per example; a mask shared by the rows of such a batch would make the T
  "samples" of a pass correlated across examples and dependent on the batching. A per-row mask
  is the paper's training rule ("one mask per forward pass") for each example's sample: row b
  runs the recurrence on ``W_hh * m_b / q`` (a batched matmul per step in
  :class:`dropcli.rnn.RecurrentLoop`; in ONNX a Scan whose body multiplies ``h_{t-1}`` [B, 1, H]
  by a masked ``R^T`` [B, H, G*H]).
* ``pass``: the literal per-pass form, one mask for the whole batch: torch masks the flat
  weights with :class:`WeightDrop` (the masked-weight function, usable as a
  ``torch.nn.utils.parametrize`` parametrization) and calls the fused ``torch.lstm``/``torch.gru``;
  ONNX multiplies the stock LSTM/GRU op's ``R`` (and/or ``W``) input by a mask drawn with
  ``RandomUniformLike(R)`` and runs a second stock op. Useful for training-style use of the
  saved model; ``dropcli uncertainty`` refuses it (its masks cannot be keyed per example, and in
  a tiled batch all T samples of an example would share one mask, so they would not be samples).

Why not ``torch.nn.utils.parametrize`` on the replaced layer itself: a parametrization is applied
on every access of the weight, so the inference branch (which must be bitwise the original
layer, and is traced next to the MC branch into TorchScript/.pt2) would see the masked weight
too. The site therefore applies the same :class:`WeightDrop` function explicitly in its MC
branch only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from dropcli.model.naming import PASS_MARK  # a buffer (torch) / node-name part (ONNX) marking --mask-per pass
from dropcli.backends.torch.rnn import GATES, GRU, LSTM, StepMasks
from dropcli.variants.base import P_PARAM, REPLACE, Param, VariantSpec, tracing, keep_mask_like
from dropcli.variants.registry import register
from dropcli.variants.recurrent import RecurrentSite, build_onnx_rnn, rnn_replacement

WEIGHT_FIELDS = {"hh": ("w_hh",), "ih": ("w_ih",), "both": ("w_ih", "w_hh")}


def _check_weight(v: str) -> str | None:
    return None if v in WEIGHT_FIELDS else "must be 'hh', 'ih' or 'both'"


def _check_mask_per(v: str) -> str | None:
    return None if v in ("row", "pass") else "must be 'row' or 'pass'"


class WeightDrop(nn.Module):
    """The masked-weight function ``W -> W * m / q``, ``m ~ Bernoulli(q)`` (a fresh mask per
    call). Registered with ``torch.nn.utils.parametrize.register_parametrization`` it turns any
    module's weight into a weight-dropped one; dropcli's site calls it explicitly (see the module
    docstring). Draws through the noise API."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = 1.0 - self.p
        if self.p == 0.0:
            return w
        return w * keep_mask_like(w, q).to(w.dtype) * (1.0 / q)


class WeightDropSite(RecurrentSite):
    """Weight drop on a replaced LSTM/GRU. Inference: the fused op on the trained weights.
    MC: ``--mask-per row`` the loop with a per-row masked weight; ``pass`` the fused op on
    weights masked once for the batch."""

    def __init__(self, p: float = 0.5, *, rnn: nn.Module | None = None, **params: Any):
        super().__init__(p, rnn=rnn, **params)
        self.fields = WEIGHT_FIELDS[self.params.get("weight", "hh")]
        if self.params.get("mask_per", "row") == "pass":
            self.drop = WeightDrop(self.p)
            self.register_buffer(PASS_MARK, torch.ones((), dtype=torch.bool))

    def masks(self, x: torch.Tensor) -> list[Optional[StepMasks]]:
        """Per (layer, direction): ``wih`` [B, G*H, I] then ``whh`` [B, G*H, H_out], scaled 1/q."""
        G, H, Ho = GATES[self.rnn.mode], self.rnn.hidden_size, self.rnn.out_size
        out: list[Optional[StepMasks]] = []
        for _, _, I in self.layer_dirs():
            wih = self._mask(x, self.q, 1.0 / self.q, G * H, I) if "w_ih" in self.fields else None
            whh = self._mask(x, self.q, 1.0 / self.q, G * H, Ho) if "w_hh" in self.fields else None
            out.append(StepMasks(wih=wih, whh=whh))
        return out

    def masked_flat(self) -> list[torch.Tensor]:
        """The fused op's flat weights with the chosen ones masked (one mask each, per pass)."""
        r = self.rnn
        # the (always True) marker is read in the graph so that it survives TorchScript/.pt2/ONNX
        # saving, where `dropcli uncertainty` looks for it (engines.factory.refuse_per_pass)
        mark = getattr(self, PASS_MARK)
        return [torch.where(mark, self.drop(w), w) if name.split("_l")[0] in self.fields else w
                for name, w in zip(r._names, r.flat_weights())]

    def sample(self, x: torch.Tensor, hx=None):
        if self.params.get("mask_per", "row") == "row":
            return super().sample(x, hx)
        r = self.rnn
        hx = r.initial_state(x, hx)
        flat = self.masked_flat()
        if r.mode == LSTM:
            # eagerly, oneDNN's LSTM repacks freshly masked weights on every call (much slower on
            # small layers); the plain CPU kernel computes the same function
            ctx = torch.backends.mkldnn.flags(enabled=False) if not tracing() else contextlib.nullcontext()
            with ctx:
                out, h, c = torch.lstm(x, tuple(hx), flat, r.has_biases, r.num_layers, 0.0, False, r.bidirectional,
                                       r.batch_first)
            return out, (h, c)
        out, h = torch.gru(x, hx, flat, r.has_biases, r.num_layers, 0.0, False, r.bidirectional, r.batch_first)
        return out, h


WEIGHT = Param("weight", str, "hh", "weightdrop: which weight to mask: hh (W_hh, the paper's), ih (W_ih) or both",
               _check_weight)
MASK_PER = Param("mask_per", str, "row",
                 "weightdrop: a weight mask per batch row (row, default; what MC needs) or one per forward pass (pass)",
                 _check_mask_per)

WEIGHTDROP = VariantSpec(
    name="weightdrop", summary="DropConnect on an LSTM/GRU weight (W_hh by default), one mask per pass (AWD-LSTM)",
    formula="W_hh -> W_hh * m / q,  m ~ Bernoulli(q) elementwise, one mask per forward pass (per row), every step",
    test_rule="the unmasked weights (the plain LSTM/GRU)", attaches=REPLACE,
    paper="Merity et al. 2017, Regularizing and Optimizing LSTM Language Models (AWD-LSTM, ICLR 2018)",
    torch_module=WeightDropSite, onnx_builder=build_onnx_rnn, params=(P_PARAM, WEIGHT, MASK_PER),
    default_after=(LSTM, GRU), aliases=("weight-drop", "awd"), replaces=(LSTM, GRU), replacement=rnn_replacement((LSTM, GRU)),
    notes="Biases are never masked. --mask-per row gives each batch row its own mask (per example and MC sample); "
          "--mask-per pass shares one mask across the batch and is refused by dropcli uncertainty.",
)
register(WEIGHTDROP)
