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
    """A site with a learned drop rate (relaxed mask in training mode, identity in eval mode)."""

    def __init__(self, p: float, k: int, following: nn.Module):
        super().__init__()
        p = min(max(float(p), 1e-4), 1 - 1e-4)
        self.p_logit = nn.Parameter(torch.tensor(math.log(p / (1 - p))))
        self.k = int(k)
        self.following = [following]  # a list: not a submodule (its weights are the graph's)

    @property
    def p(self) -> torch.Tensor:
        return torch.sigmoid(self.p_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        p = self.p.to(x.dtype)
        z = relaxed_drop_mask(p, uniform_like(x))
        return x * (1 - z) / (1 - p)

    def kl(self, length_scale: float) -> torch.Tensor:
        m = self.following[0]
        wsq = sum((t * t).sum() for t in (m.weight, getattr(m, "bias", None)) if t is not None)
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


def following_layer(gm: fx.GraphModule, site: str) -> tuple[str, nn.Module]:
    """The one Linear / Conv module that reads a site's output (K is read from it)."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == site), None)
    if node is None:
        raise DropcliError(f"internal error: site {site} is not in the graph")
    users = list(node.users)
    mod = gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
    if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise DropcliError(f"dropout site {site} is not followed directly by a Linear or Conv layer, so its input dimension K "
                           "can't be read", "choose sites right before a Linear/Conv layer with --after/--layers/--exclude")
    return users[0].target, mod


def attach(gm: fx.GraphModule, sites: list[LearnedSite], variant: str, per_weight: bool) -> None:
    """Swap each site's module (and with ``per_weight`` its following Linear) for a trainable one."""
    from dropcli.backends.torch.fx import set_module

    for s in sites:
        name, mod = following_layer(gm, s.name)
        s.following = name
        if variant == "concrete":
            s.k = int(mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels)
            s.module = ConcreteSite(s.start_p, s.k, mod)
            set_module(gm, s.name, s.module)
            continue
        if not isinstance(mod, nn.Linear):
            raise DropcliError(f"dropout site {s.name} is followed by a {type(mod).__name__}; variational rates are learned "
                               "for sites before a Linear layer", "use --variant concrete, or choose other sites")
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
        row = {"site": s.name, "at": s.at, "following": s.following, "k": s.k, "start_p": s.start_p}
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
    from dropcli.variants.base import set_mc

    gm.eval()
    set_mc(gm, True)
    torch.manual_seed(seed)
    try:
        outs = []
        for _ in range(samples):
            chunk = []
            for i in range(0, len(split), batch_size):
                chunk.append(gm(split.x[i:i + batch_size].to(device)).float().cpu())
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
# Prior on the calibration temperature: log T ~ N(0, TEMPERATURE_PRIOR_SD^2). Measured by 2-fold
# cross-validation inside the validation sets of benchmarks/quality.py's default models (choose on
# one half, score the other): with the plain NLL minimiser the calibrated MC predictive lost to the
# deterministic pass by +0.026 NLL (it over-sharpens); with this prior it gained 0.0006. See
# docs/learned.md ("How these rules were chosen").
TEMPERATURE_PRIOR_SD = 0.3


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


def best_scale(scales: Sequence[float], objective: Sequence[float]) -> int:
    """The index of the scale with the lowest validation objective (the MC NLL, or with
    ``--calibrate`` the MAP objective of :func:`fit_temperature` at that scale's own temperature).
    The scan runs every scale on the same noise draws, so the curve is smooth in the scale and its
    minimum is not a pick among independent noisy values; ties go to the smaller noise. A scale
    with a non-finite objective (not eligible: see finetune) is never chosen."""
    obj = np.asarray(objective, dtype=float)
    if not np.isfinite(obj).any():
        raise ValueError("no scale has a finite objective")
    best = float(np.nanmin(np.where(np.isfinite(obj), obj, np.nan)))
    return min((i for i in range(len(scales)) if obj[i] <= best), key=lambda i: scales[i])


def degenerate_count(outputs: np.ndarray) -> int:
    """Examples whose passes in ``outputs`` [T, N, ...] are all identical (the noise never reached
    them): MC measures nothing there, and `dropcli uncertainty` refuses such a model."""
    flat = outputs.reshape(outputs.shape[0], outputs.shape[1], -1)
    return int(np.all(flat == flat[:1], axis=(0, 2)).sum())


def set_rates(gm: fx.GraphModule, rows: list[dict[str, Any]]) -> None:
    """Put stock sites at the rates of ``rows`` (as :func:`finalize` wrote them)."""
    from dropcli.backends.torch.fx import set_module
    from dropcli.variants import get_variant

    for r in rows:
        site = (get_variant("standard").torch_module(p=r["learned_p"]) if r["variant"] == "standard"
                else get_variant("gaussian").torch_module(alpha=r["alpha"]))
        set_module(gm, r["site"], site)
    gm.recompile()


def fit_temperature(outputs: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0,
                    prior_sd: float = TEMPERATURE_PRIOR_SD) -> tuple[float, float, float]:
    """The temperature of the MC predictive ``mean_t softmax(z_t / T)`` on ``outputs`` [T, N, K]
    (logits) with ``labels``: the MAP estimate under the prior ``log T ~ N(0, prior_sd^2)``, i.e. the
    minimiser of ``mean NLL(T) + (log T)^2 / (2 prior_sd^2 N)`` (golden-section search over log T
    in [log lo, log hi]). On a few hundred examples with a handful of errors the plain NLL
    minimiser over-sharpens: the sharper predictive gains a little on every correct example of the
    validation set and loses a lot on the errors of new data that it has too few of. The prior
    shrinks T towards 1 by an amount that fades as N grows. A minimiser at an end of the range is
    no fit: as T -> 0 the predictive tends to the vote fractions of the passes, which a finite
    validation set can favour and new data punishes (a class no pass voted for gets probability 0);
    then T = 1. Returns (T, mean NLL at T, the MAP objective at T)."""
    from dropcli.analysis import stats

    y = np.asarray(labels)
    n = max(len(y), 1)
    w = 1.0 / (2.0 * prior_sd ** 2 * n)

    def nll(log_t: float) -> float:
        probs = stats.to_probs(outputs, as_probs=False, temperature=math.exp(log_t)).mean(0)
        return float(np.mean(-np.log(np.maximum(probs[np.arange(len(y)), y], stats.EPS))))

    def obj(log_t: float) -> float:
        return nll(log_t) + w * log_t * log_t

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = obj(c), obj(d)
    while b - a > 1e-4:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = obj(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = obj(d)
    best_lt = (a + b) / 2
    if min(best_lt - math.log(lo), math.log(hi) - best_lt) < 1e-2:
        best_lt = 0.0
    v = nll(best_lt)
    return math.exp(best_lt), v, v + w * best_lt * best_lt


def mc_errors(outputs: np.ndarray, labels: np.ndarray) -> int:
    """Misclassified examples of the MC predictive (mean softmax) of ``outputs`` [T, N, K]."""
    from dropcli.analysis import stats

    return int((stats.to_probs(outputs, as_probs=False).mean(0).argmax(-1) != np.asarray(labels)).sum())
