"""ft+cal MC's own family on test: an oracle over it, and scale 0 joining the scan (issue 18).

For each model and seed of benchmarks/quality.py (its splits and trained models, imported from
it), this runs the same `dropcli finetune --variant concrete --val VAL --calibrate` as the benchmark
and, while finetune scans its rate scales on validation, also draws T=50 MC passes on TEST at
each of the same scales (the same finetuned rates, x1/16 .. x4). From those it reports:

(a) ORACLE (chosen ON TEST; for analysis only, never a reported result): the lowest test NLL
    reachable by any (scale, temperature) pair of the family ft+cal chooses from (for each scale
    the test-NLL-minimising temperature), and separately the lowest test ECE over scale x a grid
    of temperatures; against the eval pass, and against the eval pass with its own test-optimal
    temperature ("eval+T oracle"). Next to them: ft+cal as finetune chose it on validation (its
    scale and temperature applied to the same test passes), and the eval pass with a temperature
    fitted on validation the way finetune fits one (MAP, prior sd 0.3: "eval+T val").
(b) the ECE noise floor: the expected test ECE (15 bins, dropcli's ece) of a perfectly calibrated
    predictor whose predictive is the eval pass's own: labels drawn from the eval probabilities
    (2000 draws) on the same test rows; next to the eval pass's measured test ECE.
(c) the standard error of a paired per-example NLL difference at this test size: for the oracle
    and for ft+cal minus the eval pass, sd of the per-example differences / sqrt(n_test).
(d) one more rule chosen on VALIDATION only ("joint incl. scale 0"): the deterministic pass with
    its own MAP temperature joins finetune's scan, and the (scale, temperature) pair with the
    lowest MAP objective of learned.fit_temperature wins (scale and temperature together).
benchmarks/quality_headroom.py's oracle scales the TRAINED rates without running finetune; this
one records finetune's own scan (the ELBO's rates), which is the family ft+cal really chooses
from. Where finetune stored no temperature, ft+cal uses T = 1.
It also records the ELBO's learned rates (before the scale) against the rates the model was
trained with (docs/learned.md's claim about their ratio).

Run:  python benchmarks/quality_family.py [--seeds 5] [--models ...] [--holdout] [--json out.json]
30 to 70 s per model and seed on the shared 2 cores (no LLLA, no OOD): 658 s for the three
default models x 5 seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality as Q  # noqa: E402

TRAINED_P = {"mlp300": 0.3, "mlp512": 0.5, "cnn": 0.3, "mlp128": 0.2, "mlp1024": 0.5}
T_GRID = np.exp(np.linspace(math.log(0.25), math.log(4.0), 81))  # temperatures for the ECE oracle
ECE_DRAWS = 2000


class _Split:
    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self):
        return len(self.x)


def mc_probs(outs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    from dropcli.analysis import stats

    return stats.to_probs(outs, as_probs=False, temperature=temperature).mean(0)


def best_t_nll(outs: np.ndarray, y: np.ndarray) -> float:
    """The test-NLL-minimising temperature (no prior: the oracle)."""
    from dropcli.training import learned

    return learned.fit_temperature(outs, y, prior_sd=1e6)[0]


def run_one(name: str, spec, seed: int, work: Path) -> dict:
    import dropcli
    from dropcli.training import learned

    d = Q.prepare(name, spec, seed, work)
    y_te, y_va = d["y_te"], d["y_va"]
    test = _Split(d["xs"]["test"], y_te)
    with torch.no_grad():
        le = d["model"](torch.from_numpy(d["xs"]["test"])).double().numpy()[None]
        lv = d["model"](torch.from_numpy(d["xva"])).double().numpy()[None]

    # record T passes on test at every scale finetune scans (the same rates, the same seed)
    test_outs: dict[float, np.ndarray] = {}
    val_outs: dict[float, np.ndarray] = {}
    state = {"scale": None}
    real_scaled, real_samples = learned.scaled_rows, learned.mc_samples

    def scaled_rows(rows, scale):
        state["scale"] = scale
        return real_scaled(rows, scale)

    def mc_samples(gm, split, samples, seed_, *a, **k):
        out = real_samples(gm, split, samples, seed_, *a, **k)
        if state["scale"] is not None and state["scale"] not in test_outs and split is not test:
            test_outs[state["scale"]] = real_samples(gm, test, Q.T, seed_)
            val_outs[state["scale"]] = out
        return out

    learned.scaled_rows, learned.mc_samples = scaled_rows, mc_samples
    try:
        rep = dropcli.finetune(str(d["src"]), str(work / "train.npz"), str(work / f"{name}_{seed}_ft.pt2"),
                               val=str(work / "val.npz"), seed=seed, calibrate=True, force=True, **Q.FT)
    finally:
        learned.scaled_rows, learned.mc_samples = real_scaled, real_samples
    chosen, t_val = rep["summary"]["chosen_scale"], rep["summary"]["temperature"] or 1.0

    pe = mc_probs(le)
    n_eval = Q.per_example_nll(pe, y_te)
    t_eval_oracle = best_t_nll(le, y_te)
    t_eval_val = learned.fit_temperature(lv, y_va)[0]
    p_eval_val = mc_probs(le, t_eval_val)
    n_eval_t = Q.per_example_nll(mc_probs(le, t_eval_oracle), y_te)
    ece_eval_oracle = min(Q.ece(mc_probs(le, t), y_te) for t in T_GRID)

    nll_by_scale, ece_best = {}, (np.inf, None, None)
    best_nll = (np.inf, None, None, None)
    for sc, outs in test_outs.items():
        t = best_t_nll(outs, y_te)
        pn = Q.per_example_nll(mc_probs(outs, t), y_te)
        nll_by_scale[sc] = (float(pn.mean()), t)
        if pn.mean() < best_nll[0]:
            best_nll = (float(pn.mean()), sc, t, pn)
        for tt in T_GRID:
            e = Q.ece(mc_probs(outs, tt), y_te)
            if e < ece_best[0]:
                ece_best = (e, sc, float(tt))
    # step 2, chosen on validation only: scale 0 (the eval pass) joins the family, and (scale, T) is
    # the pair with the lowest MAP objective of fit_temperature (finetune's own score per scale)
    cand = {0.0: (learned.fit_temperature(lv, y_va), le)}
    for sc, vo in val_outs.items():
        if learned.degenerate_count(vo) <= min(learned.degenerate_count(v) for v in val_outs.values()):
            cand[sc] = (learned.fit_temperature(vo, y_va), test_outs[sc])
    j_sc = min(cand, key=lambda k: (cand[k][0][2], k))
    pj = mc_probs(cand[j_sc][1], cand[j_sc][0][0])
    pf = mc_probs(test_outs[chosen], t_val)
    n_ft = Q.per_example_nll(pf, y_te)
    floor_m, floor_sd = Q.ece_floor(pe, ECE_DRAWS, seed)
    n = len(y_te)
    se = lambda v: float(np.std(v, ddof=1) / math.sqrt(n))  # noqa: E731
    return {
        "n_test": n, "errors_eval": int((pe.argmax(-1) != y_te).sum()),
        "eval": {"nll": float(n_eval.mean()), "ece": Q.ece(pe, y_te)},
        "eval+T val": {"nll": float(Q.per_example_nll(p_eval_val, y_te).mean()), "ece": Q.ece(p_eval_val, y_te), "T": t_eval_val},
        "eval+T oracle": {"nll": float(n_eval_t.mean()), "ece": ece_eval_oracle, "T": t_eval_oracle},
        "ft+cal": {"nll": float(n_ft.mean()), "ece": Q.ece(pf, y_te), "scale": chosen, "T": t_val},
        "joint0": {"nll": float(Q.per_example_nll(pj, y_te).mean()), "ece": Q.ece(pj, y_te), "scale": j_sc,
                   "T": cand[j_sc][0][0]},
        "oracle": {"nll": best_nll[0], "nll_scale": best_nll[1], "nll_T": best_nll[2],
                   "ece": ece_best[0], "ece_scale": ece_best[1], "ece_T": ece_best[2]},
        "se_paired_nll": {"oracle-eval": se(best_nll[3] - n_eval), "ft+cal-eval": se(n_ft - n_eval),
                          "oracle-(eval+T oracle)": se(best_nll[3] - n_eval_t)},
        "ece_floor": {"mean": floor_m, "sd": floor_sd},
        "nll_by_scale": {str(k): v for k, v in nll_by_scale.items()},
        "elbo_p": [r["elbo_p"] for r in rep["sites"]],
        "elbo_p_ratio": [r["elbo_p"] / TRAINED_P[name] for r in rep["sites"]] if name in TRAINED_P else None,
    }


def mse(v: list[float]) -> str:
    m = statistics.fmean(v)
    s = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
    return f"{m:+.4f} ± {s:.4f}"


def ms(v: list[float]) -> str:
    return f"{statistics.fmean(v):.4f}"


def report(allres: dict[str, list[dict]]) -> None:
    print("\n## Headroom over the eval pass on test (ORACLE rows are chosen on test: analysis only)\n")
    print("Differences are paired per seed, mean ± se over seeds; 'se in-seed' is the mean over seeds of the "
          "standard error of the per-example paired NLL difference at this test size.\n")
    print("| model | eval NLL | ft+cal - eval NLL | eval+T(val) - eval | joint incl. scale 0 (val) - eval | ORACLE eval+T - eval | ORACLE (scale,T) - eval "
          "| ORACLE (scale,T) - ORACLE eval+T | se in-seed (oracle-eval) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in allres.items():
        g = lambda a, k="nll": [r[a][k] for r in runs]  # noqa: E731
        d = lambda a, b: [x - y for x, y in zip(g(a), g(b))]  # noqa: E731
        print(f"| {name} | {ms(g('eval'))} | {mse(d('ft+cal', 'eval'))} | {mse(d('eval+T val', 'eval'))} | "
              f"{mse(d('joint0', 'eval'))} | {mse(d('eval+T oracle', 'eval'))} | {mse(d('oracle', 'eval'))} | {mse(d('oracle', 'eval+T oracle'))} | "
              f"{ms([r['se_paired_nll']['oracle-eval'] for r in runs])} |")
    print("\n| model | eval ECE | ECE floor (perfectly calibrated, same n) | ft+cal - eval ECE | joint incl. 0 (val) - eval ECE | ORACLE eval+T - eval ECE "
          "| ORACLE (scale,T) - eval ECE | test errors (eval) / n |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in allres.items():
        ev = [r["eval"]["ece"] for r in runs]
        print(f"| {name} | {ms(ev)} | {ms([r['ece_floor']['mean'] for r in runs])} ± "
              f"{ms([r['ece_floor']['sd'] for r in runs])} (sd) | "
              f"{mse([r['ft+cal']['ece'] - e for r, e in zip(runs, ev)])} | "
              f"{mse([r['joint0']['ece'] - e for r, e in zip(runs, ev)])} | "
              f"{mse([r['eval+T oracle']['ece'] - e for r, e in zip(runs, ev)])} | "
              f"{mse([r['oracle']['ece'] - e for r, e in zip(runs, ev)])} | "
              f"{statistics.fmean(r['errors_eval'] for r in runs):.1f} / {runs[0]['n_test']} |")
    print("\nchosen on test by the oracle (scale for NLL, T) and by finetune on validation (scale, T):")
    for name, runs in allres.items():
        print(f"  {name}: oracle " + ", ".join(f"x{r['oracle']['nll_scale']:g} T={r['oracle']['nll_T']:.2f}" for r in runs)
              + " | ft+cal " + ", ".join(f"x{r['ft+cal']['scale']:g} T={r['ft+cal']['T']:.2f}" for r in runs)
              + " | joint incl. 0 " + ", ".join(f"x{r['joint0']['scale']:g} T={r['joint0']['T']:.2f}" for r in runs))
    print("\nELBO rates (before the scale) / the rate the model was trained with, per site, per seed:")
    for name, runs in allres.items():
        print(f"  {name}: " + "; ".join(" ".join(f"{v:.2f}" for v in r["elbo_p_ratio"] or []) for r in runs)
              + "  (p: " + "; ".join(" ".join(f"{v:.3f}" for v in r["elbo_p"]) for r in runs) + ")")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=list(Q.MODELS))
    ap.add_argument("--holdout", action="store_true", help="run the held-out models")
    ap.add_argument("--json", help="also write every per-seed number here")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    names = list(Q.HOLDOUT) if a.holdout else a.models
    t0 = time.perf_counter()

    def log(name, seed, secs, allres):
        r = allres[name][-1]
        print(f"# {name} seed {seed}: {secs:.0f}s; eval {r['eval']['nll']:.4f}, "
              f"ft+cal {r['ft+cal']['nll']:.4f}, oracle {r['oracle']['nll']:.4f}, "
              f"eval+T oracle {r['eval+T oracle']['nll']:.4f}", file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(allres, indent=1, default=float))

    allres = Q.over_seeds(names, a.seeds, run_one, log)
    report(allres)
    print(f"\n{time.perf_counter() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
