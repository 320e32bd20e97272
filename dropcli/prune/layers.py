"""Sparse variational dropout and structured Bayesian pruning layers (docs/learned.md).

* :class:`LinearSVD` / :class:`ConvSVD` -- sparse variational dropout (Molchanov, Ashukha &
  Vetrov 2017, "Variational Dropout Sparsifies Deep Neural Networks", ICML). Per weight
  ``w ~ N(theta, sigma^2)``; ``theta`` and ``log sigma^2`` are learned (additive
  reparameterisation), ``log alpha = log sigma^2 - log(theta^2 + 1e-8)`` clamped to [-8, 8].
  Training uses the local reparameterisation trick; test uses ``w = theta * [log alpha < t]``.
* :class:`SBPNoise` -- structured Bayesian pruning (Neklyudov, Molchanov, Ashukha & Vetrov 2017,
  "Structured Bayesian Pruning via Log-Normal Multiplicative Noise", NeurIPS). One multiplicative
  noise ``theta`` per unit / channel, ``log theta ~ N(mu, sigma^2)`` truncated to [-20, 0], with a
  log-uniform prior; units whose ``SNR = E[theta] / std(theta) <= 1`` are removed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

K1, K2, K3 = 0.63576, 1.87320, 1.48695  # Molchanov 2017, eq. 14
LOG_ALPHA_RANGE = (-8.0, 8.0)
INIT_LOG_SIGMA2 = -10.0
SBP_A, SBP_B = -20.0, 0.0  # truncation of log theta
SBP_INIT_MU, SBP_INIT_LOG_SIGMA = 0.0, -5.0


def kl_sparse_vd(log_alpha: torch.Tensor) -> torch.Tensor:
    """``KL(q(w) || p(w)) ≈ k1*sigmoid(-(k2 + k3*log alpha)) + 0.5*softplus(-log alpha)``, elementwise.

    This is ``-(k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1)``: the constant
    ``-k1`` makes the KL go to 0 as alpha -> infinity.
    """
    return K1 * torch.sigmoid(-(K2 + K3 * log_alpha)) + 0.5 * F.softplus(-log_alpha)


class SparseVD(nn.Module):
    """Shared parts of the sparse-VD layers. ``weight`` holds theta."""

    dropcli_leaf = True  # kept as a module when dropcli traces a pickled model

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, INIT_LOG_SIGMA2))
        self.threshold = float(threshold)

    def log_alpha(self) -> torch.Tensor:
        la = self.log_sigma2 - torch.log(self.weight * self.weight + 1e-8)
        return torch.clamp(la, *LOG_ALPHA_RANGE)

    def kl(self) -> torch.Tensor:
        return kl_sparse_vd(self.log_alpha()).sum()

    def keep_mask(self) -> torch.Tensor:
        return self.log_alpha() < self.threshold

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.keep_mask().to(self.weight.dtype)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # local reparameterisation: b ~ N(x theta + bias, (x*x) sigma^2)
            mu = self._op(x, self.weight, self.bias)
            var = self._op(x * x, torch.exp(self.log_sigma2), None)
            return mu + torch.sqrt(var + 1e-8) * torch.randn_like(mu)
        return self._op(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, threshold={self.threshold}"


class LinearSVD(SparseVD):
    """Sparse variational dropout for a Linear layer (Molchanov et al. 2017)."""

    @classmethod
    def from_layer(cls, layer: nn.Linear, threshold: float = 3.0) -> "LinearSVD":
        return cls(layer.weight, layer.bias, threshold)

    def _op(self, x, w, b):
        return F.linear(x, w, b)

    def to_plain(self) -> nn.Linear:
        m = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            m.weight.copy_(self.masked_weight())
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m


class ConvSVD(SparseVD):
    """Sparse variational dropout for Conv1d/Conv2d (Molchanov et al. 2017):
    ``mu = conv(x, theta)``, ``var = conv(x^2, sigma^2)``."""

    def __init__(self, layer: nn.Module, threshold: float = 3.0):
        super().__init__(layer.weight, layer.bias, threshold)
        if layer.padding_mode != "zeros":
            raise ValueError("only zero padding")
        self.nd = layer.weight.dim() - 2
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    @classmethod
    def from_layer(cls, layer: nn.Module, threshold: float = 3.0) -> "ConvSVD":
        return cls(layer, threshold)

    def _op(self, x, w, b):
        fn = F.conv1d if self.nd == 1 else F.conv2d
        return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def to_plain(self) -> nn.Module:
        cls = nn.Conv1d if self.nd == 1 else nn.Conv2d
        w = self.weight
        m = cls(w.shape[1] * self.groups, w.shape[0], tuple(w.shape[2:]), stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=self.groups, bias=self.bias is not None)
        with torch.no_grad():
            m.weight.copy_(self.masked_weight())
            if self.bias is not None:
                m.bias.copy_(self.bias)
        return m


def to_sparse_vd(layer: nn.Module, threshold: float) -> SparseVD:
    if isinstance(layer, nn.Linear):
        return LinearSVD.from_layer(layer, threshold)
    return ConvSVD.from_layer(layer, threshold)


# ---------------------------------------------------------------------------------------- SBP

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _log_phi(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x * x - _LOG_SQRT_2PI


def log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b``, stable in both tails."""
    upper = a > 0  # both in the upper tail: use Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo = torch.where(upper, -b, a)
    hi = torch.where(upper, -a, b)
    lhi, llo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return lhi + torch.log(-torch.expm1(torch.clamp(llo - lhi, max=-1e-12)))


def truncated_lognormal_moments(mu: torch.Tensor, sigma: torch.Tensor, a: float = SBP_A, b: float = SBP_B):
    """``E[theta]`` and ``Var[theta]`` for ``log theta ~ N(mu, sigma^2)`` truncated to ``[a, b]``."""
    A, B = (a - mu) / sigma, (b - mu) / sigma
    log_z = log_ndtr_diff(A, B)
    log_m1 = mu + 0.5 * sigma * sigma + log_ndtr_diff(A - sigma, B - sigma) - log_z
    log_m2 = 2 * mu + 2 * sigma * sigma + log_ndtr_diff(A - 2 * sigma, B - 2 * sigma) - log_z
    mean = torch.exp(log_m1)
    var = torch.clamp(torch.exp(log_m2) - mean * mean, min=0.0)
    return mean, var


def sbp_kl(mu: torch.Tensor, log_sigma: torch.Tensor, a: float = SBP_A, b: float = SBP_B) -> torch.Tensor:
    """KL(truncated log-normal || log-uniform on [a, b]), elementwise (Neklyudov et al. 2017):
    ``-log sigma - log Z - (A phi(A) - B phi(B)) / (2Z) + log(b - a) - 0.5 log(2 pi e)``."""
    sigma = torch.exp(log_sigma)
    A, B = (a - mu) / sigma, (b - mu) / sigma
    log_z = log_ndtr_diff(A, B)
    term = A * torch.exp(_log_phi(A) - log_z) - B * torch.exp(_log_phi(B) - log_z)
    return -log_sigma - log_z - term / 2 + math.log(b - a) - 0.5 * math.log(2 * math.pi * math.e)


def sample_truncated_log(mu: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor,
                         a: float = SBP_A, b: float = SBP_B) -> torch.Tensor:
    """``log theta`` by the inverse CDF of the truncated normal, from ``u ~ U(0, 1)``."""
    A, B = (a - mu) / sigma, (b - mu) / sigma
    pa, pb = torch.special.ndtr(A), torch.special.ndtr(B)
    p = torch.clamp(pa + u * (pb - pa), 1e-7, 1 - 1e-7)
    return torch.clamp(mu + sigma * torch.special.ndtri(p), a, b)


class SBPNoise(nn.Module):
    """Per-unit log-normal multiplicative noise of structured Bayesian pruning (Neklyudov 2017).

    Training: ``y = x * theta`` with one sampled ``theta`` per unit (channel dim 1) and example.
    Test: ``y = x * E[theta]``. Units with ``SNR <= 1`` are removed after training.
    """

    def __init__(self, n: int):
        super().__init__()
        self.mu = nn.Parameter(torch.full((n,), SBP_INIT_MU))
        self.log_sigma = nn.Parameter(torch.full((n,), SBP_INIT_LOG_SIGMA))

    def moments(self):
        return truncated_lognormal_moments(self.mu, torch.exp(self.log_sigma))

    def snr(self) -> torch.Tensor:
        m, v = self.moments()
        return m / torch.sqrt(v + 1e-30)

    def kl(self) -> torch.Tensor:
        return sbp_kl(self.mu, self.log_sigma).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            u = torch.rand((x.shape[0], self.mu.shape[0]), dtype=x.dtype, device=x.device)
            theta = torch.exp(sample_truncated_log(self.mu, torch.exp(self.log_sigma), u))
            return x * theta.reshape([x.shape[0], -1] + [1] * (x.dim() - 2))
        return x * self.moments()[0].reshape(shape)

    def extra_repr(self) -> str:
        return f"units={self.mu.shape[0]}"
