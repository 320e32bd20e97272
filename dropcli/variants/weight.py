"""Weight-level dropout on Linear and Conv layers: DropConnect (Wan et al. 2013) and Standout
(Ba & Frey 2013), both rewriting the layer together with the activation after it.

DropConnect masks individual WEIGHTS (and biases), not units. In dropcli's inverted form
(every dropcli variant keeps the trained scale: ``W~ = M*W/q``, ``b~ = m*b/q``), a unit's
pre-activation ``u = W~ x + b~`` has

    mean  mu = W x + b
    var   s2 = (p/q) * ((W*W)(x*x) + b*b)

Wan et al.'s Algorithm 2 (their test rule) approximates ``u`` by ``N(mu, s2)`` and outputs
``mean_z a(u_z)`` over Z draws, where ``a`` is the activation that follows the layer: the
output is the averaged ACTIVATION, not ``a`` of an averaged pre-activation and not
``(Wx)*m``. So the site absorbs the activation that directly follows the layer (relu,
sigmoid, tanh, gelu, silu, elu, leaky relu); without one, ``a`` is the identity and the test
rule is ``mu`` (the exact mean, which is the original layer).

The Z draws of the test rule are fixed at inject time (``eps``, shape [Z, units], from a
fixed seed, in antithetic pairs ``+e/-e``) and stored in the model: inference is
deterministic, the same in torch and ONNX, and the Z-sample average of an affine
activation is exactly ``mu``.

MC mode (``--mc-form gaussian``, the default): each example (each row of the tiled MC
batch) draws its own ``u ~ N(mu, s2)``, the per-example Gaussian of Algorithm 2, for the
cost of two matmuls. ``--mc-form mask`` instead draws the exact per-example Bernoulli masks
on the weights and the bias (the training rule; memory grows with rows x weights). Either
way no mask or draw is ever shared by the rows of a batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dropcli.backends.onnx.builder import OnnxBuilder
from dropcli.backends.onnx.layers import OnnxLayer, emit_activation
from dropcli.errors import UsageError
from dropcli.backends.torch.layers import activation_forward
from dropcli.model.kinds import ACT_KINDS, CONV, LINEAR
from dropcli.model.pooling import pool_windows
from dropcli.variants.base import P_PARAM, REPLACE, LayerSite, Param, VariantSpec, check_positive_int, keep_mask_like, normal_like, uniform_like
from dropcli.variants.registry import register

EPS_SEED = 20130616  # fixed: the test rule's Z draws are part of the model


def fixed_normal_draws(z: int, units: int) -> np.ndarray:
    """[z, units] standard normal draws from a fixed seed, in antithetic pairs (+e, -e); an
    odd z adds one unpaired draw. float64."""
    g = torch.Generator().manual_seed(EPS_SEED)
    half = z // 2
    e = torch.randn(half + (z % 2), units, generator=g, dtype=torch.float64)
    out = torch.cat([e[:half], -e[:half], e[half:]], 0)
    return out.numpy()


def _check_mc_form(v: str) -> str | None:
    return None if v in ("gaussian", "mask") else "choose gaussian (per-example Gaussian draws) or mask (exact per-example Bernoulli masks)"


class _LinearOrConvSite(LayerSite):
    """Helpers for sites built from a Linear or Conv layer."""

    def check_layer(self) -> None:
        if self.layer_cls not in (LINEAR, CONV):
            raise UsageError(f"{self.spec.name} rewrites Linear and Conv layers, not {self.layer_cls}")
        if self.layer_cls == CONV and self.layer_attrs.get("padding_mode", "zeros") != "zeros":
            raise UsageError(f"{self.spec.name}: convolutions with padding_mode={self.layer_attrs['padding_mode']!r} are not supported",
                             "choose other layers with --layers/--exclude")

    @property
    def W(self) -> torch.Tensor:  # noqa: N802 - the layer's weight
        return self._parameters["weight"]

    @property
    def B(self) -> torch.Tensor | None:  # noqa: N802 - the layer's bias (None: none)
        return self._parameters.get("bias")

    @property
    def units(self) -> int:
        return int(self.W.shape[0])

    def channel(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-unit vector shaped to broadcast over a layer output ``like``."""
        if self.layer_cls == LINEAR:
            return v
        return v.reshape((-1,) + (1,) * (like.dim() - 2))

    def pre_moments(self, x: torch.Tensor, bias_dropped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the masked pre-activation (inverted masks on the weights, and
        on the bias when ``bias_dropped``); the input ``x`` is deterministic."""
        mu = self.pre(x)
        r = self.p / self.q
        var = self.pre(x * x, weight=self.W * self.W, bias=False)
        if bias_dropped and self.B is not None:
            var = var + self.channel(self.B * self.B, var)
        return mu, var * r


class DropConnect(_LinearOrConvSite):
    """DropConnect (Wan, Zeiler, Zhang, LeCun & Fergus 2013, "Regularization of Neural
    Networks using DropConnect", ICML), on a Linear or Conv layer (and the activation after it).

    Test: Algorithm 2, ``mean_z a(u_z)``, ``u_z ~ N(mu, s2)`` with the Z fixed draws ``eps``.
    MC: a per-example draw ``a(u)``, ``u ~ N(mu, s2)`` (``mc_form="gaussian"``) or the exact
    per-example Bernoulli masks on weights and bias (``mc_form="mask"``).
    """

    samples_z: int
    mc_form: str

    def __init__(self, layer, p: float = 0.5, **params):
        super().__init__(layer, p, **params)
        eps = fixed_normal_draws(int(self.samples_z), self.units)
        self.register_buffer("eps", torch.from_numpy(eps).to(self.W.dtype))

    def _eps_view(self, like: torch.Tensor) -> torch.Tensor:
        z = self.eps.shape[0]
        if self.layer_cls == LINEAR:
            return self.eps.reshape((z,) + (1,) * (like.dim() - 1) + (-1,))
        return self.eps.reshape((z, 1, -1) + (1,) * (like.dim() - 2))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        mu, var = self.pre_moments(x, bias_dropped=True)
        if self.act is None:
            return mu  # the Z-sample mean of an affine function of u is mu (antithetic draws)
        u = mu.unsqueeze(0) + var.sqrt().unsqueeze(0) * self._eps_view(mu)
        return activation_forward(self.act, u).mean(0)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        if self.mc_form == "mask":
            return self.activate(self.masked_forward(x))
        mu, var = self.pre_moments(x, bias_dropped=True)
        return self.activate(mu + var.sqrt() * normal_like(mu))

    def masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(M*W/q) x + m*b/q`` with masks drawn per example (per row of ``x``)."""
        rows = x.shape[0]
        w = self.W
        keep_w = keep_mask_like(w.unsqueeze(0).expand((rows,) + tuple(w.shape)), self.q)
        wm = w * keep_w * (1.0 / self.q)  # [rows, *W.shape]
        if self.layer_cls == LINEAR:
            flat = x.reshape(rows, -1, x.shape[-1])
            y = torch.matmul(flat, wm.transpose(1, 2)).reshape(tuple(x.shape[:-1]) + (w.shape[0],))
        else:
            y = self._per_row_conv(x, wm)
        if self.B is not None:
            b = self.B
            keep_b = keep_mask_like(b.unsqueeze(0).expand(rows, -1), self.q)
            bm = b * keep_b * (1.0 / self.q)  # [rows, units]
            y = y + bm.reshape((rows,) + (1,) * (y.dim() - 2) + (-1,)) if self.layer_cls == LINEAR \
                else y + bm.reshape((rows, -1) + (1,) * (y.dim() - 2))
        return y

    def _per_row_conv(self, x: torch.Tensor, wm: torch.Tensor) -> torch.Tensor:
        """A convolution with a different kernel per row: the windows are gathered once
        (zero padding) and multiplied by each row's kernel."""
        a = self.layer_attrs
        rows, cin = x.shape[0], x.shape[1]
        g = int(a["groups"])
        cout = wm.shape[1]
        kernel = list(wm.shape[3:])
        sizes = tuple(int(s) for s in x.shape[2:])
        win = pool_windows(sizes, kernel, a["stride"], a["padding"], a["padding"], a["dilation"], False)
        pad: list[int] = []
        for bb, e in zip(reversed(win.pads_begin), reversed(win.pads_end)):
            pad += [bb, e]
        xp = F.pad(x, pad) if any(pad) else x
        idx = torch.as_tensor(win.index, device=x.device)
        cols = xp.flatten(2)[:, :, idx.reshape(-1)]  # [rows, Cin, L*K]
        L, K = int(np.prod(win.out_sizes)), win.window
        cols = cols.reshape(rows, g, cin // g, L, K).permute(0, 1, 3, 2, 4).reshape(rows, g, L, (cin // g) * K)
        wk = wm.reshape(rows, g, cout // g, (cin // g) * K)
        y = torch.matmul(cols, wk.transpose(2, 3))  # [rows, g, L, Cout/g]
        return y.permute(0, 1, 3, 2).reshape((rows, cout) + win.out_sizes)


# ----------------------------------------------------------------------------- ONNX


def _onnx_pre_moments(b: OnnxBuilder, layer: OnnxLayer, p: float, bias_dropped: bool) -> tuple[str, str, str]:
    """(mu, var, W_eff) of the masked pre-activation in ONNX."""
    info = layer.x_info
    x = layer.x
    w = layer.w_eff(b)
    c = layer.b_eff(b)
    mu = layer.lin(b, x, w, c)
    var = layer.lin(b, b.op("Mul", x, x), b.op("Mul", w, w), None)
    if bias_dropped and c is not None:
        csq = b.op("Mul", c, c)
        if layer.cls == CONV:
            csq = b.op("Reshape", csq, b.i64(layer.channel_shape()))
        var = b.op("Add", var, csq)
    var = b.op("Mul", var, b.f(p / (1.0 - p), info))
    return mu, var, w


def _check_onnx_layer(layer: OnnxLayer, what: str) -> None:
    if layer.cls not in (LINEAR, CONV):
        raise UsageError(f"{what} rewrites Linear and Conv layers, not {layer.op}")
    if layer.x_info.rank is None:
        raise UsageError(f"{what} needs the rank of the layer's input in ONNX, but it is unknown",
                         "run shape inference on the model (onnx.shape_inference)")


def _onnx_eps(b: OnnxBuilder, layer: OnnxLayer, z: int, out_rank: int) -> str:
    eps = fixed_normal_draws(z, layer.out_channels).astype(layer.x_info.np_dtype)
    if layer.cls == LINEAR:
        shape = [z] + [1] * (out_rank - 1) + [layer.out_channels]
    else:
        shape = [z, 1, layer.out_channels] + [1] * (out_rank - 2)
    return b.const(eps.reshape(shape), layer.x_info.np_dtype)


def _onnx_gaussian_average(b: OnnxBuilder, layer: OnnxLayer, mu: str, var: str, z: int) -> str:
    """Algorithm 2: mean over the Z fixed draws of act(mu + sd*eps)."""
    info = layer.x_info
    if layer.act is None:
        return mu
    rank = info.rank  # Gemm/MatMul/Conv keep the input's rank
    u = b.op("Add", b.op("Unsqueeze", mu, b.i64([0])),
             b.op("Mul", b.op("Unsqueeze", b.op("Sqrt", var), b.i64([0])), _onnx_eps(b, layer, z, rank)))
    return b.reduce("ReduceMean", emit_activation(b, layer.act, u, info), [0], keepdims=0)


def _onnx_masked_forward(b: OnnxBuilder, layer: OnnxLayer, p: float) -> str:
    """Exact per-example Bernoulli masks on the weight and bias (``mc_form="mask"``)."""
    info = layer.x_info
    q = 1.0 - p
    x = layer.x
    w = layer.w_eff(b)
    wshape = list(layer.weight_value.shape)
    rows = b.op("Slice", b.op("Shape", x), b.i64([0]), b.i64([1]))
    mshape = b.op("Concat", rows, b.i64(wshape), axis=0)
    keep = b.op("Cast", b.op("Less", b.op("RandomUniformLike", b.zeros_of_shape(mshape, info), dtype=info.elem_type),
                             b.f(q, info)), to=info.elem_type)
    wm = b.op("Mul", b.op("Mul", keep, w), b.f(1.0 / q, info))  # [rows, *W.shape]
    units = layer.out_channels
    if layer.cls == LINEAR:
        if layer.op == "Gemm" and int(layer.attrs.get("transB", 0)):
            wm = b.op("Transpose", wm, perm=[0, 2, 1])  # [rows, in, out]
        in_f = wshape[1] if (layer.op == "Gemm" and int(layer.attrs.get("transB", 0))) else wshape[0]
        flat = b.op("Reshape", x, b.i64([0, -1, in_f]))
        y3 = b.op("MatMul", flat, wm)  # [rows, L, out]
        lead = b.op("Slice", b.op("Shape", x), b.i64([0]), b.i64([-1]))
        y = b.op("Reshape", y3, b.op("Concat", lead, b.i64([units]), axis=0))
        bias_shape = [0] + [1] * (info.rank - 2) + [units]
    else:
        y = _onnx_per_row_conv(b, layer, wm)
        bias_shape = [0, units] + [1] * layer.nd
    c = layer.b_eff(b)
    if c is not None:
        bshape = b.op("Concat", rows, b.i64([units]), axis=0)
        keep_b = b.op("Cast", b.op("Less", b.op("RandomUniformLike", b.zeros_of_shape(bshape, info), dtype=info.elem_type),
                                   b.f(q, info)), to=info.elem_type)
        bm = b.op("Mul", b.op("Mul", keep_b, b.op("Reshape", c, b.i64([units]))), b.f(1.0 / q, info))
        y = b.op("Add", y, b.op("Reshape", bm, b.i64(bias_shape)))
    return y


def _onnx_per_row_conv(b: OnnxBuilder, layer: OnnxLayer, wm: str) -> str:
    info = layer.x_info
    a = layer.attrs
    w = layer.weight_value
    nd = layer.nd
    cout, cin_g = int(w.shape[0]), int(w.shape[1])
    kernel = [int(k) for k in w.shape[2:]]
    g = int(a.get("group", 1))
    sizes = info.static_dims(list(range(2, 2 + nd)), "dropconnect --mc-form mask on a Conv")
    strides = [int(v) for v in a.get("strides", [1] * nd)]
    dil = [int(v) for v in a.get("dilations", [1] * nd)]
    pads = [int(v) for v in a.get("pads", [0] * (2 * nd))]
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = -(-sizes[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - sizes[i])
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[nd + i] = lo, total - lo
    win = pool_windows(sizes, kernel, strides, pads[:nd], pads[nd:], dil, False)
    xp = layer.x
    if any(win.pads_begin) or any(win.pads_end):
        xp = b.op("Pad", xp, b.i64([0, 0, *win.pads_begin, 0, 0, *win.pads_end]))
    flat = b.op("Reshape", xp, b.i64([0, 0, -1]))
    L, K = int(np.prod(win.out_sizes)), win.window
    cols = b.op("Gather", flat, b.i64(win.index.reshape(-1)), axis=2)  # [N, Cin, L*K]
    cols = b.op("Reshape", cols, b.i64([0, g, cin_g, L, K]))
    cols = b.op("Transpose", cols, perm=[0, 1, 3, 2, 4])
    cols = b.op("Reshape", cols, b.i64([0, g, L, cin_g * K]))
    wk = b.op("Transpose", b.op("Reshape", wm, b.i64([0, g, cout // g, cin_g * K])), perm=[0, 1, 3, 2])
    y = b.op("MatMul", cols, wk)  # [N, g, L, Cout/g]
    y = b.op("Transpose", y, perm=[0, 1, 3, 2])
    return b.op("Reshape", y, b.i64([0, cout, *win.out_sizes]))


def dropconnect_onnx(b: OnnxBuilder, layer: OnnxLayer, p: float, samples_z: int, mc_form: str) -> tuple[str, str]:
    _check_onnx_layer(layer, "dropconnect")
    mu, var, _ = _onnx_pre_moments(b, layer, p, bias_dropped=True)
    det = _onnx_gaussian_average(b, layer, mu, var, int(samples_z))
    if mc_form == "mask":
        stoch = emit_activation(b, layer.act, _onnx_masked_forward(b, layer, p), layer.x_info)
    else:
        u = b.op("Add", mu, b.op("Mul", b.op("Sqrt", var), b.op("RandomNormalLike", mu, dtype=layer.x_info.elem_type)))
        stoch = emit_activation(b, layer.act, u, layer.x_info)
    return stoch, det


SAMPLES_Z = Param("samples_z", int, 64, "dropconnect: Z, the Gaussian draws averaged by the test rule (Wan et al. Algorithm 2)",
                  check_positive_int)
MC_FORM = Param("mc_form", str, "gaussian",
                "dropconnect MC mode: gaussian (a per-example draw of the moment-matched pre-activation) or mask "
                "(exact per-example Bernoulli masks on weights and bias)", _check_mc_form)

register(VariantSpec(
    name="dropconnect", summary="DropConnect: drop individual weights and biases (per example)",
    formula="u = (M*W/q) x + m*b/q, M, m ~ Bernoulli(q) per example; y = a(u); MC: u ~ N(mu, s2) per example "
            "(mu = Wx + b, s2 = (p/q)((W*W)(x*x) + b*b)), or the exact masks with --mc-form mask",
    test_rule="y = mean_z a(u_z), u_z = mu + sqrt(s2) * eps_z over Z fixed draws (Wan et al. Algorithm 2); no activation: y = mu",
    attaches=REPLACE, replaces=(LINEAR, CONV), absorbs=ACT_KINDS, identity_at_test=False,
    paper="Wan, Zeiler, Zhang, LeCun & Fergus 2013, Regularization of Neural Networks using DropConnect (ICML)",
    torch_module=DropConnect, onnx_builder=dropconnect_onnx,
    params=(P_PARAM, SAMPLES_Z, MC_FORM), aliases=("drop-connect", "dropconnect-wan"),
    notes="Rewrites Linear and Conv layers (every attribute kept) together with the activation right after them "
          "(relu, sigmoid, tanh, gelu, silu, elu, leaky relu), because the test rule averages the activation over "
          "Gaussian draws of the pre-activation, not (Wx)*m. Inverted like every dropcli variant: masks are scaled "
          "by 1/q, so the mean pre-activation is the trained Wx + b (Wan et al.'s vanilla form is the same up to that "
          "factor). The Z test-time draws are fixed (antithetic pairs from a fixed seed) and stored in the model, so "
          "inference is deterministic and equals mu exactly when no activation follows. MC draws are per example, "
          "never shared by a batch. For a Conv the Gaussian form samples every output unit independently (the "
          "correlation a shared kernel mask induces across positions is not modelled); --mc-form mask is exact "
          "(memory: rows x weights). EfficientNet's drop_connect_rate is droppath, not this.",
))


# ----------------------------------------------------------------------------- Standout


class Standout(_LinearOrConvSite):
    """Standout (Ba & Frey 2013, "Adaptive dropout for training deep neural networks", NeurIPS).

    A belief network with weights ``pi = alpha*W + beta`` gives each unit its KEEP probability
    ``g(pi_j^T x)``, ``g = sigmoid``; MC: ``y_j = m_j f(u_j)``, ``m_j ~ Bernoulli(g(pi_j^T x))``
    per example and unit, ``u = W x + b``; test: ``y = g(pi x) * f(W x + b)`` (not ``(1-g) f``).
    The bias is the weight of a constant input 1, as in the paper's notation, so
    ``pi_j^T x = alpha*(w_j^T x + b_j) + beta*(sum_i x_i + 1)``, the sum running over the unit's
    inputs (a conv unit's receptive field, zero padding counting 0). With ``alpha > 0`` a unit
    with a large pre-activation is KEPT more often.
    """

    alpha: float
    beta: float

    def belief(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``g(pi x)``: the keep probability of every unit."""
        s = self.alpha * u
        if self.beta != 0.0:
            ones = torch.ones_like(self.W)
            s = s + self.beta * (self.pre(x, weight=ones, bias=False) + 1.0)
        return torch.sigmoid(s)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        u = self.pre(x)
        return self.belief(x, u) * self.activate(u)

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        u = self.pre(x)
        y = self.activate(u)
        keep = uniform_like(y) < self.belief(x, u)
        return torch.where(keep, y, torch.zeros_like(y))


def standout_onnx(b: OnnxBuilder, layer: OnnxLayer, alpha: float, beta: float) -> tuple[str, str]:
    _check_onnx_layer(layer, "standout")
    info = layer.x_info
    u = layer.lin(b, layer.x, layer.w_eff(b), layer.b_eff(b))
    s = b.op("Mul", u, b.f(alpha, info))
    if beta != 0.0:
        ones = b.const(np.ones(layer.weight_value.shape), info.np_dtype)
        field = b.op("Add", layer.lin(b, layer.x, ones, None), b.f(1.0, info))
        s = b.op("Add", s, b.op("Mul", field, b.f(beta, info)))
    g = b.op("Sigmoid", s)
    y = emit_activation(b, layer.act, u, info)
    det = b.op("Mul", g, y)
    keep = b.op("Less", b.op("RandomUniformLike", y, dtype=info.elem_type), g)
    stoch = b.op("Where", keep, y, b.f(0.0, info))
    return stoch, det


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


ALPHA = Param("alpha", float, 1.0, "standout: pi = alpha*W + beta, the scale of the belief network", _finite)
BETA = Param("beta", float, 0.0, "standout: pi = alpha*W + beta, the shift of the belief network", _finite)

register(VariantSpec(
    name="standout", summary="Standout / adaptive dropout: keep probability g(pi x) from a belief network pi = alpha*W + beta",
    formula="y = m * f(W x + b),  m_j ~ Bernoulli(sigmoid(pi_j^T x)) per example,  pi = alpha*W + beta  (g = keep probability)",
    test_rule="y = sigmoid(pi x) * f(W x + b)",
    attaches=REPLACE, replaces=(LINEAR, CONV), absorbs=ACT_KINDS, identity_at_test=False,
    paper="Ba & Frey 2013, Adaptive dropout for training deep neural networks (NeurIPS)",
    torch_module=Standout, onnx_builder=standout_onnx, params=(ALPHA, BETA),
    aliases=("adaptive-dropout",),
    notes="No fixed p: each unit's keep probability is sigmoid(alpha*(w_j.x + b_j) + beta*(sum of its inputs + 1)) "
          "(the bias as the weight of a constant input; a conv unit sums its receptive field). alpha = 1, beta = 0 by "
          "default (the paper treats both as hyperparameters and gives no universal value). The test rule multiplies "
          "by g, the keep probability -- not 1 - g -- and with alpha > 0 large pre-activations are kept more.",
))
