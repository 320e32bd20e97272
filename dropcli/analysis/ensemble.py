"""`dropcli analyze`: ensemble vs weight scaling (Baldi & Sadowski 2013), on the user's inputs.

Math: docs/analysis.md (Ensemble vs weight scaling). For the units after a dropout site, over MC masks:

* ``E = mean(O)``, ``V = Var(O)``, ``G = exp(mean log O)``, ``G' = exp(mean log(1-O))``,
  ``NWGM = G / (G + G')``; ``O*`` is the deterministic pass.
* G, G' and NWGM need ``0 < O < 1``: they are computed for logistic (sigmoid) units and for
  the softmax probabilities of a classifier's output; for ReLU/tanh/linear units they are
  reported as not applicable.
* Exact for a logistic unit: ``NWGM = sigmoid(E[S])``. With samples, ``log(G/G') = mean S``
  identically, so the sampled NWGM is ``sigmoid(mean_t S_t)``; its distance from
  ``sigmoid(E[S])`` is the Monte-Carlo error, and ``E[S] = S*`` exactly when the site's input
  is deterministic (elementwise Bernoulli site: E[m/q] = 1 inverted, and vanilla scales by q
  at test time).
* Bounds checked per unit: ``V <= E(1-E)``; ``G <= E`` (AM-GM); ``|E - NWGM| <= 2E(1-E)|1-2E|``;
  and the approximation ``E - G ≈ V`` is reported as ``|E - G - V|``.
* ``Var(S) = sum_i w_i^2 I_i^2 Var(delta)`` with ``Var(delta) = (1-q)/q`` (inverted, delta = m/q)
  or ``q(1-q)`` (vanilla, delta = m), for an elementwise Bernoulli site whose input I is
  deterministic. The regularisation view's penalty is ``0.5 * sum_j sum_i w_ji^2 I_i^2 Var(delta)``
  per layer, averaged over examples (I from the deterministic pass).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

EPS = 1e-12
MAX_ENUM_INPUTS = 20


# ---------------------------------------------------------------------- pure math
def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def unit_moments(O: np.ndarray, weights: np.ndarray | None = None, logO: np.ndarray | None = None,
                 log1mO: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Ensemble quantities over axis 0 (masks or MC samples) of unit outputs O in (0, 1).

    ``weights``: probabilities of each mask (exact enumeration); None = uniform (MC samples).
    ``logO``/``log1mO``: exact logs when O comes from a logistic unit (avoids log(0) rounding).
    """
    O = np.asarray(O, dtype=np.float64)
    T = O.shape[0]
    w = np.full(T, 1.0 / T) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w.reshape((T,) + (1,) * (O.ndim - 1))
    if logO is None:
        logO = np.log(np.clip(O, EPS, None))
    if log1mO is None:
        log1mO = np.log(np.clip(1.0 - O, EPS, None))
    E = (w * O).sum(0)
    V = (w * (O - E) ** 2).sum(0)
    lg = (w * logO).sum(0)
    lg1 = (w * log1mO).sum(0)
    G, G1 = np.exp(lg), np.exp(lg1)
    nwgm = sigmoid(lg - lg1)  # = G / (G + G'), computed stably
    return {"E": E, "V": V, "G": G, "G1": G1, "NWGM": nwgm}


def bound_checks(m: dict[str, np.ndarray], tol: float = 1e-9) -> dict[str, np.ndarray]:
    """Boolean violation arrays for the bounds of docs/analysis.md."""
    E, V, G, nw = m["E"], m["V"], m["G"], m["NWGM"]
    return {
        "V <= E(1-E)": V > E * (1 - E) + tol,
        "G <= E": G > E + tol,
        "|E-NWGM| <= 2E(1-E)|1-2E|": np.abs(E - nw) > 2 * E * (1 - E) * np.abs(1 - 2 * E) + tol,
    }


def enumerate_logistic(w: np.ndarray, b: float, I: np.ndarray, q: float, convention: str = "inverted") -> dict[str, float]:
    """Exact ensemble of one logistic unit O = sigmoid(b + sum_i w_i delta_i I_i) over all 2^n masks."""
    w = np.asarray(w, dtype=np.float64)
    I = np.asarray(I, dtype=np.float64)
    n = len(w)
    if n > MAX_ENUM_INPUTS:
        raise ValueError(f"enumeration of 2^{n} masks is too large")
    masks = np.array(list(itertools.product((0.0, 1.0), repeat=n)))  # [2^n, n]
    k = masks.sum(1)
    probs = q ** k * (1 - q) ** (n - k)
    scale = 1.0 / q if convention == "inverted" else 1.0
    S = b + (masks * scale * w * I).sum(1)
    O = sigmoid(S)
    m = unit_moments(O, probs, log_sigmoid(S), log_sigmoid(-S))
    ES = float((probs * S).sum())
    m = {k2: float(v) for k2, v in m.items()}
    m["ES"] = ES
    m["VarS"] = float((probs * (S - ES) ** 2).sum())
    vd = (1 - q) / q if convention == "inverted" else q * (1 - q)
    m["VarS_formula"] = float((w ** 2 * I ** 2).sum() * vd)
    return m


def var_delta(q: float, convention: str) -> float:
    return (1 - q) / q if convention == "inverted" else q * (1 - q)


def softmax_nwgm(probs: np.ndarray) -> np.ndarray:
    """[T, N, K] probabilities -> normalised geometric mean [N, K]."""
    lp = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, None)).mean(0)
    lp -= lp.max(-1, keepdims=True)
    g = np.exp(lp)
    return g / g.sum(-1, keepdims=True)


def distribution(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return {}
    return {"mean": float(x.mean()), "std": float(x.std()), "median": float(np.median(x)),
            "p95": float(np.percentile(x, 95)), "max": float(x.max())}


def output_rules(samples: np.ndarray, eval_out: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """MC mean, softmax NWGM and the deterministic pass: accuracy, NLL, pairwise disagreement."""
    from dropcli.analysis.stats import to_probs

    probs = to_probs(samples)  # [T, N, K]
    rules = {"mc_mean": probs.mean(0), "nwgm": softmax_nwgm(probs), "deterministic": to_probs(eval_out[None])[0]}
    preds = {k: v.argmax(-1) for k, v in rules.items()}
    res: dict[str, Any] = {"rules": {}, "disagreement": {}}
    for k, p in rules.items():
        r: dict[str, float] = {}
        if labels is not None:
            r["accuracy"] = float((preds[k] == labels).mean())
            r["nll"] = float(-np.log(np.clip(p[np.arange(len(labels)), labels], EPS, None)).mean())
        res["rules"][k] = r
    names = list(rules)
    for a, b in itertools.combinations(names, 2):
        res["disagreement"][f"{a} vs {b}"] = {
            "argmax": float((preds[a] != preds[b]).mean()),
            "mean_abs_prob": float(np.abs(rules[a] - rules[b]).mean()),
        }
    return res


# ---------------------------------------------------------------------- per-site summary
@dataclass
class SiteUnits:
    site: str
    q: float | None  # keep probability, when the site is elementwise Bernoulli
    convention: str | None  # inverted / vanilla
    s_name: str | None  # pre-activation node (the layer after the site)
    o_name: str | None
    o_kind: str  # sigmoid / softmax / relu / linear / ...
    input_deterministic: bool
    skip: str | None = None
    extra: dict = field(default_factory=dict)


def summarise_site(u: SiteUnits, S: np.ndarray | None, S_star: np.ndarray | None, O: np.ndarray | None,
                   O_star: np.ndarray | None, varS_formula: np.ndarray | None) -> dict[str, Any]:
    """S, O: [N, T, U] samples; S_star, O_star: [N, U]; varS_formula: [N, U] or None."""
    res: dict[str, Any] = {"site": u.site, "layer": u.s_name, "units": u.o_name, "unit_kind": u.o_kind,
                           "keep_q": u.q, "convention": u.convention}
    if u.skip:
        res["skipped"] = u.skip
        return res
    assert O is not None and O_star is not None and S is not None
    Ot = np.moveaxis(O.astype(np.float64), 1, 0)  # [T, N, U]
    T = Ot.shape[0]
    E = Ot.mean(0)
    std = Ot.std(0, ddof=1) if T > 1 else np.zeros_like(E)
    q: dict[str, Any] = {"E": distribution(E), "O*": distribution(O_star), "Std(O)": distribution(std),
                         "|E-O*|": distribution(np.abs(E - O_star))}
    res["n_units"] = int(E.shape[-1])
    res["quantities"] = q
    res["bounds"] = {}
    if u.o_kind in ("sigmoid", "softmax"):
        if u.o_kind == "sigmoid":
            St = np.moveaxis(S.astype(np.float64), 1, 0)
            m = unit_moments(Ot, logO=log_sigmoid(St), log1mO=log_sigmoid(-St))
        else:
            m = unit_moments(Ot)
        for k, name in (("G", "G"), ("G1", "G'"), ("NWGM", "NWGM")):
            q[name] = distribution(m[k])
        q["|E-NWGM|"] = distribution(np.abs(m["E"] - m["NWGM"]))
        q["V"] = distribution(m["V"])
        q["E-G"] = distribution(m["E"] - m["G"])
        q["|E-G-V|"] = distribution(np.abs(m["E"] - m["G"] - m["V"]))
        # second-order expansion of E[log O] around E: E - G ~= V / (2E); exact enumeration
        # follows this more closely than the E - G ~= V of docs/analysis.md (reported side by side)
        q["V/(2E)"] = distribution(m["V"] / (2 * np.maximum(m["E"], EPS)))
        q["V|1-2E|/(1-2V)"] = distribution(m["V"] * np.abs(1 - 2 * m["E"]) / (1 - 2 * m["V"]))
        # second-order expansion: E - NWGM ~ V(1-2E)/(2E(1-E)) (tests/test_analyze.py checks it
        # against exact enumeration; docs/analysis.md's form above differs by 2E(1-E)/(1-2V))
        E_ = np.clip(m["E"], EPS, 1 - EPS)
        q["V|1-2E|/(2E(1-E))"] = distribution(m["V"] * np.abs(1 - 2 * E_) / (2 * E_ * (1 - E_)))
        for k, bad in bound_checks(m).items():
            res["bounds"][k] = {"violations": int(bad.sum()), "fraction": float(bad.mean())}
        if u.o_kind == "sigmoid":
            St = np.moveaxis(S.astype(np.float64), 1, 0)
            nw_from_S = sigmoid(St.mean(0))
            q["|NWGM - sigmoid(mean S)|"] = distribution(np.abs(m["NWGM"] - nw_from_S))
            if u.input_deterministic and S_star is not None and u.q is not None:
                # E[S] = S* exactly: the sampled NWGM's distance from the exact sigmoid(E[S])
                q["|NWGM - sigmoid(E[S])|"] = distribution(np.abs(m["NWGM"] - sigmoid(S_star)))
    else:
        res["nwgm_note"] = f"G, G' and NWGM need unit outputs in (0, 1); {u.o_kind} units are outside it"
    if varS_formula is not None:
        St = np.moveaxis(S.astype(np.float64), 1, 0)
        vs = St.var(0, ddof=1) if T > 1 else np.zeros_like(St[0])
        q["Var(S) sampled"] = distribution(vs)
        q["Var(S) formula"] = distribution(varS_formula)
        if T > 3:
            # the sample variance of T draws has standard error sqrt((mu4 - sigma^4) / T), with the
            # fourth central moment estimated from the same draws; flag units beyond 5 s.e.
            mu4 = ((St - St.mean(0)) ** 4).mean(0)
            se = np.sqrt(np.maximum(mu4 - vs ** 2, 0.0) / T)
            bad = np.abs(vs - varS_formula) > 5 * se + 1e-9 * (1 + varS_formula)
            res["bounds"]["Var(S) = sum w^2 I^2 Var(delta)"] = {"violations": int(bad.sum()), "fraction": float(bad.mean()),
                                                                   "tolerance": "5 standard errors of the sample variance"}
    return res


def assemble(per_site: Sequence[tuple], samples: np.ndarray, eval_out: np.ndarray, labels: np.ndarray | None,
             classification: bool) -> dict[str, Any]:
    """The report from captured values, the same for both backends.

    ``per_site``: (SiteUnits, S [N,T,U], S* [N,U], O [N,T,U] or None, O* or None, Var(S) formula [N,U] or None);
    O None with o_kind "softmax" means O = softmax(S)."""
    from dropcli.analysis.stats import to_probs

    sites = []
    for u, Sv, Ss, Ov, Os, vf in per_site:
        if u.skip:
            sites.append(summarise_site(u, None, None, None, None, None))
            continue
        if u.o_kind == "softmax":
            Ov, Os = to_probs(Sv), to_probs(Ss[:, None])[:, 0]
        r = summarise_site(u, Sv, Ss, Ov, Os, vf if u.input_deterministic else None)
        if vf is not None:
            r["penalty"] = float(0.5 * vf.sum(-1).mean())
            if not u.input_deterministic:
                r["penalty_note"] = "I from the deterministic pass (the site's input is random: an earlier site)"
        else:
            r["penalty_note"] = "not an elementwise Bernoulli site before a Linear/MatMul/Gemm layer"
        if not u.input_deterministic:
            r["var_s_note"] = "Var(S) formula holds given I; the site's input is random (an earlier site), so not compared"
        sites.append(r)
    report: dict[str, Any] = {"sites": sites}
    if classification and samples.shape[-1] >= 2:
        report["output"] = output_rules(samples, eval_out, labels)
    report["_samples"] = samples
    return report
