"""Sparse variational dropout as an injectable site (Molchanov, Ashukha & Vetrov 2017).

``dropcli inject --variant sparse-vd`` rewrites Linear and Conv layers into sparse-VD layers
that the user trains with their own loop, and that ``dropcli prune`` later prunes by their own
scores, without ``--data`` (issue: prune). The math is in docs/learned.md (sparse variational dropout), shared with
:mod:`dropcli.prune.layers` (one KL, one log-alpha rule):

- per weight ``w ~ N(theta, sigma^2)``; ``theta`` is the trained weight (kept exactly, same
  storage and dtype), ``log sigma^2`` a new parameter of the weight's shape, initialised to
  ``--log-sigma2`` (default -10, the paper's);
- ``log alpha = log sigma^2 - log(theta^2 + 1e-8)``, clamped to [-8, 8];
- MC / training mode (``dropcli_mc`` True): the local reparameterisation trick, one draw per
  output unit and example: ``y = W x + b + sqrt((x*x) sigma^2 + 1e-8) * eps``, ``eps ~ N(0, 1)``
  drawn through the noise API (so MC samples are per example and keyed);
- inference (the paper's test rule): ``y = (theta * [log alpha < t]) x + b`` with ``t`` =
  ``--threshold`` (default 3, a drop rate above 0.95).

So right after injection the inference output equals the original model's, except for the
weights already below the threshold: with ``log sigma^2 = -10`` those are ``|theta| <
exp(-6.5) ~ 1.5e-3``. The KL term the user adds to their loss is ``sum kl_sparse_vd(log
alpha)`` over the sites (see the README); its parameters are ``<site>.weight`` and
``<site>.log_sigma2`` in every format dropcli writes.

ONNX: the site references the trained weight initializer and adds one initializer
``<site>/log_sigma2``; the masked weight ``Where(log alpha < t, theta, 0)`` is computed in the
graph, so retraining the initializers changes the test rule consistently.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dropcli.backends.onnx.builder import OnnxBuilder
from dropcli.backends.onnx.layers import OnnxLayer
from dropcli.errors import UsageError
from dropcli.model.kinds import CONV, LINEAR
from dropcli.prune.layers import INIT_LOG_SIGMA2, LOG_ALPHA_RANGE, kl_sparse_vd
from dropcli.variants.base import REPLACE, LayerSite, Param, VariantSpec, normal_like
from dropcli.variants.registry import register

LOG_SIGMA2_PARAM_NAME = "log_sigma2"


def _check_threshold(t: float) -> str | None:
    lo, hi = LOG_ALPHA_RANGE
    if not math.isfinite(t) or not lo < t <= hi:
        return f"log alpha is clamped to [{lo:g}, {hi:g}]; choose a threshold in ({lo:g}, {hi:g}] (the paper's is 3)"
    return None


def _check_log_sigma2(v: float) -> str | None:
    return None if math.isfinite(v) and v < 0 else "choose a negative log variance (the paper's start is -10)"


THRESHOLD = Param("threshold", float, 3.0, "prune weights whose log alpha exceeds this at test time", _check_threshold)
LOG_SIGMA2 = Param("log_sigma2", float, INIT_LOG_SIGMA2, "initial log sigma^2 of every weight", _check_log_sigma2)


class SparseVD(LayerSite):
    """A Linear or Conv layer with sparse variational dropout on every weight."""

    threshold: float

    def __init__(self, layer, p: float = 0.0, **params):
        super().__init__(layer, 0.0, **params)
        w = self._parameters["weight"]
        self.log_sigma2 = nn.Parameter(torch.full_like(w.detach(), float(params.get("log_sigma2", INIT_LOG_SIGMA2))))

    def check_layer(self) -> None:
        if self.layer_cls not in (LINEAR, CONV):
            raise UsageError(f"sparse-vd rewrites Linear and Conv layers, not {self.layer_cls}")

    def log_alpha(self) -> torch.Tensor:
        w = self._parameters["weight"]
        return torch.clamp(self.log_sigma2 - torch.log(w * w + 1e-8), *LOG_ALPHA_RANGE)

    def kl(self) -> torch.Tensor:
        """This site's KL term (sum over weights), to add to a training loss."""
        return kl_sparse_vd(self.log_alpha()).sum()

    def keep_mask(self) -> torch.Tensor:
        return self.log_alpha() < self.threshold

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        return self.pre(x, weight=w * self.keep_mask().to(w.dtype))

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.pre(x)
        var = self.pre(x * x, weight=torch.exp(self.log_sigma2), bias=False)
        return mu + torch.sqrt(var + 1e-8) * normal_like(mu)


def sparse_vd_onnx(b: OnnxBuilder, layer: OnnxLayer, threshold: float, log_sigma2: float) -> tuple[str, str]:
    if layer.cls not in (LINEAR, CONV) or layer.weight is None or layer.weight_value is None:
        raise UsageError(f"sparse-vd rewrites Linear and Conv layers with stored weights, not {layer.op}")
    x, info = layer.x, layer.x_info
    theta = layer.weight  # the trained initializer, referenced (Gemm's alpha is applied by w_eff)
    wv = layer.weight_value
    ls2 = b.fresh(LOG_SIGMA2_PARAM_NAME)
    from onnx import numpy_helper

    b.initializers.append(numpy_helper.from_array(np.full(wv.shape, log_sigma2, dtype=wv.dtype), ls2))
    lo, hi = LOG_ALPHA_RANGE
    winfo = info  # the weight has the input's float type (the layer multiplies them)
    la = b.op("Sub", ls2, b.op("Log", b.op("Add", b.op("Mul", theta, theta), b.f(1e-8, winfo))))
    la = b.op("Clip", la, b.f(lo, winfo), b.f(hi, winfo))
    keep = b.op("Less", la, b.f(threshold, winfo))
    masked = b.op("Where", keep, theta, b.f(0.0, winfo))
    alpha = float(layer.attrs.get("alpha", 1.0)) if layer.op == "Gemm" else 1.0
    w_masked = masked if alpha == 1.0 else b.op("Mul", masked, b.f(alpha, winfo))
    det = layer.lin(b, x, w_masked, layer.b_eff(b))
    mu = layer.lin(b, x, layer.w_eff(b), layer.b_eff(b))
    s2 = b.op("Exp", ls2)
    if alpha != 1.0:
        s2 = b.op("Mul", s2, b.f(alpha * alpha, winfo))
    var = layer.lin(b, b.op("Mul", x, x), s2, None)
    eps = b.op("RandomNormalLike", mu, dtype=info.elem_type)
    stoch = b.op("Add", mu, b.op("Mul", b.op("Sqrt", b.op("Add", var, b.f(1e-8, info))), eps))
    return stoch, det


register(VariantSpec(
    name="sparse-vd", summary="sparse variational dropout on every weight (train it, then `dropcli prune` it)",
    formula="y = W x + b + sqrt((x*x) sigma^2) * eps  (local reparameterisation), log alpha = log sigma^2 - log theta^2",
    test_rule="y = (theta * [log alpha < t]) x + b",
    attaches=REPLACE, replaces=(LINEAR, CONV), identity_at_test=False,
    paper="Molchanov, Ashukha & Vetrov 2017, Variational Dropout Sparsifies Deep Neural Networks (ICML)",
    torch_module=SparseVD, onnx_builder=sparse_vd_onnx, params=(THRESHOLD, LOG_SIGMA2),
    aliases=("sparsevd", "svd"),
    notes="Adds a log sigma^2 parameter per weight (<site>.log_sigma2) beside the trained weight (<site>.weight). Train "
          "with the MC switch on and loss + sum KL (docs/learned.md: k1*sigmoid(-(k2 + k3*log alpha)) + "
          "0.5*softplus(-log alpha)); then `dropcli prune OUT -o SMALL` prunes by these scores without --data. At inject "
          "time only weights with |theta| < exp((log_sigma2 - threshold)/2) are already masked.",
))
