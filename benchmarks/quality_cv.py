"""How finetune's scale and temperature rules score on data they were not chosen on, using
validation data only (docs/learned.md, "How these rules were chosen").

`collect` does what benchmarks/quality.py does up to the finetune, for its default models and
seeds, but never builds the test split's inputs: it trains the model, runs `dropcli finetune
--variant concrete --val VAL --calibrate` with 100 passes and keeps, for every scale of the rate
scan, the passes' logits on the validation set (the first 30 of them are the passes a default
30-sample finetune sees), and the deterministic pass's logits.

`score` halves each validation set at random (5 times, both ways): a rule chooses a scale and a
temperature on one half from the first 30 passes and is scored on the other half with 50 other
passes (as `dropcli uncertainty` draws fresh noise), NLL and ECE minus the deterministic pass's on
that half. It prints the mean ± one standard error over all halvings, and the NLL per model.

Run:  python benchmarks/quality_cv.py collect DIR [--seeds 5] [--models mlp300 mlp512 cnn]
      python benchmarks/quality_cv.py score DIR
About 30 to 140 s per model and seed to collect; scoring the 15 files took 18 min on 2 cores
shared with about five other jobs. Its table is the one in docs/learned.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

PASSES = 100  # collected per scale; rules fit on FIT, are scored on SCORE
FIT, SCORE = slice(0, 30), slice(50, 100)
HALVINGS = 5


def collect(out: Path, models: list[str], seeds: int) -> None:
    import time

    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import dropcli
    import quality as Q
    from dropcli.training import learned

    out.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x, y = d.data / 16.0, d.target.astype(np.int64)
    for name in models:
        build, how, epochs = {**Q.MODELS, **Q.HOLDOUT}[name]
        for seed in range(seeds):
            t0 = time.perf_counter()
            # the benchmark's split; the test half of x_rest is dropped unread
            x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
            x_va, _, y_va, _ = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed)
            xtr, xva = Q.view(x_tr, how), Q.view(x_va, how)
            torch.manual_seed(seed)
            model = Q.train(build(), xtr, y_tr, epochs, seed)
            with tempfile.TemporaryDirectory() as tmp:
                work = Path(tmp)
                src = Q.save_pt2(model, xtr, work / "m.pt2")
                np.savez(work / "train.npz", x=xtr, y=y_tr)
                np.savez(work / "val.npz", x=xva, y=y_va)
                with torch.no_grad():
                    ev = model(torch.from_numpy(xva)).double().numpy()
                got = []
                orig = learned.mc_samples

                def capture(*a, **k):
                    o = orig(*a, **k)
                    got.append(o)
                    return o

                learned.mc_samples = capture  # finetune calls it once before the scan, then once per scale
                try:
                    dropcli.finetune(str(src), str(work / "train.npz"), str(work / "o.pt2"), val=str(work / "val.npz"),
                                     seed=seed, calibrate=True, force=True, **{**Q.FT, "samples": PASSES})
                finally:
                    learned.mc_samples = orig
            scan = np.stack(got[1:1 + len(learned.SCALES)]).astype(np.float32)  # [scales, passes, N, K]
            np.savez(out / f"{name}_{seed}.npz", scan=scan, eval=ev, y=y_va, scales=np.array(learned.SCALES))
            print(f"{name} seed {seed}: {time.perf_counter() - t0:.0f}s", flush=True)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def nlls(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))


def fits(scan: np.ndarray, ya: np.ndarray, A: np.ndarray, sd: float, fitp: slice, family: str) -> list:
    """(objective, T, per-example NLL) per scale on half A, None where the scale is not eligible."""
    from dropcli.training import learned

    degs = [learned.degenerate_count(scan[s][fitp][:, A]) for s in range(len(scan))]
    rows = []
    for s in range(len(scan)):
        if degs[s] > min(degs):
            rows.append(None)
            continue
        o = scan[s][fitp][:, A]
        if family == "pass":  # mean_t softmax(z_t / T), as dropcli applies a stored temperature
            T, _, obj = learned.fit_temperature(o, ya, prior_sd=sd)
            per = nlls(softmax(o / T).mean(0), ya)
        else:  # softmax(log mean_t softmax(z_t) / T)
            lp = np.log(np.maximum(softmax(o).mean(0), 1e-300))
            T, _, obj = learned.fit_temperature(lp[None], ya, prior_sd=sd)
            per = nlls(softmax(lp / T), ya)
        rows.append((obj, T, per))
    return rows


def lowest(rows: list) -> int:
    return min((r[0], i) for i, r in enumerate(rows) if r is not None)[1]


def smallest_tied(rows: list) -> int:
    """The smallest scale whose objective is within one paired standard error of the lowest."""
    b = lowest(rows)
    for i, r in enumerate(rows):
        if r is not None:
            d = r[2] - rows[b][2]
            if r[0] - rows[b][0] <= d.std(ddof=1) / math.sqrt(len(d)):
                return i
    return b


def predict(scan_s: np.ndarray, B: np.ndarray, T: float, family: str) -> np.ndarray:
    o = scan_s[SCORE][:, B]
    if family == "pass":
        return softmax(o / T).mean(0)
    return softmax(np.log(np.maximum(softmax(o).mean(0), 1e-300)) / T)


def score(src: Path) -> None:
    from dropcli.analysis import stats
    from dropcli.training import learned

    def ece(p, y):
        return stats.ece_mce(p.max(-1), p.argmax(-1) == y)[0]

    res: dict[str, list] = {}
    files = sorted(src.glob("*.npz"))
    if not files:
        raise SystemExit(f"no collected .npz files in {src}: run `collect {src}` first")
    for f in files:
        d = np.load(f)
        scan, ev, y = d["scan"].astype(np.float64), d["eval"], d["y"]
        model = f.stem.rsplit("_", 1)[0]
        rng = np.random.default_rng(0)
        for _ in range(HALVINGS):
            perm = rng.permutation(len(y))
            halves = (perm[: len(y) // 2], perm[len(y) // 2:])
            for A, B in (halves, halves[::-1]):
                ya, yb = y[A], y[B]
                base = softmax(ev[B])
                bn, be = nlls(base, yb).mean(), ece(base, yb)
                out = {}
                cache = {}
                for label, sd, fitp, fam, pick in (
                        ("lowest score; MAP T sd 0.3 (in use)", 0.3, FIT, "pass", lowest),
                        ("the same, fitted on 50 passes", 0.3, slice(0, 50), "pass", lowest),
                        ("the same, T on the MC mean", 0.3, FIT, "mean", lowest),
                        ("lowest score; MAP T sd 0.6", 0.6, FIT, "pass", lowest),
                        ("lowest score; MAP T sd 0.15", 0.15, FIT, "pass", lowest),
                        ("lowest score; MAP T sd 0.1", 0.1, FIT, "pass", lowest),
                        ("lowest score; MAP T sd 0.05", 0.05, FIT, "pass", lowest),
                        ("smallest tied scale; MAP T sd 0.3", 0.3, FIT, "pass", smallest_tied),
                        ("smallest tied scale; MAP T sd 0.15", 0.15, FIT, "pass", smallest_tied)):
                    key = (sd, fitp.stop, fam)
                    if key not in cache:
                        cache[key] = fits(scan, ya, A, sd, fitp, fam)
                    rows = cache[key]
                    i = pick(rows)
                    out[label] = predict(scan[i], B, rows[i][1], fam)
                    res.setdefault("scale: " + label, []).append(float(d["scales"][i]))
                plain = [nlls(softmax(scan[s][FIT][:, A]).mean(0), ya).mean() for s in range(len(scan))]
                out["lowest plain NLL, no T (ft MC)"] = predict(scan[int(np.argmin(plain))], B, 1.0, "pass")
                for s in (0, 4, 8):
                    out[f"x{d['scales'][s]:g} always, no T"] = predict(scan[s], B, 1.0, "pass")
                out["eval pass with MAP T sd 0.3"] = softmax(ev[B] / learned.fit_temperature(ev[A][None], ya)[0])
                for k, p in out.items():
                    res.setdefault(k, []).append((model, nlls(p, yb).mean() - bn, ece(p, yb) - be))
        print(f"scored {f.name}", file=sys.stderr, flush=True)
    print("| rule | NLL minus eval pass | ECE minus eval pass | NLL per model |\n|---|---|---|---|")
    for k, v in res.items():
        if k.startswith("scale: "):
            continue
        a = np.array([[x[1], x[2]] for x in v])
        se = a.std(0, ddof=1) / math.sqrt(len(a))
        models = sorted(set(x[0] for x in v))
        per = " / ".join(f"{m} {np.mean([x[1] for x in v if x[0] == m]):+.4f}" for m in models)
        print(f"| {k} | {a[:, 0].mean():+.4f} ± {se[0]:.4f} | {a[:, 1].mean():+.4f} ± {se[1]:.4f} | {per} |")
    print()
    for k, v in res.items():
        if k.startswith("scale: "):
            u, c = np.unique(v, return_counts=True)
            print(k[7:], "chose:", ", ".join(f"x{a:g} {n}" for a, n in zip(u, c)), f"(of {len(v)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("collect", "score"))
    ap.add_argument("dir", help="where collect writes, and score reads, one .npz per model and seed")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--models", nargs="*", default=["mlp300", "mlp512", "cnn"])
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if a.step == "collect":
        collect(Path(a.dir), a.models, a.seeds)
    else:
        score(Path(a.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
