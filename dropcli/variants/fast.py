"""Fast dropout (Wang & Manning 2013, "Fast dropout training", ICML): a Linear layer whose
dropped-out pre-activation is replaced by its Gaussian approximation.

docs/variants.md (fastdropout), vanilla convention: ``S = sum_i m_i w_i x_i`` with
``m_i ~ Bernoulli(q)`` is taken as ``N(mu, s2)``, ``mu = q w^T x``,
``s2 = q(1-q) sum_i w_i^2 x_i^2``. dropcli keeps the trained layer's function, so it works
in the inverted form (weights ``W/q``, the bias not dropped), which is the same statement
with ``w = W/q``::

    mu = W x + b,    s2 = q(1-q) (W/q ∘ W/q)(x ∘ x) = (p/q) (W∘W)(x∘x)

(``q w^T x = W x`` and ``q(1-q)/q^2 = p/q``); at ``p = 0`` the site is the layer itself.

The activation that directly follows the Linear layer (its only consumer) is absorbed, as in
DropConnect, because the paper's test rule integrates the activation over the Gaussian:

- MC mode (the paper's "sampled" form): per example and unit ``S = mu + s * z``,
  ``z ~ N(0, 1)`` (through ``normal_like``, so the MC engine keys it per example), then the
  activation ``a(S)``;
- inference mode (the "integrated" form), ``E[a(S)]`` for ``S ~ N(mu, s2)``:

  * no activation: ``mu`` (exact);
  * relu: ``mu Phi(mu/s) + s phi(mu/s)`` (exact);
  * leaky relu (slope ``a``): ``a mu + (1 - a) E[relu(S)]`` (exact, relu(x) - a relu(-x) form);
  * gelu (erf form, ``x Phi(x)``): ``mu Phi(t) + s2/r phi(t)``, ``r = sqrt(1 + s2)``,
    ``t = mu/r`` (exact: Stein's lemma and ``E[Phi(S)] = Phi(mu/r)``);
  * sigmoid: ``sigmoid(mu / sqrt(1 + pi s2 / 8))`` (the paper's probit approximation;
    |error| <= 2 max_x |sigmoid(x) - Phi(sqrt(pi/8) x)| < 0.04);
  * tanh: ``2 sigmoid(2 mu / sqrt(1 + pi s2 / 2)) - 1`` (the same approximation through
    ``tanh(x) = 2 sigmoid(2x) - 1``);
  * elu (``alpha``): ``E[relu(S)] + alpha (E[e^S; S <= 0] - Phi(-mu/s))`` (exact), with
    ``E[e^S; S <= 0] = e^(mu + s2/2) Phi(a)``, ``a = -mu/s - s``; for ``a < -2`` it is computed as
    ``phi(mu/s) R(a)`` with the Mills ratio ``R = Phi/phi`` by its continued fraction (24 terms,
    relative error < 1e-7), which neither overflows nor loses Phi's tail to float32 rounding;
  * silu (``x sigmoid(x)``): the probit approximation ``sigmoid(x) ~ Phi(lam x)``,
    ``lam^2 = pi/8``, then exactly as gelu: ``mu Phi(t) + lam s2/r phi(t)``,
    ``r = sqrt(1 + lam^2 s2)``, ``t = lam mu / r`` (|error| <= max_x |x| |sigmoid(x) - Phi(lam x)|
    plus the tail of that bound, see the tests); torch graphs only, because ONNX graphs spell silu
    as Sigmoid and Mul, which is not absorbed;
  * gelu's tanh approximation: no closed form; refused with a clear error (exclude that layer).

  Where ``s2 = 0`` (``p = 0`` or an all-zero input row) the output is ``a(mu)``.

:func:`gauss_expect` / :func:`gauss_moments` (the moment helpers, also used by
``dropcli uncertainty --method moments``) are kept local to this family module.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from dropcli.backends.onnx.builder import OnnxBuilder, TensorInfo
from dropcli.backends.onnx.layers import OnnxLayer, emit_activation
from dropcli.errors import UsageError
from dropcli.backends.torch.layers import activation_forward
from dropcli.model.kinds import LINEAR, Activation
from dropcli.variants.base import REPLACE, LayerSite, VariantSpec, normal_like
from dropcli.variants.registry import register

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)
# activations with a closed-form (exact or probit-approximated) Gaussian expectation
EXACT_ACTS = ("relu", "leakyrelu", "gelu", "elu")  # gelu: the erf form only
PROBIT_ACTS = ("sigmoid", "tanh", "silu")
TEST_RULE_ACTS = EXACT_ACTS + PROBIT_ACTS
LAM = math.sqrt(math.pi / 8.0)  # sigmoid(x) ~ Phi(LAM x)
MILLS_FROM = -2.0  # E[e^S; S <= 0] by the Mills-ratio continued fraction below this a
MILLS_TERMS = 24


def _ncdf(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(a * INV_SQRT2))


def _npdf(a: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * a * a) * INV_SQRT2PI


def _relu_mean(mu: torch.Tensor, s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    a = mu / torch.where(pos, s, torch.ones_like(s))
    return torch.where(pos, mu * _ncdf(a) + s * _npdf(a), torch.relu(mu))


def gauss_expect(act: Activation | None, mu: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """The fast-dropout test rule: ``E[act(S)]``, ``S ~ N(mu, s2)`` (see the module doc)."""
    if act is None:
        return mu
    pos = s2 > 0
    s = torch.sqrt(s2)
    if act.kind == "relu":
        return _relu_mean(mu, s, pos)
    if act.kind == "leakyrelu":
        slope = float(act.params.get("negative_slope", 0.01))
        return slope * mu + (1.0 - slope) * _relu_mean(mu, s, pos)
    if act.kind in ("gelu", "silu"):  # E[S Phi(c S)], c = 1 (gelu) or LAM (silu's probit form)
        c = 1.0 if act.kind == "gelu" else LAM
        r = torch.sqrt(1.0 + (c * c) * s2)
        t = (c * mu) / r
        return mu * _ncdf(t) + (c * s2 / r) * _npdf(t)
    if act.kind == "elu":
        alpha = float(act.params.get("alpha", 1.0))
        ss = torch.where(pos, s, torch.ones_like(s))
        c = mu / ss
        a = -c - ss
        direct = torch.exp(mu + 0.5 * s2) * _ncdf(torch.clamp(a, min=MILLS_FROM))
        x = torch.clamp(-a, min=-MILLS_FROM)
        f = x
        for k in range(MILLS_TERMS, 0, -1):
            f = x + k / f
        tail = torch.where(a >= MILLS_FROM, direct, _npdf(c) / f)
        val = _relu_mean(mu, s, pos) + alpha * (tail - _ncdf(-c))
        return torch.where(pos, val, F.elu(mu, alpha=alpha))
    if act.kind == "sigmoid":
        return torch.sigmoid(mu / torch.sqrt(1.0 + (math.pi / 8.0) * s2))
    if act.kind == "tanh":
        return 2.0 * torch.sigmoid(2.0 * mu / torch.sqrt(1.0 + (math.pi / 2.0) * s2)) - 1.0
    raise UsageError(f"fastdropout has no closed-form test rule for {act}")


# Gauss-Hermite nodes for E[f(S)], S ~ N(mu, s2), with a smooth f (sigmoid, tanh, ...):
# E f(S) = sum_k w_k f(mu + sqrt(2) s t_k) / sqrt(pi); 64 nodes integrate these bounded
# smooth functions to float32 precision for any s2 the layers produce.
_GH_T, _GH_W = np.polynomial.hermite.hermgauss(64)


# sigmoid / tanh: constant beyond +-L (to float64 precision), so E[a(S)] and E[a(S)^2] are a
# 256-node Gauss-Legendre rule on [max(mu - 9s, -L), min(mu + 9s, L)] plus the closed-form mass
# of the tails (Gauss-Hermite alone resolves the near-step a(mu + s t) of a wide S badly).
_BOUNDED = {"sigmoid": (37.0, 0.0, 1.0), "tanh": (19.0, -1.0, 1.0)}  # L, a(-inf), a(+inf)
_GL_X, _GL_W = np.polynomial.legendre.leggauss(256)


def _bounded_moments(act: Activation, mu: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L, lo_val, hi_val = _BOUNDED[act.kind]
    pos = s > 0
    ss = torch.where(pos, s, torch.ones_like(s))
    lo = torch.clamp(mu - 9.0 * ss, min=-L)
    hi = torch.clamp(mu + 9.0 * ss, max=L)
    width = torch.clamp(hi - lo, min=0.0)
    gx = torch.as_tensor(_GL_X, dtype=torch.float64, device=mu.device)
    gw = torch.as_tensor(_GL_W, dtype=torch.float64, device=mu.device)
    mean = torch.zeros_like(mu)
    second = torch.zeros_like(mu)
    flat = [t.reshape(-1) for t in (mu, ss, lo, width)]
    m_out, e2_out = mean.reshape(-1), second.reshape(-1)
    for a in range(0, flat[0].numel(), 4096):  # bounded memory: 4096 elements x 256 nodes at a time
        mu_, s_, lo_, w_ = (t[a:a + 4096].unsqueeze(-1) for t in flat)
        x = lo_ + (gx + 1.0) * 0.5 * w_
        dens = torch.exp(-0.5 * ((x - mu_) / s_) ** 2) / (s_ * math.sqrt(2.0 * math.pi))
        f = activation_forward(act, x)
        wts = gw * 0.5 * w_ * dens
        m_out[a:a + 4096] = (f * wts).sum(-1)
        e2_out[a:a + 4096] = (f * f * wts).sum(-1)
    # tails beyond -L / +L (where the interval was clipped)
    p_hi = 0.5 * torch.erfc((L - mu) / ss * INV_SQRT2)
    p_lo = 0.5 * torch.erfc((L + mu) / ss * INV_SQRT2)
    mean = mean + p_hi * hi_val + p_lo * lo_val
    second = second + p_hi * hi_val ** 2 + p_lo * lo_val ** 2
    a0 = activation_forward(act, mu)
    mean = torch.where(pos, mean, a0)
    var = torch.where(pos, torch.clamp(second - mean * mean, min=0.0), torch.zeros_like(mu))
    return mean, var


def gauss_moments(act: Activation | None, mu: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Mean and variance of ``act(S)``, ``S ~ N(mu, s2)``, and whether they are exact:
    closed forms for identity/relu/leaky relu; for sigmoid/tanh Gauss-Legendre on the finite
    range plus closed-form tails, exact to float64 precision; for gelu/silu/elu 64-node
    Gauss-Hermite (approximate: not exact for wide S). Used by ``uncertainty --method moments``."""
    if act is None:
        return mu, s2, True
    s2 = torch.clamp(s2, min=0.0)
    pos = s2 > 0
    s = torch.sqrt(s2)
    if act.kind in ("relu", "leakyrelu"):
        a = mu / torch.where(pos, s, torch.ones_like(s))
        cdf, pdf = _ncdf(a), _npdf(a)
        # E[relu(S)], E[relu(S)^2], and the same for relu(-S)
        m_pos = torch.where(pos, mu * cdf + s * pdf, torch.relu(mu))
        e2_pos = torch.where(pos, (mu * mu + s2) * cdf + mu * s * pdf, torch.relu(mu) ** 2)
        m_neg = torch.where(pos, -mu * (1.0 - cdf) + s * pdf, torch.relu(-mu))
        e2_neg = torch.where(pos, (mu * mu + s2) * (1.0 - cdf) - mu * s * pdf, torch.relu(-mu) ** 2)
        slope = float(act.params.get("negative_slope", 0.01)) if act.kind == "leakyrelu" else 0.0
        mean = m_pos - slope * m_neg
        second = e2_pos + slope * slope * e2_neg  # relu(S) relu(-S) = 0
        return mean, torch.clamp(second - mean * mean, min=0.0), True
    dt = mu.dtype
    if act.kind in _BOUNDED:  # to float64 precision (checked against a fine trapezoid: < 1e-12)
        mean, var = _bounded_moments(act, mu.double(), s.double())
        return mean.to(dt), var.to(dt), True
    t = torch.as_tensor(_GH_T, dtype=torch.float64, device=mu.device)
    w = torch.as_tensor(_GH_W / math.sqrt(math.pi), dtype=torch.float64, device=mu.device)
    pts = mu.double().unsqueeze(-1) + math.sqrt(2.0) * s.double().unsqueeze(-1) * t
    f = activation_forward(act, pts)
    mean = (f * w).sum(-1)
    var = torch.clamp(((f - mean.unsqueeze(-1)) ** 2 * w).sum(-1), min=0.0)
    return mean.to(dt), var.to(dt), False


def check_fast_act(act: Activation | None, where: str = "") -> None:
    tanh_gelu = act is not None and act.kind == "gelu" and act.params.get("approximate", "none") != "none"
    if act is not None and (act.kind not in TEST_RULE_ACTS or tanh_gelu):
        raise UsageError(f"fastdropout has no closed-form test rule E[{act.kind}(S)] for the Linear layer{where} "
                         f"followed by {act}",
                         "exclude that layer with --exclude, or choose another variant (dropconnect, standard)")


class FastDropout(LayerSite):
    """Fast dropout on a Linear layer (and the activation right after it), see the module
    docstring: MC ``a(mu + s z)``; inference ``E[a(S)]``."""

    def check_layer(self) -> None:
        if self.layer_cls != LINEAR:
            raise UsageError(f"fastdropout replaces Linear layers, not {self.layer_cls}")
        check_fast_act(self.act)

    def gauss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mu = W x + b`` and ``s2 = (p/q) (W∘W)(x∘x)`` (inverted form)."""
        w = self.weight
        mu = F.linear(x, w, self.bias if "bias" in self.tensor_names else None)
        s2 = F.linear(x * x, w * w) * (self.p / self.q)
        return mu, s2

    def gauss_in(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments of the pre-activation for a RANDOM input with independent units of mean
        ``mean`` and variance ``var`` (moment propagation): ``E[S] = W mean + b``,
        ``Var[S] = (W∘W)(var/q + (p/q) mean∘mean)`` (masks independent of the input)."""
        w = self.weight
        mu = F.linear(mean, w, self.bias if "bias" in self.tensor_names else None)
        s2 = F.linear(var / self.q + (self.p / self.q) * mean * mean, w * w)
        return mu, s2

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        mu, s2 = self.gauss(x)
        return self.activate(mu + torch.sqrt(s2) * normal_like(mu))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        mu, s2 = self.gauss(x)
        return gauss_expect(self.act, mu, s2)


# ----------------------------------------------------------------------------------- ONNX


def _onnx_ncdf(b: OnnxBuilder, a: str, info: TensorInfo) -> str:
    erf = b.op("Erf", b.op("Mul", a, b.f(INV_SQRT2, info)))
    return b.op("Mul", b.f(0.5, info), b.op("Add", b.f(1.0, info), erf))


def _onnx_npdf(b: OnnxBuilder, a: str, info: TensorInfo) -> str:
    return b.op("Mul", b.op("Exp", b.op("Mul", b.f(-0.5, info), b.op("Mul", a, a))), b.f(INV_SQRT2PI, info))


def _onnx_relu_mean(b: OnnxBuilder, mu: str, s: str, pos: str, info: TensorInfo) -> str:
    one = b.f(1.0, info)
    a = b.op("Div", mu, b.op("Where", pos, s, one))
    pdf = _onnx_npdf(b, a, info)
    val = b.op("Add", b.op("Mul", mu, _onnx_ncdf(b, a, info)), b.op("Mul", s, pdf))
    return b.op("Where", pos, val, b.op("Relu", mu))


def _onnx_expect(b: OnnxBuilder, act: Activation | None, mu: str, s2: str, info: TensorInfo) -> str:
    """The test rule from stock ops, mirroring :func:`gauss_expect` op for op."""
    if act is None:
        return mu
    pos = b.op("Greater", s2, b.f(0.0, info))
    s = b.op("Sqrt", s2)
    if act.kind == "relu":
        return _onnx_relu_mean(b, mu, s, pos, info)
    if act.kind == "leakyrelu":
        slope = float(act.params.get("negative_slope", 0.01))
        r = _onnx_relu_mean(b, mu, s, pos, info)
        return b.op("Add", b.op("Mul", b.f(slope, info), mu), b.op("Mul", b.f(1.0 - slope, info), r))
    if act.kind == "gelu":
        r = b.op("Sqrt", b.op("Add", b.f(1.0, info), s2))
        t = b.op("Div", mu, r)
        return b.op("Add", b.op("Mul", mu, _onnx_ncdf(b, t, info)), b.op("Mul", b.op("Div", s2, r), _onnx_npdf(b, t, info)))
    if act.kind == "elu":
        alpha = float(act.params.get("alpha", 1.0))
        one = b.f(1.0, info)
        ss = b.op("Where", pos, s, one)
        c = b.op("Div", mu, ss)
        a = b.op("Sub", b.op("Neg", c), ss)
        lo = b.f(MILLS_FROM, info)
        direct = b.op("Mul", b.op("Exp", b.op("Add", mu, b.op("Mul", b.f(0.5, info), s2))), _onnx_ncdf(b, b.op("Max", a, lo), info))
        x = b.op("Max", b.op("Neg", a), b.f(-MILLS_FROM, info))
        f = x
        for k in range(MILLS_TERMS, 0, -1):
            f = b.op("Add", x, b.op("Div", b.f(float(k), info), f))
        tail = b.op("Where", b.op("GreaterOrEqual", a, lo), direct, b.op("Div", _onnx_npdf(b, c, info), f))
        neg_mass = _onnx_ncdf(b, b.op("Neg", c), info)
        val = b.op("Add", _onnx_relu_mean(b, mu, s, pos, info), b.op("Mul", b.f(alpha, info), b.op("Sub", tail, neg_mass)))
        return b.op("Where", pos, val, b.op("Elu", mu, alpha=alpha))
    if act.kind == "sigmoid":
        den = b.op("Sqrt", b.op("Add", b.f(1.0, info), b.op("Mul", b.f(math.pi / 8.0, info), s2)))
        return b.op("Sigmoid", b.op("Div", mu, den))
    if act.kind == "tanh":
        den = b.op("Sqrt", b.op("Add", b.f(1.0, info), b.op("Mul", b.f(math.pi / 2.0, info), s2)))
        sg = b.op("Sigmoid", b.op("Div", b.op("Mul", b.f(2.0, info), mu), den))
        return b.op("Sub", b.op("Mul", b.f(2.0, info), sg), b.f(1.0, info))
    raise UsageError(f"fastdropout has no closed-form test rule for {act}")  # pragma: no cover - checked first


def fastdropout_onnx(b: OnnxBuilder, layer: OnnxLayer, p: float) -> tuple[str, str]:
    if layer.cls != LINEAR:
        raise UsageError(f"fastdropout replaces Linear layers (Gemm/MatMul), not {layer.op}")
    check_fast_act(layer.act, f" {layer.node.name}" if layer.node.name else "")
    x, info = layer.x, layer.x_info
    q = 1.0 - p
    w = layer.w_eff(b)
    mu = layer.lin(b, x, w, layer.b_eff(b))
    s2 = b.op("Mul", layer.lin(b, b.op("Mul", x, x), b.op("Mul", w, w), None), b.f(p / q, info))
    z = b.op("RandomNormalLike", mu, dtype=info.elem_type)
    stoch = emit_activation(b, layer.act, b.op("Add", mu, b.op("Mul", b.op("Sqrt", s2), z)), info)
    return stoch, _onnx_expect(b, layer.act, mu, s2, info)


register(VariantSpec(
    name="fastdropout", summary="fast dropout: Gaussian pre-activation of a Linear layer, sampled or integrated",
    formula="S ~ N(mu, s2), mu = W x + b, s2 = (p/q) (W∘W)(x∘x) (vanilla q w^T x, q(1-q) sum w_i^2 x_i^2 with w = W/q); y = a(S)",
    test_rule="y = E a(S): mu; relu: mu Phi(mu/s) + s phi(mu/s); sigmoid: sigmoid(mu / sqrt(1 + pi s2/8)); tanh, silu likewise",
    attaches=REPLACE, replaces=(LINEAR,), absorbs=TEST_RULE_ACTS, identity_at_test=False,
    paper="Wang & Manning 2013, Fast dropout training (ICML)",
    torch_module=FastDropout, onnx_builder=fastdropout_onnx,
    aliases=("fast-dropout", "fastdrop"),
    notes="Replaces Linear layers (Gemm/MatMul in ONNX) and absorbs the activation right after them. Inverted form: "
          "weights W/q keep the trained function, so mu = W x + b and s2 = (p/q)(W∘W)(x∘x), the vanilla "
          "q w^T x and q(1-q) sum w_i^2 x_i^2 with w = W/q. MC mode samples S per example and unit; inference mode "
          "integrates the activation: exact for none, relu, leaky relu, elu and gelu (erf form), the probit approximation "
          "for sigmoid, tanh = 2 sigmoid(2x) - 1 and silu = x sigmoid(x); gelu's tanh form is refused. `dropcli uncertainty --method moments` "
          "propagates means and variances through the model analytically instead of sampling.",
))
