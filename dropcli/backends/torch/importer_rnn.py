"""ONNX ``LSTM`` / ``GRU`` / ``RNN`` nodes as ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` modules (for
:mod:`dropcli.backends.torch.importer`).

ONNX stacks the gates of its weights in another order than torch (ONNX operator spec, LSTM and
GRU): ONNX LSTM ``W = [W_i; W_o; W_f; W_c]`` against torch's ``[W_i; W_f; W_g; W_o]`` (``g`` is
ONNX's cell gate ``c``), and ONNX GRU ``[W_z; W_r; W_h]`` against torch's ``[W_r; W_z; W_n]``.
The bias input ``B`` is ``[Wb; Rb]``: torch's ``bias_ih`` and ``bias_hh``. torch's GRU applies
the reset gate after the recurrent linear map, which is ONNX's ``linear_before_reset = 1``;
the other form has no torch module and is refused, as are peepholes, clipping, non-default
activations (a plain ``RNN`` takes tanh or relu, as ``nn.RNN``'s ``nonlinearity``), coupled input/forget gates, a reverse-only direction, ``sequence_lens``, and the
batch-major ``layout = 1`` (which onnxruntime does not run either, so no import could be checked).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dropcli.errors import DropcliError

# position in ONNX's gate stack of each of torch's gates, in torch's order
GATE_ORDER = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2), "RNN": (0,)}
DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def reorder(m: np.ndarray, op: str, hidden: int) -> np.ndarray:
    """Rows of an ONNX gate stack (``[gates * hidden, ...]``) in torch's gate order."""
    return np.concatenate([m[k * hidden:(k + 1) * hidden] for k in GATE_ORDER[op]], axis=0)


def rnn_module(node, a: dict[str, Any], ins: list[str], consts: dict[str, np.ndarray],
               refuse: Callable[[str], DropcliError]) -> tuple[nn.Module, int]:
    """The module for ONNX ``node`` (a sequence-major LSTM, GRU or RNN with constant weights) and
    its number of directions."""
    op = node.op_type
    gates = GATES[op]
    direction = _text(a.get("direction", "forward"))
    if direction not in ("forward", "bidirectional"):
        raise refuse(f"direction={direction!r} has no torch module (nn.{op} runs forward, or both ways)")
    ndir = 2 if direction == "bidirectional" else 1
    acts = tuple(_text(x).lower() for x in a.get("activations", ())) or DEFAULT_ACTIVATIONS[op] * ndir
    allowed = [DEFAULT_ACTIVATIONS[op] * ndir] + ([("relu",) * ndir] if op == "RNN" else [])
    if acts not in allowed or "activation_alpha" in a or "activation_beta" in a:
        raise refuse(f"activations {list(acts)} differ from nn.{op}'s")
    if "clip" in a:
        raise refuse("cell clipping has no torch equivalent")
    if op == "LSTM" and int(a.get("input_forget", 0)):
        raise refuse("coupled input and forget gates (input_forget=1) have no torch equivalent")
    if op == "GRU" and not int(a.get("linear_before_reset", 0)):
        raise refuse("linear_before_reset=0 (the reset gate before the recurrent matrix) has no torch "
                      "equivalent: nn.GRU computes linear_before_reset=1")
    if len(ins) > 4 and ins[4]:
        raise refuse("sequence_lens (per-row lengths) is not supported; export without packed sequences")
    if op == "LSTM" and len(ins) > 7 and ins[7]:
        raise refuse("peephole weights (input P) have no torch equivalent")
    w, r = consts.get(ins[1]), consts.get(ins[2])
    b = consts.get(ins[3]) if len(ins) > 3 and ins[3] else None
    if w is None or r is None or (len(ins) > 3 and ins[3] and b is None):
        raise refuse("only constant weights and biases are supported")
    hidden = int(a.get("hidden_size", r.shape[-1]))
    if int(a.get("layout", 0)):
        raise refuse("layout=1 (batch-major) is not run by onnxruntime either; export sequence-major (layout=0)")
    if w.shape[0] != ndir or w.shape[1] != gates * hidden or r.shape[1:] != (gates * hidden, hidden):
        raise refuse(f"weights of shape {w.shape} / {r.shape} do not fit hidden_size={hidden}")
    if b is None:
        b = np.zeros((ndir, 2 * gates * hidden), np.float32)
    if op == "RNN":
        mod: nn.Module = nn.RNN(int(w.shape[2]), hidden, num_layers=1, nonlinearity=acts[0], bias=True, bidirectional=ndir == 2)
    else:
        mod = (nn.LSTM if op == "LSTM" else nn.GRU)(int(w.shape[2]), hidden, num_layers=1, bias=True, bidirectional=ndir == 2)
    with torch.no_grad():
        for d in range(ndir):
            sfx = "_reverse" if d else ""
            for pname, v in ((f"weight_ih_l0{sfx}", w[d]), (f"weight_hh_l0{sfx}", r[d]),
                             (f"bias_ih_l0{sfx}", b[d][:gates * hidden]), (f"bias_hh_l0{sfx}", b[d][gates * hidden:])):
                getattr(mod, pname).copy_(torch.from_numpy(np.ascontiguousarray(reorder(v, op, hidden), dtype=np.float32)))
    return mod.eval(), ndir
