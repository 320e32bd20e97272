"""Learned dropout rates for ``dropcli finetune`` (math: docs/learned.md).

* **concrete** (Gal, Hron & Kendall 2017): a relaxed Bernoulli drop mask
  ``z = sigmoid((log p - log q + log u - log(1-u)) / t)``, ``u ~ U(0,1)``, ``t = 0.1``, and
  ``x <- x * (1 - z) / q``, with one learned ``p`` per site. Regulariser per site, as in
  docs/learned.md (concrete dropout): ``wr * ||W||^2 / q + dr * K * (p log p + q log q)`` with ``W`` the weights (and
  bias) of the layer that FOLLOWS the site, ``K`` its input dimension (Linear: in_features, Conv:
  in_channels), ``wr = l^2 / (tau N)``, ``dr = 2 / (tau N)``, ``N`` the training-set size, ``l``
  ``--length-scale``, ``tau`` the model precision.
* **variational** (Kingma, Salimans & Welling 2015): multiplicative noise ``N(1, alpha)``
  with learned ``alpha``, per unit (one alpha per feature the following Linear reads), or
  with ``per_weight`` one alpha per weight of the following Linear through the local
  reparameterisation ``b ~ N(x W^T + bias, (x^2)(alpha * W^2)^T)``. KL to the log-uniform prior
  by Molchanov et al. (2017)'s approximation, which holds for every alpha (Kingma et al.'s cubic
  holds for ``alpha <= 1`` only, and the old cap there was where every unit ended up: that KL
  falls monotonically in alpha, so whenever the data term's pull is weaker than the KL's the
  optimum lies past 1), summed over weights: a per-unit alpha is shared by the ``out_features``
  weights that read the unit, so its KL counts ``out_features`` times. ``log alpha`` is clamped
  to ``[-10, 8]``, the range of dropcli's sparse VD.

The objective is the negative ELBO per training example: the mean data loss plus
:func:`kl_weight` times the summed KL. The page's ``wr`` and ``dr`` are the regression case, whose
data loss, the mean squared error, is ``2/tau`` times the Gaussian NLL. A classifier's data loss,
the mean cross-entropy, is the NLL itself, so its KL weight is ``1/N``: half the page's terms at
``tau = 1``. Using the page's terms unhalved next to the cross-entropy doubles the entropy pull
toward ``p = 0.5`` (on the digits benchmark it learned p = 0.40 where the best fixed p was 0.3).

Output: a concrete site becomes dropcli's ``standard`` site with its learned p; a variational
site becomes dropcli's ``gaussian`` site with its per-unit alpha. A per-weight alpha is folded
per input unit as ``alpha_i = sum_j alpha_ji W_ji^2 / sum_j W_ji^2``, which keeps the summed
output variance ``sum_j Var(b_j) = sum_i x_i^2 sum_j alpha_ji W_ji^2`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from dropcli.errors import DropcliError
from dropcli.variants.base import uniform_like

TEMPERATURE = 0.1
LOG_ALPHA_MIN = -10.0  # alpha >= 4.5e-5 (keeps log alpha finite)
LOG_ALPHA_MAX = 8.0  # alpha <= 2981 (equivalent drop rate 0.9997): the sparse-VD range; the KL holds throughout
EPS = 1e-7
VARIANTS = ("concrete", "variational")


# ------------------------------------------------------------------------------- math

def relaxed_drop_mask(p: torch.Tensor, u: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The concrete relaxation of a Bernoulli(p) DROP indicator (``z ~ 1`` means dropped)."""
    logit = (torch.log(p + EPS) - torch.log(1 - p + EPS) + torch.log(u + EPS) - torch.log(1 - u + EPS))
    return torch.sigmoid(logit / temperature)


def concrete_kl(p: torch.Tensor, weight_sq: torch.Tensor | float, k: int, length_scale: float) -> torch.Tensor:
    """The KL term of one concrete site (Gal et al. 2017, eq. 3, up to a constant), with ``W`` the
    weights as trained (already scaled by 1/q at the site): ``l^2 ||W||^2 / (2q) + K (p log p + q log q)``."""
    q = 1 - p
    return length_scale ** 2 * weight_sq / (2 * q) + k * (p * torch.log(p + EPS) + q * torch.log(q + EPS))


def concrete_regulariser(p: torch.Tensor, weight_sq: torch.Tensor | float, k: int, n: int,
                         length_scale: float, tau: float = 1.0) -> torch.Tensor:
    """The reference form (docs/learned.md, concrete dropout): ``wr * ||W||^2 / q + dr * K * (p log p + q log q)``, ``wr = l^2/(tau N)``,
    ``dr = 2/(tau N)``; that is ``2/(tau N)`` times :func:`concrete_kl`. It pairs with a data term of
    ``(2/tau)`` times the mean NLL (the mean squared error of a regression with precision ``tau``)."""
    return kl_weight("regression", n, tau) * concrete_kl(p, weight_sq, k, length_scale)


def kl_weight(task: str, n: int, tau: float = 1.0) -> float:
    """The weight of the summed KL next to the mean data loss, so that the objective is the
    negative ELBO per example (times a constant). Classification's data loss is the mean
    cross-entropy, the NLL itself: weight ``1/N``. Regression's is the mean squared error, which is
    ``2/tau`` times the Gaussian NLL at precision ``tau``: weight ``2/(tau N)``, the reference's ``dr``."""
    return 1.0 / n if task == "classification" else 2.0 / (tau * n)


def neg_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """``-KL(q(w) || p(w))`` per weight, log-uniform prior, ``q = N(theta, alpha theta^2)``:
    Molchanov et al. (2017)'s approximation ``k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1``
    (``dropcli.prune.layers.kl_sparse_vd``), exact up to a constant to within 0.005 for alpha in
    [1e-3, 1e3]. It rises monotonically in alpha: the prior always asks for more noise, and the
    data term decides where that stops."""
    from dropcli.prune.layers import kl_sparse_vd

    return -kl_sparse_vd(log_alpha)


def p_to_log_alpha(p: float) -> float:
    """The Gaussian noise variance with Bernoulli dropout's moments: ``alpha = p / (1 - p)``."""
    return math.log(max(p, 1e-6) / (1 - p))


# ------------------------------------------------------------------------------- sites

class ConcreteSite(nn.Module):
    """A site with a learned drop rate (relaxed mask in training mode, identity in eval mode).
    ``following``: the weight layers that read its dropped units (their weights enter the
    regulariser); ``k`` their input dimension, or 0 when none does (then ``K`` is the width of
    the site's tensor along ``axis``, read from the first batch it sees)."""

    def __init__(self, p: float, k: int, following: nn.Module | Sequence[nn.Module], axis: int = -1):
        super().__init__()
        p = min(max(float(p), 1e-4), 1 - 1e-4)
        self.p_logit = nn.Parameter(torch.tensor(math.log(p / (1 - p))))
        self.k = int(k)
        self.axis = axis
        # a list: not submodules (their weights are the graph's)
        self.following = list(following) if isinstance(following, (list, tuple)) else [following]

    @property
    def p(self) -> torch.Tensor:
        return torch.sigmoid(self.p_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.k:
            self.k = int(x.shape[self.axis if x.dim() > 2 else -1])
        if not self.training:
            return x
        p = self.p.to(x.dtype)
        z = relaxed_drop_mask(p, uniform_like(x))
        return x * (1 - z) / (1 - p)

    def kl(self, length_scale: float) -> torch.Tensor:
        wsq = sum((t * t).sum() for m in self.following for t in reader_input(m)[1])
        return concrete_kl(self.p, wsq, self.k, length_scale)

    def regulariser(self, n: int, length_scale: float, tau: float = 1.0) -> torch.Tensor:
        """The reference regulariser (docs/learned.md) (for a mean-squared-error data term at precision tau)."""
        return kl_weight("regression", n, tau) * self.kl(length_scale)

    def rate(self) -> float:
        return float(self.p.detach())


class VariationalSite(nn.Module):
    """Gaussian multiplicative noise ``N(1, alpha_j)`` with a learned alpha per unit (last dim)."""

    def __init__(self, p: float, units: int, weights_per_unit: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((units,), _clamp_la(p_to_log_alpha(p))))
        self.weights_per_unit = int(weights_per_unit)

    def alpha(self) -> torch.Tensor:
        return torch.exp(self.log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        std = self.alpha().sqrt().to(x.dtype)
        return x * (1 + std * torch.randn_like(x))

    def kl(self) -> torch.Tensor:
        return -self.weights_per_unit * neg_kl(self.log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)).sum()

    def clamp_(self) -> None:
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def unit_alpha(self) -> torch.Tensor:
        return self.alpha().detach()


class VariationalLinear(nn.Module):
    """A Linear with a learned alpha per weight, sampled by local reparameterisation."""

    def __init__(self, linear: nn.Linear, p: float):
        super().__init__()
        self.linear = linear
        self.log_alpha = nn.Parameter(torch.full_like(linear.weight.detach(), _clamp_la(p_to_log_alpha(p))))

    def alpha(self) -> torch.Tensor:
        return torch.exp(self.log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.linear(x)
        if not self.training:
            return mu
        w = self.linear.weight
        var = F.linear(x * x, self.alpha() * w * w)
        return mu + torch.sqrt(var + 1e-8) * torch.randn_like(mu)

    def kl(self) -> torch.Tensor:
        return -neg_kl(self.log_alpha.clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX)).sum()

    def clamp_(self) -> None:
        with torch.no_grad():
            self.log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)

    def unit_alpha(self) -> torch.Tensor:
        """Folded per input unit: ``sum_j alpha_ji W_ji^2 / sum_j W_ji^2`` (mean alpha where a
        column of W is all zero); the summed output variance is unchanged."""
        with torch.no_grad():
            a = self.alpha()
            w2 = self.linear.weight * self.linear.weight
            den = w2.sum(0)
            return torch.where(den > 0, (a * w2).sum(0) / den.clamp_min(1e-30), a.mean(0))


def _clamp_la(v: float) -> float:
    return min(max(v, LOG_ALPHA_MIN), LOG_ALPHA_MAX)


# ------------------------------------------------------------------------------- attaching

@dataclass
class LearnedSite:
    name: str  # the dropcli site module in the graph
    at: str  # the layer it follows (or the dropout it replaced)
    following: str  # the module that reads it
    start_p: float
    module: nn.Module = None
    k: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def rate_params(self) -> list[nn.Parameter]:
        if isinstance(self.module, ConcreteSite):
            return [self.module.p_logit]
        return [self.module.log_alpha]

    def describe(self) -> str:
        if isinstance(self.module, ConcreteSite):
            return f"p={self.module.rate():.3f}"
        a = self.module.unit_alpha()
        return f"alpha={float(a.mean()):.3f}"


# ops that carry a site's dropped units on (reshapes, pooling, activations with f(0) = 0): a weight
# layer behind them still reads the units the mask dropped (after global pooling, one per channel)
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten,
                 nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                 # elementwise activations with f(0) = 0 keep a dropped unit dropped
                 nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.ELU, nn.Hardtanh, nn.Hardswish, nn.Mish)
_PASS_NAMES = {"flatten", "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "contiguous", "clone", "alias",
               "squeeze", "unsqueeze", "select", "slice", "getitem", "mean", "amax", "max_pool1d", "max_pool2d",
               "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
               "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "dropout", "to", "type_as",
               "relu", "relu_", "relu6", "leaky_relu", "gelu", "silu", "tanh", "elu", "hardtanh", "hardswish", "mish"}
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM, nn.GRU, nn.RNN)


def _fn_name(n: fx.Node) -> str:
    t = n.target
    if n.op == "call_method":
        return str(t)
    name = getattr(t, "__name__", str(t))
    return name.split(".")[0] if "." in name else name  # aten overload names: "view.default" -> "view"


def reader_input(mod: nn.Module) -> tuple[int, list[torch.Tensor]]:
    """``(K, weights)`` of a weight layer reading dropped units: its input dimension and the
    weights (and bias) that multiply them. A recurrent layer reads the site through its first
    layer's input-to-hidden weights."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, [t for t in (mod.weight, mod.bias) if t is not None]
    if isinstance(mod, (nn.LSTM, nn.GRU, nn.RNN)):
        names = ["weight_ih_l0", "bias_ih_l0"] + (["weight_ih_l0_reverse", "bias_ih_l0_reverse"] if mod.bidirectional else [])
        return mod.input_size, [getattr(mod, k) for k in names if getattr(mod, k, None) is not None]
    return mod.in_channels, [t for t in (mod.weight, mod.bias) if t is not None]


def _site_node(gm: fx.GraphModule, site: str) -> fx.Node:
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == site), None)
    if node is None:
        raise DropcliError(f"internal error: site {site} is not in the graph")
    return node


def _feature_axis(gm: fx.GraphModule, site: str) -> int:
    """Where a site's features lie: axis 1 below a convolution (channels), else the last axis."""
    n = _site_node(gm, site)
    for _ in range(16):
        args = [a for a in n.args if isinstance(a, fx.Node)]
        if not args:
            break
        n = args[0]
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                return 1
            if isinstance(mod, WEIGHTED + (nn.LayerNorm, nn.Embedding)):
                return -1
    return -1


def following_layers(gm: fx.GraphModule, site: str) -> tuple[list[str], str]:
    """The Linear / Conv / recurrent modules that read a site's dropped units, walking forward
    through ops that pass them on (reshapes, pooling, other dropout), and what else reads them:
    ``(names, "")`` when only weight layers do, ``(names, op)`` naming the first other op that
    mixes the units before any weight layer sees them (a residual add, a norm, attention)."""
    node = _site_node(gm, site)
    found: list[str] = []
    other = ""
    todo, seen = list(node.users), set()
    while todo:
        u = todo.pop(0)
        if u in seen:
            continue
        seen.add(u)
        if u.op == "call_module":
            mod = gm.get_submodule(u.target)
            if isinstance(mod, WEIGHTED):
                if u.args and u.args[0] in seen | {node} or isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    found.append(str(u.target))
                continue
            if isinstance(mod, _PASS_MODULES):
                todo.extend(u.users)
                continue
        elif u.op in ("call_function", "call_method") and _fn_name(u) in _PASS_NAMES:
            todo.extend(u.users)
            continue
        if u.op != "output":
            other = other or (str(u.target) if u.op == "call_module" else _fn_name(u))
    return list(dict.fromkeys(found)), other


def attach(gm: fx.GraphModule, sites: list[LearnedSite], variant: str, per_weight: bool) -> None:
    """Swap each site's module (and with ``per_weight`` its following Linear) for a trainable one."""
    from dropcli.backends.torch.fx import set_module

    for s in sites:
        names, other = following_layers(gm, s.name)
        mods = [gm.get_submodule(n) for n in names]
        s.following = ", ".join(names)
        if variant == "concrete":
            ks = {reader_input(m)[0] for m in mods}
            s.k = max(ks) if ks else 0
            if not mods:
                s.extra["weight_term"] = (f"none: no Linear/Conv/recurrent layer reads the dropped units before {other!r} "
                                          "mixes them; K is the width of the site's features")
            elif other:
                s.extra["weight_term"] = f"the layers above only ({other!r} reads the units too)"
            s.module = ConcreteSite(s.start_p, s.k, mods, axis=_feature_axis(gm, s.name))
            set_module(gm, s.name, s.module)
            continue
        direct = [u for u in _site_node(gm, s.name).users]
        mod = gm.get_submodule(direct[0].target) if len(direct) == 1 and direct[0].op == "call_module" else None
        name = str(direct[0].target) if mod is not None else ""
        s.following = name
        if not isinstance(mod, nn.Linear):
            what = type(mod).__name__ if mod is not None else (other or "no single layer")
            raise DropcliError(f"dropout site {s.name} is followed by {what}; variational rates are learned "
                               "for sites right before a Linear layer", "use --variant concrete, or choose other sites")
        s.k = int(mod.in_features)
        if per_weight:
            s.module = VariationalLinear(mod, s.start_p)
            set_module(gm, s.name, nn.Identity())
            set_module(gm, name, s.module)
        else:
            s.module = VariationalSite(s.start_p, mod.in_features, mod.out_features)
            set_module(gm, s.name, s.module)
    gm.recompile()


def finalize(gm: fx.GraphModule, sites: list[LearnedSite]) -> list[dict[str, Any]]:
    """Put dropcli's stock sites back with the learned rates; returns a report row per site."""
    from dropcli.backends.torch.fx import set_module
    from dropcli.variants import get_variant

    rows = []
    for s in sites:
        m = s.module
        s.k = int(getattr(m, "k", s.k))  # a concrete site without a reader layer reads K from its first batch
        row = {"site": s.name, "at": s.at, "following": s.following, "k": s.k, "start_p": s.start_p, **s.extra}
        if isinstance(m, ConcreteSite):
            p = min(m.rate(), 1 - 1e-6)
            set_module(gm, s.name, get_variant("standard").torch_module(p=p))
            row.update(variant="standard", learned_p=p)
        else:
            alpha = m.unit_alpha().cpu().double().numpy()
            if isinstance(m, VariationalLinear):
                set_module(gm, s.following, m.linear)
                row["per_weight"] = True
                a_w = m.alpha().detach().cpu().double().numpy()
                row["alpha_per_weight"] = {"mean": float(a_w.mean()), "min": float(a_w.min()), "max": float(a_w.max())}
            site = get_variant("gaussian").torch_module(alpha=[float(a) for a in alpha])
            set_module(gm, s.name, site)
            row.update(variant="gaussian", learned_p=site.p, start_alpha=s.start_p / (1 - s.start_p),
                       alpha_mean=float(alpha.mean()), alpha_min=float(alpha.min()), alpha_max=float(alpha.max()),
                       alpha=[float(a) for a in alpha])
        rows.append(row)
    gm.recompile()
    for prm in gm.parameters():
        prm.requires_grad_(False)
    return rows


# ------------------------------------------------------------------------------- MC evaluation

@torch.no_grad()
def mc_samples(gm: nn.Module, split: Any, samples: int, seed: int, batch_size: int = 512,
               device: str = "cpu") -> np.ndarray:
    """[T, N, K] outputs over ``samples`` passes with the sites (dropcli SiteModules) in MC mode and
    every other layer in eval mode; the noise is seeded by ``seed`` (the same draws for every
    call with the same rates: the rate scan compares rates on common random numbers)."""
    from dropcli.training.loop import feed
    from dropcli.variants.base import set_mc

    gm.eval()
    set_mc(gm, True)
    torch.manual_seed(seed)
    try:
        outs = []
        for _ in range(samples):
            chunk = []
            for i in range(0, len(split), batch_size):
                chunk.append(feed(gm, split.x[i:i + batch_size].to(device)).float().cpu())
            outs.append(torch.cat(chunk))
        return torch.stack(outs).double().numpy()
    finally:
        set_mc(gm, False)


def mc_metrics(gm: nn.Module, split: Any, task: str, samples: int, seed: int, batch_size: int = 512,
               noise_var: float = 0.0, device: str = "cpu", temperature: float | None = None,
               outputs: np.ndarray | None = None) -> dict[str, float]:
    """Validation MC metrics (:func:`mc_samples`, or the given ``outputs``): classification NLL of
    the mean softmax (each pass's logits divided by ``temperature``), accuracy, ECE; regression
    Gaussian NLL with variance ``noise_var + var_t`` and RMSE of the MC mean."""
    from dropcli.analysis import stats

    s = mc_samples(gm, split, samples, seed, batch_size, device) if outputs is None else outputs
    y = split.y.numpy()
    if task == "classification":
        probs = stats.to_probs(s, as_probs=False, temperature=temperature).mean(0)
        correct = probs.argmax(-1) == y
        ece, _ = stats.ece_mce(probs.max(-1), correct)
        return {"nll": stats.nll(probs, y), "accuracy": float(correct.mean()), "ece": ece}
    mean = s.mean(0)
    var = s.var(0) + noise_var
    var = np.maximum(var, 1e-12)
    yy = y.reshape(mean.shape)
    nll = float(np.mean(0.5 * np.log(2 * np.pi * var) + (yy - mean) ** 2 / (2 * var)))
    return {"nll": nll, "rmse": float(np.sqrt(np.mean((yy - mean) ** 2))), "noise_var": noise_var}


# ------------------------------------------------------------------------------- held-out selection

SCALES = tuple(round(2 ** (k / 2), 4) for k in range(-8, 5))  # 1/16 .. 4 in factors of sqrt(2) around the ELBO's answer


def scaled_rows(rows: list[dict[str, Any]], scale: float) -> list[dict[str, Any]]:
    """The sites' rates with every noise variance times ``scale``: a Bernoulli site's variance
    is ``alpha = p / q``, so ``p -> s alpha / (1 + s alpha)``; a gaussian site's ``alpha -> s alpha``.
    Scale 1 is the rows as they are (the ELBO's answer)."""
    out = []
    for r in rows:
        r = dict(r)
        if r["variant"] == "standard":
            a = scale * r["learned_p"] / (1 - r["learned_p"])
            r["learned_p"] = min(a / (1 + a), 1 - 1e-6)
        else:
            r["alpha"] = [scale * a for a in r["alpha"]]
            for k in ("alpha_mean", "alpha_min", "alpha_max"):
                r[k] *= scale
            mean = r["alpha_mean"]
            r["learned_p"] = mean / (1 + mean)
        out.append(r)
    return out


def example_nll(outputs: np.ndarray, split: Any, task: str, noise_var: float = 0.0,
                temperature: float | None = None) -> np.ndarray:
    """Per-example NLL of the MC predictive of ``outputs`` [T, N, K] (the terms whose mean
    :func:`mc_metrics` reports as ``nll``)."""
    from dropcli.analysis import stats

    y = split.y.numpy()
    if task == "classification":
        probs = stats.to_probs(outputs, as_probs=False, temperature=temperature).mean(0)
        return -np.log(np.maximum(probs[np.arange(len(y)), y], stats.EPS))
    mean = outputs.mean(0)
    var = np.maximum(outputs.var(0) + noise_var, 1e-12)
    yy = y.reshape(mean.shape)
    per = 0.5 * np.log(2 * np.pi * var) + (yy - mean) ** 2 / (2 * var)
    return per.reshape(len(per), -1).mean(-1)


def one_se_choice(scales: Sequence[float], nll: Sequence[np.ndarray]) -> int:
    """The one-standard-error rule (Breiman et al. 1984) on a curve of per-example validation
    NLLs: among the scales whose mean NLL is within one standard error of the paired difference
    from the best one, the nearest to 1 (the ELBO's answer). A flat, noisy curve then keeps the
    ELBO's rates instead of whichever end the noise favours. Returns the index chosen."""
    means = [float(v.mean()) for v in nll]
    b = int(np.argmin(means))
    ok = []
    for i, v in enumerate(nll):
        d = v - nll[b]
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        if means[i] - means[b] <= se:
            ok.append(i)
    return min(ok, key=lambda i: (abs(math.log(scales[i])), scales[i]))


def set_rates(gm: fx.GraphModule, rows: list[dict[str, Any]]) -> None:
    """Put stock sites at the rates of ``rows`` (as :func:`finalize` wrote them)."""
    from dropcli.backends.torch.fx import set_module
    from dropcli.variants import get_variant

    for r in rows:
        site = (get_variant("standard").torch_module(p=r["learned_p"]) if r["variant"] == "standard"
                else get_variant("gaussian").torch_module(alpha=r["alpha"]))
        set_module(gm, r["site"], site)
    gm.recompile()


def fit_temperature(outputs: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> tuple[float, float]:
    """The temperature of the MC predictive ``mean_t softmax(z_t / T)`` on ``outputs`` [T, N, K]
    (logits) with ``labels``. First the NLL minimiser T* (golden-section search over log T in
    [log lo, log hi]); then, by the one-standard-error rule, the temperature nearest 1 on the way
    from 1 to T* whose NLL is within one paired standard error of T*'s: a noisy validation set
    shrinks the correction towards none instead of overfitting it. A minimiser at an end of the
    range is no fit: as T -> 0 the predictive tends to the vote fractions of the passes, which a
    finite validation set can favour and new data punishes (a class no pass voted for gets
    probability 0); then T = 1. Returns (T, NLL)."""
    from dropcli.analysis import stats

    y = np.asarray(labels)

    def per(log_t: float) -> np.ndarray:
        probs = stats.to_probs(outputs, as_probs=False, temperature=math.exp(log_t)).mean(0)
        return -np.log(np.maximum(probs[np.arange(len(y)), y], stats.EPS))

    def nll(log_t: float) -> float:
        return float(per(log_t).mean())

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-4:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    best_lt = (a + b) / 2
    if min(best_lt - math.log(lo), math.log(hi) - best_lt) < 1e-2:
        return 1.0, nll(0.0)
    best = per(best_lt)
    for lt in np.linspace(0.0, best_lt, 41):
        diff = per(float(lt)) - best
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        if float(diff.mean()) <= se:
            return math.exp(float(lt)), nll(float(lt))
    return math.exp(best_lt), float(best.mean())


def mc_errors(outputs: np.ndarray, labels: np.ndarray) -> int:
    """Misclassified examples of the MC predictive (mean softmax) of ``outputs`` [T, N, K]."""
    from dropcli.analysis import stats

    return int((stats.to_probs(outputs, as_probs=False).mean(0).argmax(-1) != np.asarray(labels)).sum())
