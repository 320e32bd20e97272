"""How `dropcli prune --max-drop` walks the trade-off curve, against a fixed-sequence walk that
was tried and not kept, compared by resampling validation (docs/prune.md).

Only the TUNING models of benchmarks/prune_digits.py (the 64-300-100-10 MLP and the BatchNorm
CNN) and their VALIDATION split are used; the test split is never loaded. For each model and seed
the script trains the dense model and runs prune's sparse-VD fine-tune once (in process, the
defaults), then scores every cut of the trained log alphas on validation, as it is and retrained,
keeping each example's correct/wrong.

It then treats the validation split as the population and draws bootstrap validation sets from it
(360 examples with replacement). On each draw it runs a walk rule on the draw and looks up what the
chosen model loses on the whole split: the population drop. A rule that picks its cut where the
draw's noise was kind shows a population drop above the draw's. The rules:

- "dropcli": `dropcli.prune.core._walk` itself, fed the precomputed scores: the most compressive
  cut within the budget (drop + 1 se), found by bisecting on retrained cuts;
- "fixed sequence": from the least compressive cut, stop at the first cut (as it is) that
  validation resolves as worse than the least compressive one (extra drop - 1 paired se > 0);
  keep the cut before, as it is or retrained, whichever is within the budget (drop + MARGIN se)
  and loses less, stepping back by bisection when neither is; the least compressive cut must be
  within the budget, or the round is refused.

The last figure is the chance that a test split of the same size sees a drop above 1.5 points:
the normal tail of the chosen model's population drop with its own paired standard error,
averaged over the draws. "refused" counts draws where the first training round finds nothing
(prune would then train a second round at half the KL weight; not simulated).

Run:  python benchmarks/prune_walk_rules.py [--models MLP,CNN] [--seeds 3] [--draws 200] [--margins 0.5] [--cache DIR]
(about 1-2 minutes per model and seed on one core; with --cache, reruns skip the training)
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


def walk_dropcli(D: dict, idx: np.ndarray) -> tuple[int, str] | None:
    """dropcli's walk (core._walk), on the draw ``idx``; returns (row, "cut" | "retrained") or None."""
    rows = D["rows"]
    by_t = {r["t"]: i for i, r in enumerate(rows)}

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
        pts = [core._point(r["t"], 1, 1, _m(r["cut"], idx), ref, "classification") for r in rows]
        best = core._walk(None, pts, None, None, "classification", core.PruneConfig(max_drop=BUDGET), (), set(), ref)
    except NotMet:
        return None
    finally:
        core._candidate = real
    return by_t[best["threshold"]], "retrained" if best["history"] else "cut"


def walk_fixed_sequence(D: dict, idx: np.ndarray, margin: float) -> tuple[int, str] | None:
    """The fixed-sequence walk that was tried (see the module docstring)."""
    rows, ref = D["rows"], D["ref"][idx]

    def drop(a, b):  # paired drop of b against a, in points, and its standard error
        d = 100.0 * (a - b)
        return d.mean(), d.std(ddof=1) / math.sqrt(len(d))

    def within(per):
        if per is None:
            return False
        m, se = drop(ref, per[idx])
        return m + margin * se <= BUDGET + 1e-9

    def pick(i):
        ok = [(drop(ref, rows[i][k][idx])[0], n, k) for n, k in enumerate(("cut", "retrained")) if within(rows[i][k])]
        return (i, min(ok)[2]) if ok else None

    order = list(range(len(rows) - 1, -1, -1))  # the least compressive cut first
    first = order[0]
    base = rows[first]["cut"]
    if base is None or pick(first) is None:
        return None
    seq = [first]
    for i in order[1:]:
        per = rows[i]["cut"]
        if per is None:
            break
        m, se = drop(base[idx], per[idx])
        if m - se > 1e-9:
            break
        seq.append(i)
    best, lo, hi = None, 0, len(seq) - 1
    while hi > lo:
        mid = hi if best is None and hi == len(seq) - 1 else (lo + hi + 1) // 2
        got = pick(seq[mid])
        if got is not None:
            best, lo = got, mid
            if mid == len(seq) - 1:
                break
        else:
            hi = mid - 1
    return best or pick(first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="MLP,CNN")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--margins", default="0.5", help="the budget margins (standard errors) of the fixed-sequence walk, e.g. 0,0.5,1")
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
            rules = [(f"dropcli (bisection), margin {core.Z_BUDGET:g}", walk_dropcli)]
            for z in (float(m) for m in args.margins.split(",")):
                rules.append((f"fixed sequence, margin {z:g}", (lambda z: lambda D, idx: walk_fixed_sequence(D, idx, z))(z)))
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
