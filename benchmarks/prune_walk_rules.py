"""How `dropcli prune --max-drop` walks the trade-off curve, compared by resampling validation.

The walk's rule was chosen with this script, on the TUNING models of benchmarks/prune_digits.py
(the 64-300-100-10 MLP and the BatchNorm CNN), on their VALIDATION split only; it never loads the
test split. For each model and seed it trains the dense model and runs prune's sparse-VD fine-tune
once (in process, the defaults), then scores every cut of the trained log alphas on validation,
as it is and retrained, keeping each example's correct/wrong.

Then it treats the validation split as the population and draws bootstrap validation sets from it
(360 examples with replacement). On each draw it runs a walk rule on the draw (the real
`dropcli.prune.core._walk`, fed the precomputed scores; and the bisection walk it replaced,
re-implemented below) and looks up what the chosen model loses on the whole split: the
population drop. A rule that picks its cut where the draw's noise was kind shows a population drop
above the draw's. The last figure is the chance that a test split of the same size sees a drop
above 1.5 points: the normal tail of the chosen model's population drop with its own paired
standard error, averaged over the draws. "refused" counts draws where the first training round
finds nothing (prune would then train a second round at half the KL weight; not simulated).

Run:  python benchmarks/prune_walk_rules.py [--models MLP,CNN] [--seeds 3] [--draws 200] [--margins 0,0.5,1] [--cache DIR]
(about 1-2 minutes per model and seed on one core)
"""

from __future__ import annotations

import argparse
import copy
import math
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune_digits as bench  # noqa: E402
from dropcli.errors import DropcliError, NotMet  # noqa: E402
from dropcli.prune import core  # noqa: E402
from dropcli.training.loop import Split  # noqa: E402

BUDGET = 1.5


def curve_scores(name: str, seed: int) -> dict:
    """Dense model, one fine-tune, every cut scored on validation as it is and retrained."""
    make, shape, _, seen = bench.MODELS[name]
    if seen != "tuning":
        raise SystemExit(f"{name} is not a tuning model: the walk rule is chosen on MLP and CNN only")
    (xt, yt), (xv, yv), _ = [(torch.from_numpy(x).reshape(shape), torch.from_numpy(y)) for x, y in bench.data(seed)]
    torch.manual_seed(seed)
    gm = fx.symbolic_trace(bench.train_dense(make(), xt, yt, seed=seed)).eval()
    train, val = Split(xt, yt, "train"), Split(xv, yv, "val")
    cfg = core.PruneConfig(threshold=None, max_drop=BUDGET, seed=seed, quiet=True)
    ref = core.score(gm, val, "classification")["per_example"]
    protected = core.output_layers(gm)
    loss_fn = core.distill_loss(core.teacher_outputs(gm, train), "classification", cfg.distill)
    trained, mods, _ = core._train(copy.deepcopy(gm), train, "classification", cfg, cfg.kl_weight, protected, loss_fn)
    rows = []
    for p in core.sweep(trained, mods, val, "classification", None):  # from the most compressive to the least
        row = {"t": p["threshold"], "compression": p["compression"], "cut": None, "retrained": None}
        for key, epochs in (("cut", 0), ("retrained", None)):
            try:
                c = core._candidate(trained, p["threshold"], train, val, "classification", cfg, (xt[:2],), protected,
                                    retrain_epochs=epochs, loss_fn=loss_fn)
            except DropcliError:  # the cut empties a layer
                continue
            row[key] = c["metrics"]["per_example"]
        rows.append(row)
    return {"ref": ref, "rows": rows}


def _m(per: np.ndarray | None, idx: np.ndarray) -> dict | None:
    return None if per is None else {"accuracy": float(per[idx].mean()), "loss": 0.0, "per_example": per[idx]}


def walk_now(D: dict, idx: np.ndarray) -> tuple[int, str] | None:
    """dropcli's walk (core._walk), on the draw ``idx``; returns (row, "cut" | "retrained") or None."""
    rows = D["rows"]
    by_t = {r["t"]: i for i, r in enumerate(rows)}
    scored = {r["t"]: _m(r["cut"], idx) for r in rows if r["cut"] is not None}

    def candidate(trained, t, *a, retrain_epochs=None, **k):
        key = "cut" if retrain_epochs == 0 else "retrained"
        per = rows[by_t[t]][key]
        if per is None:
            raise DropcliError("the cut empties a layer", "-")
        return {"metrics": _m(per, idx), "history": [] if key == "cut" else [{}], "kept": 1, "total": 1}

    real = core._candidate
    core._candidate = candidate
    try:
        ref = _m(D["ref"], idx)
        pts = [core._point(r["t"], 1, 1, scored.get(r["t"]), ref, "classification") for r in rows]
        best = core._walk(None, pts, None, None, "classification", core.PruneConfig(max_drop=BUDGET), (), set(), ref, scored=scored)
    except NotMet:
        return None
    finally:
        core._candidate = real
    return by_t[best["threshold"]], "retrained" if best["history"] else "cut"


def _with_margin(z: float, D: dict, idx: np.ndarray) -> tuple[int, str] | None:
    saved = core.Z_BUDGET
    core.Z_BUDGET = z
    try:
        return walk_now(D, idx)
    finally:
        core.Z_BUDGET = saved


def walk_before(D: dict, idx: np.ndarray, max_tries: int = 6) -> tuple[int, str] | None:
    """The walk this one replaced (dropcli before this change): retrain the most compressive cut that
    fits as it is, then bisect on retrained cuts between the most compressive one known to break the
    budget and the least compressive one known to keep it (at most 6 retrains); a cut as it is wins
    when it is more compressive than the best retrained one."""
    rows, ref = D["rows"], D["ref"]
    n = len(rows)

    def fits(per):
        if per is None:
            return False
        d = 100.0 * (ref[idx] - per[idx])
        return d.mean() + d.std(ddof=1) / math.sqrt(len(d)) <= BUDGET + 1e-9

    def drop(per):
        return math.inf if per is None else 100.0 * (ref[idx].mean() - per[idx].mean())

    fit_pre = [i for i, r in enumerate(rows) if fits(r["cut"])]
    tried = {}

    def attempt(i):
        tried[i] = True
        return fits(rows[i]["retrained"])

    bad, good = -1, n
    first = fit_pre[0] if fit_pre else min(range(n), key=lambda i: (drop(rows[i]["cut"]), i))
    if attempt(first):
        good = first
    else:
        bad = first
        if first < n - 1 and attempt(n - 1):
            good = n - 1
    if good < n:
        while good - bad > 1 and len(tried) < max_tries:
            mid = (bad + good) // 2
            if attempt(mid):
                good = mid
            else:
                bad = mid
    best = (good, "retrained") if good < n else None
    if fit_pre and (best is None or fit_pre[0] < good):
        best = (fit_pre[0], "cut")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="MLP,CNN")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--margins", default=f"{core.Z_BUDGET:g}",
                    help="the budget margins (standard errors) to run dropcli's walk with, e.g. 0,0.5,1 "
                         f"(default: dropcli's, {core.Z_BUDGET:g})")
    ap.add_argument("--cache", default="", help="a folder to keep each model's scored cuts in (reruns skip the training)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from statistics import NormalDist

    tail = NormalDist().cdf
    print(f"walk rules on bootstrap draws of the validation split (tuning models only, {args.draws} draws, "
          f"--max-drop {BUDGET:g}); population = the whole validation split\n")
    print("| model | seed | rule | chosen compression (median) | population drop mean (pt) | P(test drop > 1.5) | refused |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for seed in range(args.seeds):
            cached = Path(args.cache) / f"{name}_{seed}.pkl" if args.cache else None
            if cached is not None and cached.exists():
                D = pickle.loads(cached.read_bytes())
            else:
                D = curve_scores(name, seed)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_bytes(pickle.dumps(D))
            n = len(D["ref"])
            rules = [("before: bisection, margin 1", walk_before)]
            for z in (float(m) for m in args.margins.split(",")):
                rules.append((f"now: fixed sequence, margin {z:g}", (lambda z: lambda D, idx: _with_margin(z, D, idx))(z)))
            for label, rule in rules:
                rng = np.random.default_rng(seed)
                comp, pops, miss, refused = [], [], [], 0
                for _ in range(args.draws):
                    idx = rng.integers(0, n, n)
                    got = rule(D, idx)
                    if got is None:
                        refused += 1
                        continue
                    i, key = got
                    d = 100.0 * (D["ref"] - D["rows"][i][key])
                    se = max(d.std(ddof=1) / math.sqrt(n), 1e-9)
                    comp.append(D["rows"][i]["compression"])
                    pops.append(d.mean())
                    miss.append(1.0 - tail((BUDGET - d.mean()) / se))
                print(f"| {name} | {seed} | {label} | {np.median(comp) if comp else float('nan'):.1f}x | "
                      f"{np.mean(pops) if pops else float('nan'):+.2f} | {np.mean(miss) if miss else float('nan'):.2f} | "
                      f"{refused / args.draws:.2f} |", flush=True)


if __name__ == "__main__":
    main()
