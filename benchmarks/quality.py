"""Predictive quality of dropcli's MC dropout against the deterministic pass and last-layer Laplace.

For each model below and each seed, the benchmark splits scikit-learn's digits three ways
(stratified: 60% train, 20% validation, 20% test, the split drawn from the seed), trains the model
WITH dropout on train, saves it (torch.export, .pt2), and scores on test:

* eval       the deterministic pass (dropout off);
* MC         `dropcli uncertainty` on the trained model (T passes at the trained rates);
* ft MC      `dropcli finetune --variant concrete --val VAL` (ELBO fit on train, rates scaled to the
             best validation MC NLL: --select val; the run is the ft+cal one, so its scale is the one chosen
             with the temperature), then `uncertainty --no-calibration`;
* ft+cal MC  the same finetune with --calibrate (a temperature fitted on VAL by NLL, MAP under a
             prior on log T; scale and temperature chosen together), then
             `uncertainty` (which applies the stored temperature);
* LLLA probit / LLLA MC   laplace-torch's last-layer Laplace, Kronecker-factored Hessian fitted on
             train, prior precision by marginal likelihood, GLM predictive with the probit or the
             MC link (the recommended configuration of Daxberger et al. 2021).

Metrics: NLL, Brier, ECE (15 equal-width bins) on test, and OOD AUROC of the predictive entropy
(test inputs against the same inputs with their pixels permuted by one fixed permutation, and
against uniform noise in [0, 1]). Every number is the mean +- sd over the seeds, and each model's
verdict is followed by ft+cal MC's paired per-seed differences from the eval pass and from LLLA
(probit), with their mean +- its standard error. Nothing is chosen
on test: the rates and the temperature are chosen on validation, LLLA's prior precision on train.

Models (all trained here, Adam, seeded):
* mlp300:  64-300-100-10, dropout 0.3 after each hidden ReLU;
* mlp512:  784-512-512-10, dropout 0.5, on the digits upscaled to 28x28 (bilinear), as in issue 18;
* cnn:     conv(1->16, 3x3)-ReLU-conv(16->32, 3x3)-ReLU-maxpool 2-dropout 0.3-fc(512->64)-ReLU-dropout 0.3-fc(64->10)
           on the 8x8 images.
`--models` picks some; `--holdout` runs two more that none of the defaults were chosen on
(mlp128: 64-128-128-10 p=0.2, and mlp1024: 64-1024-10 p=0.5).

Run:  python benchmarks/quality.py [--seeds 5] [--models mlp300 mlp512 cnn] [--json out.json]
LLLA needs laplace-torch, which is not a dropcli dependency. Install it without letting pip
replace torch (its requirements pull a CUDA torch and torchvision):
    pip install --no-deps laplace-torch asdfghjkl backpack-for-pytorch curvlinops-for-pytorch \\
        torchmetrics lightning-utilities einops opt-einsum unfoldNd einconv linear_operator
Without it the LLLA rows are skipped with a notice. About 30 to 100 s per model and seed on 2 CPU
cores shared with other jobs (840 s for the three default models x 5 seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T = 50  # MC passes on test
FT = {"variant": "concrete", "epochs": 20, "samples": 30}  # finetune's defaults otherwise
METHODS = ("eval", "MC", "ft MC", "ft+cal MC", "LLLA probit", "LLLA MC")
METRICS = ("nll", "brier", "ece", "auroc_perm", "auroc_unif")


# ------------------------------------------------------------------------------------ models


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...], p: float):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers += [nn.ReLU(), nn.Dropout(p)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, p: float = 0.3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(p), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {
    # name: (builder, input view, epochs)
    "mlp300": (lambda: MLP((64, 300, 100, 10), 0.3), "flat", 60),
    "mlp512": (lambda: MLP((784, 512, 512, 10), 0.5), "up28", 40),
    "cnn": (lambda: CNN(0.3), "img", 40),
}
HOLDOUT = {
    "mlp128": (lambda: MLP((64, 128, 128, 10), 0.2), "flat", 60),
    "mlp1024": (lambda: MLP((64, 1024, 10), 0.5), "flat", 40),
}


def view(x: np.ndarray, how: str) -> np.ndarray:
    """Digits [N, 64] in [0, 1] as the model reads them."""
    if how == "flat":
        return x.astype(np.float32)
    img = torch.from_numpy(x.astype(np.float32)).reshape(-1, 1, 8, 8)
    if how == "img":
        return img.numpy()
    return F.interpolate(img, size=(28, 28), mode="bilinear", align_corners=False).reshape(-1, 784).numpy()


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
    return model.eval()


def save_pt2(model: nn.Module, example: np.ndarray, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (torch.from_numpy(example[:2]),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        torch.export.save(ep, str(path))
    return path


# ------------------------------------------------------------------------------------ metrics


def scores(probs: np.ndarray, y: np.ndarray, ent_id: np.ndarray, ent_perm: np.ndarray, ent_unif: np.ndarray) -> dict:
    from dropcli.analysis import stats

    correct = probs.argmax(-1) == y
    ece, _ = stats.ece_mce(probs.max(-1), correct)
    auroc = {}
    for name, ent in (("perm", ent_perm), ("unif", ent_unif)):
        auroc[name] = stats.auroc(np.r_[ent_id, ent], np.r_[np.zeros(len(ent_id), bool), np.ones(len(ent), bool)])
    return {"nll": stats.nll(probs, y), "brier": stats.brier(probs, y), "ece": ece, "acc": float(correct.mean()),
            "auroc_perm": auroc["perm"], "auroc_unif": auroc["unif"]}


def per_example_nll(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    from dropcli.analysis import stats

    return -np.log(np.maximum(probs[np.arange(len(y)), y], stats.EPS))


def ece(probs: np.ndarray, y: np.ndarray) -> float:
    from dropcli.analysis import stats

    return float(stats.ece_mce(probs.max(-1), probs.argmax(-1) == y)[0])


def ece_floor(pe: np.ndarray, draws: int, seed: int) -> tuple[float, float]:
    """Mean and sd of the ECE of the predictive PE when the labels are drawn from PE itself: the
    ECE a perfectly calibrated predictor with these probabilities shows on this many examples."""
    from dropcli.analysis import stats

    rng = np.random.default_rng(seed)
    conf, pred = pe.max(-1), pe.argmax(-1)
    cum = pe.cumsum(-1)
    vals = []
    for _ in range(draws):
        u = rng.uniform(size=(len(pe), 1))
        lab = np.minimum((u > cum).sum(-1), pe.shape[1] - 1)
        vals.append(stats.ece_mce(conf, pred == lab)[0])
    return float(np.mean(vals)), float(np.std(vals))


def entropy(p: np.ndarray) -> np.ndarray:
    from dropcli.analysis import stats

    return stats.entropy(p)


def mc_method(model_path: Path, xs: dict, y: np.ndarray, seed: int, calibration: bool) -> dict:
    """`dropcli uncertainty` on test, and on the two OOD sets in one call of their own (the
    OOD inputs draw their own noise stream, as `--ood` does)."""
    import dropcli
    from dropcli.engines.keyed import stream_seed

    r = dropcli.uncertainty(str(model_path), xs["test"], T=T, seed=seed, calibration=calibration)
    ood = dropcli.uncertainty(str(model_path), np.concatenate([xs["perm"], xs["unif"]]), T=T,
                              seed=stream_seed(seed, 1), calibration=calibration)
    n = len(xs["perm"])
    return scores(r.per["mean"], y, r.per["entropy"], ood.per["entropy"][:n], ood.per["entropy"][n:])


def laplace_methods(model: nn.Module, x_tr: np.ndarray, y_tr: np.ndarray, xs: dict, y: np.ndarray, seed: int) -> dict:
    from laplace import Laplace

    torch.manual_seed(seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
                                         batch_size=128)
    la = Laplace(model.eval(), "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(loader)
    la.optimize_prior_precision(pred_type="glm", method="marglik")
    out = {}
    for link in ("probit", "mc"):
        g = torch.Generator().manual_seed(seed)

        def pred(x):
            kw = {"n_samples": 100, "generator": g} if link == "mc" else {}
            with torch.no_grad():
                return la(torch.from_numpy(x), pred_type="glm", link_approx=link, **kw).double().numpy()

        p = pred(xs["test"])
        out[f"LLLA {link if link == 'probit' else 'MC'}"] = scores(p, y, entropy(p), entropy(pred(xs["perm"])), entropy(pred(xs["unif"])))
    return out


# ------------------------------------------------------------------------------------ driver


def prepare(name: str, spec, seed: int, work: Path) -> dict:
    """The seed's split (as the model reads it), the model trained on train and saved to WORK, and
    train.npz / val.npz written there for `dropcli finetune`. Also used by quality_family.py."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    build, how, epochs = spec
    d = load_digits()
    x, y = d.data / 16.0, d.target.astype(np.int64)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed)
    rng = np.random.default_rng(1000 + seed)
    perm = rng.permutation(64)
    xs = {"test": view(x_te, how), "perm": view(x_te[:, perm], how), "unif": view(rng.uniform(size=x_te.shape), how)}
    xtr, xva = view(x_tr, how), view(x_va, how)
    torch.manual_seed(seed)
    model = train(build(), xtr, y_tr, epochs, seed)
    src = save_pt2(model, xtr, work / f"{name}_{seed}.pt2")
    np.savez(work / "train.npz", x=xtr, y=y_tr)
    np.savez(work / "val.npz", x=xva, y=y_va)
    return {"model": model, "src": src, "xs": xs, "xtr": xtr, "y_tr": y_tr, "xva": xva, "y_va": y_va, "y_te": y_te}


def run_one(name: str, spec, seed: int, work: Path, have_laplace: bool) -> dict:
    import dropcli

    d = prepare(name, spec, seed, work)
    model, src, xs, xtr, y_tr, y_te = d["model"], d["src"], d["xs"], d["xtr"], d["y_tr"], d["y_te"]
    res = {}
    with torch.no_grad():
        pe = F.softmax(model(torch.from_numpy(xs["test"])), -1).double().numpy()
        res["eval"] = scores(pe, y_te, entropy(pe), *(entropy(F.softmax(model(torch.from_numpy(xs[k])), -1).double().numpy())
                                                   for k in ("perm", "unif")))
    res["MC"] = mc_method(src, xs, y_te, seed, True)
    out = work / f"{name}_{seed}_ft.pt2"
    rep = dropcli.finetune(str(src), str(work / "train.npz"), str(out), val=str(work / "val.npz"), seed=seed,
                           calibrate=True, force=True, **FT)
    res["ft MC"] = mc_method(out, xs, y_te, seed, False)
    res["ft+cal MC"] = mc_method(out, xs, y_te, seed, True)
    res["_ft"] = {"temperature": rep["summary"]["temperature"], "scale": rep["summary"].get("chosen_scale"),
                  "p": [round(r["learned_p"], 4) for r in rep["sites"]], "notes": rep["summary"]["notes"]}
    if have_laplace:
        res.update(laplace_methods(model, xtr, y_tr, xs, y_te, seed))
    return res


def fmt(vals: list[float]) -> str:
    if not vals:
        return "n/a"
    m = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f}"


def paired(runs: list[dict], methods: list[str]) -> str:
    """ft+cal MC minus each comparator, seed by seed (the same split, model and test set), with the
    mean and its standard error: the seeds' spread in the table is mostly the split's, which a
    paired difference removes."""
    lines = []
    for other in [m for m in ("eval", "LLLA probit") if m in methods]:
        for k in ("nll", "ece"):
            d = [r["ft+cal MC"][k] - r[other][k] for r in runs]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            lines.append(f"ft+cal MC - {other}, {k.upper()} per seed: " + " ".join(f"{v:+.4f}" for v in d)
                         + f"; mean {statistics.fmean(d):+.4f} ± {se:.4f} (se), {sum(v < 0 for v in d)}/{len(d)} below 0")
    return "\n".join(lines)


def over_seeds(names: list[str], seeds: int, run, log) -> dict[str, list[dict]]:
    """{name: [run(name, spec, seed, work) for seed in range(seeds)]}, the models of MODELS and
    HOLDOUT trained in one temporary folder; ``log(name, seed, seconds, allres)`` after each run
    (this file's, quality_family.py's)."""
    specs = {**MODELS, **HOLDOUT}
    allres: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            allres[name] = []
            for seed in range(seeds):
                t1 = time.perf_counter()
                allres[name].append(run(name, specs[name], seed, Path(tmp)))
                log(name, seed, time.perf_counter() - t1, allres)
    return allres


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds (split, training, finetune, MC): rows are mean ± sd over them")
    ap.add_argument("--models", nargs="*", default=list(MODELS), help=f"of {list(MODELS) + list(HOLDOUT)}")
    ap.add_argument("--holdout", action="store_true", help="run the held-out models (not used to choose any default)")
    ap.add_argument("--json", help="also write every per-seed number here")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's pytree notices
    warnings.filterwarnings("ignore", message=".*link_approx.*")  # laplace-torch: marglik does not use the link
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        import laplace  # noqa: F401

        have_laplace = True
    except Exception as e:  # noqa: BLE001
        have_laplace = False
        print(f"notice: laplace-torch is not importable ({type(e).__name__}: {e}); the LLLA rows are skipped. "
              "Install it as this file's docstring says.", file=sys.stderr)
    names = list(HOLDOUT) if a.holdout else a.models
    t0 = time.perf_counter()

    def log(name, seed, secs, allres):
        ft = allres[name][-1]["_ft"]
        print(f"# {name} seed {seed}: {secs:.0f}s; finetune chose scale x{ft['scale']}, "
              f"p {ft['p']}, temperature {'none' if ft['temperature'] is None else format(ft['temperature'], '.3f')}"
              + (f"; notes: {ft['notes']}" if ft["notes"] else ""), file=sys.stderr)

    allres = over_seeds(names, a.seeds, lambda n, spec, seed, work: run_one(n, spec, seed, work, have_laplace), log)
    print(f"\n## Test-set quality, mean ± sd over {a.seeds} seed(s) (digits; train/val/test 60/20/20; "
          f"MC T={T}); {time.perf_counter() - t0:.0f}s in all\n")
    for name in names:
        print(f"### {name}\n")
        print("| method | accuracy | NLL | Brier | ECE | OOD AUROC (permuted) | OOD AUROC (uniform) |")
        print("|---|---|---|---|---|---|---|")
        for m in METHODS:
            rows = [r[m] for r in allres[name] if m in r]
            if not rows:
                continue
            print(f"| {m} | " + " | ".join(fmt([r[k] for r in rows]) for k in ("acc",) + METRICS) + " |")
        best = [m for m in METHODS if all(m in r for r in allres[name])]
        verdict = []
        for k in ("nll", "ece"):
            others = [m for m in ("eval", "LLLA probit", "LLLA MC") if m in best]
            ours = statistics.fmean(r["ft+cal MC"][k] for r in allres[name])
            beaten = [m for m in others if ours < statistics.fmean(r[m][k] for r in allres[name])]
            verdict.append(f"{k.upper()}: ft+cal MC beats {len(beaten)}/{len(others)} ({', '.join(beaten) or 'none'})")
        for k in ("auroc_perm", "auroc_unif"):
            if "LLLA probit" in best:
                ours = statistics.fmean(r["ft+cal MC"][k] for r in allres[name])
                la = statistics.fmean(r["LLLA probit"][k] for r in allres[name])
                verdict.append(f"{k}: ft+cal MC {ours:.4f} vs LLLA {la:.4f} ({ours - la:+.4f})")
        print("\n" + "; ".join(verdict) + "\n")
        print(paired(allres[name], best) + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(allres, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
