"""How much better than the deterministic pass can an MC-dropout predictive be on the models of
benchmarks/quality.py, at most? An ORACLE study, for analysis only (docs/learned.md).

Issue 18 asks finetuned + calibrated MC dropout (`ft+cal MC`) to beat the plain deterministic pass
(`eval`) on test NLL and ECE on every model of benchmarks/quality.py. That benchmark measured a tie.
This script asks whether ANY member of the family that finetune chooses from could do better, by
choosing it ON TEST, which no real rule may do:

* the family: the model's dropout rates with their noise variance p/q scaled by s (s = 0 is the
  deterministic pass; s in finetune's scan 1/16 .. 4, plus 8 and 16), and a temperature tau on the
  logits of every pass (mean_t softmax(z_t / tau), as `dropcli uncertainty` applies a stored one);
  (finetune's concrete fit also moves the rates of the sites relative to each other; here they
  keep the trained ratios);
* `oracle NLL`: the lowest test NLL over (s, tau), and the gain over eval, with the standard error
  of that paired difference over the test examples;
* `eval + tau*`: the deterministic pass with its own test-optimal temperature;
* `oracle ECE`: the lowest test ECE over the same grid;
* `ECE floor`: the ECE that a PERFECTLY calibrated predictor with the eval pass's probabilities
  would show on this many test rows (labels drawn from its own probabilities, 400 draws; mean):
  ECE is biased upwards on finite data, and a measured ECE at this floor cannot be improved on in
  expectation.

Splits, models and training are benchmarks/quality.py's own (its prepare(), same seeds). T = 50 MC
passes on test, drawn with torch's dropout from a fixed seed.

Run:  python benchmarks/quality_headroom.py [--seeds 5] [--models mlp300 ...]   (all five models by default)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

T = 50
EXTRA_SCALES = (8.0, 16.0)
TAUS = np.exp(np.linspace(math.log(0.4), math.log(2.5), 61))
FLOOR_DRAWS = 400


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def passes(model: torch.nn.Module, x: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """[T, N, K] logits with every Dropout's variance p/q scaled by ``scale`` (0: one eval pass)."""
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    X = torch.from_numpy(x)
    with torch.no_grad():
        if scale == 0:
            model.eval()
            return model(X).double().numpy()[None]
        orig = [m.p for m in drops]
        try:
            for m, p in zip(drops, orig):
                r = scale * p / (1 - p)
                m.p = r / (1 + r)
            model.eval()
            for m in drops:
                m.train()  # only the dropout layers sample (the models have no BatchNorm)
            torch.manual_seed(seed)
            return np.stack([model(X).double().numpy() for _ in range(T)])
        finally:
            for m, p in zip(drops, orig):
                m.p = p
            model.eval()


def study(name: str, seed: int) -> dict:
    import tempfile

    import quality as Q
    from dropcli.training import learned

    with tempfile.TemporaryDirectory() as tmp:  # quality.py's split, model and training
        run = Q.prepare(name, {**Q.MODELS, **Q.HOLDOUT}[name], seed, Path(tmp))
    model, xte, y_te = run["model"], run["xs"]["test"], run["y_te"]
    ev = passes(model, xte, 0.0, seed)
    p_eval = softmax(ev[0])
    nll_eval = Q.per_example_nll(p_eval, y_te)
    best = (nll_eval.mean(), 0.0, 1.0, nll_eval)
    best_ece = (Q.ece(p_eval, y_te), 0.0, 1.0)
    eval_tau = (nll_eval.mean(), 1.0)
    for s in (0.0,) + tuple(learned.SCALES) + EXTRA_SCALES:
        z = ev if s == 0 else passes(model, xte, s, seed)
        for tau in TAUS:
            p = softmax(z / tau).mean(0)
            per = Q.per_example_nll(p, y_te)
            if per.mean() < best[0]:
                best = (per.mean(), s, tau, per)
            e = Q.ece(p, y_te)
            if e < best_ece[0]:
                best_ece = (e, s, tau)
            if s == 0 and per.mean() < eval_tau[0]:
                eval_tau = (per.mean(), tau)
    diff = best[3] - nll_eval
    floor, floor_sd = Q.ece_floor(p_eval, FLOOR_DRAWS, seed)
    return {"model": name, "seed": seed, "n": len(y_te), "errors": int((p_eval.argmax(-1) != y_te).sum()),
            "nll_eval": float(nll_eval.mean()), "nll_oracle": float(best[0]), "oracle_s": best[1], "oracle_tau": float(best[2]),
            "gain": float(-diff.mean()), "gain_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
            "nll_eval_tau": float(eval_tau[0]), "eval_tau": float(eval_tau[1]),
            "ece_eval": Q.ece(p_eval, y_te), "ece_oracle": float(best_ece[0]), "ece_floor": floor, "ece_floor_sd": floor_sd}


def fmt(v: list[float], d: int = 4) -> str:
    return f"{statistics.mean(v):.{d}f} ± {statistics.stdev(v):.{d}f}" if len(v) > 1 else f"{v[0]:.{d}f}"


def main(argv=None) -> int:
    import quality as Q

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=list(Q.MODELS) + list(Q.HOLDOUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in a.models:
        for seed in range(a.seeds):
            r = study(name, seed)
            rows.append(r)
            print(f"{name} seed {seed}: eval NLL {r['nll_eval']:.4f}, oracle {r['nll_oracle']:.4f} (s={r['oracle_s']:g}, "
                  f"tau={r['oracle_tau']:.2f}), gain {r['gain']:.4f} ± {r['gain_se']:.4f}; ECE eval {r['ece_eval']:.4f}, "
                  f"oracle {r['ece_oracle']:.4f}, floor {r['ece_floor']:.4f}; {r['errors']} errors of {r['n']}",
                  file=sys.stderr, flush=True)
    print(f"\nORACLE (chosen on test: analysis only), {a.seeds} seeds, T = {T}; mean ± sd over seeds\n")
    print("| model | test errors | eval NLL | eval + tau* NLL | oracle NLL | oracle gain over eval | its paired se | "
          "eval ECE | ECE floor (perfect calibration) | oracle ECE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.models:
        rs = [r for r in rows if r["model"] == name]
        g = lambda k: [r[k] for r in rs]  # noqa: E731
        print(f"| {name} | {fmt(g('errors'), 1)} | {fmt(g('nll_eval'))} | {fmt(g('nll_eval_tau'))} | {fmt(g('nll_oracle'))} | "
              f"{fmt(g('gain'))} | {statistics.mean(g('gain_se')):.4f} | {fmt(g('ece_eval'))} | {fmt(g('ece_floor'))} | "
              f"{fmt(g('ece_oracle'))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
