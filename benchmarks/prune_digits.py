"""Benchmark for `dropcli prune` with its DEFAULT settings, on scikit-learn's digits.

Setup (issue 4): digits with an 80/20 stratified split; a 64-300-100-10 MLP and a small CNN with
BatchNorm, each trained dense here (seeded), saved as TorchScript, then pruned by the command
exactly as a user would run it:

    dropcli prune dense.pt --data train.npz --val test.npz -o pruned.pt --json

Targets: MLP >= 50x fewer nonzero weights with <= 1 point accuracy drop (and under a minute of
CPU); CNN >= 20x with <= 1.5 points; the shrunk model's CPU latency below the dense one's. The
published anchors (Molchanov et al. 2017, MNIST) are 68x for LeNet-300-100 and 280x for LeNet-5.

Latency is measured side by side in this process: the dense and the pruned TorchScript files are
loaded and timed in turn (median of many calls), at batch 1 and batch 256, with one intra-op
thread (and the prune command runs with OMP_NUM_THREADS=1), so that other load on a shared
machine does not turn the medians into scheduler time slices. The script also times
what `--sparse-format` would give: the pruned MLP's remaining weights as torch CSR tensors
(torch.sparse.mm) against the same weights dense, to decide whether that option is worth having.

Run:  python benchmarks/prune_digits.py   (needs scikit-learn; about 1-3 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SEED = 0
ANCHORS = {"MLP": ("LeNet-300-100 on MNIST", 68.0), "CNN": ("LeNet-5 on MNIST", 280.0)}
TARGETS = {"MLP": (50.0, 1.0), "CNN": (20.0, 1.5)}


def data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train_dense(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 40) -> nn.Module:
    torch.manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def median_ms(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            for _ in range(5):
                f(x)
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def sparse_vs_dense(ts: torch.jit.ScriptModule, x: torch.Tensor) -> dict[str, float]:
    """The pruned MLP's layers as CSR (what --sparse-format would store) against dense, same weights."""
    sd = {k: v for k, v in ts.state_dict().items()}
    ws = [sd[k] for k in sorted(sd) if k.endswith("weight")]
    bs = [sd[k.replace("weight", "bias")] for k in sorted(sd) if k.endswith("weight")]
    csr = [w.to_sparse_csr() for w in ws]

    def dense_fn(h):
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = nn.functional.linear(h, w, b)
            if i < len(ws) - 1:
                h = torch.relu(h)
        return h

    def sparse_fn(h):
        for i, (w, b) in enumerate(zip(csr, bs)):
            h = torch.sparse.mm(w, h.T).T + b
            if i < len(csr) - 1:
                h = torch.relu(h)
        return h

    assert torch.allclose(dense_fn(x), sparse_fn(x), atol=1e-5)
    return median_ms({"dense": dense_fn, "csr": sparse_fn}, x, 200)


def main() -> None:
    warnings.simplefilter("ignore")
    # one intra-op thread everywhere: on a shared 2-core machine a second thread mostly spin-waits,
    # and the latency medians then measure the scheduler's time slices instead of the models
    torch.set_num_threads(1)
    x_tr, x_te, y_tr, y_te = data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, make, shape in (("MLP", mlp, (-1, 64)), ("CNN", cnn, (-1, 1, 8, 8))):
            xt, yt = torch.from_numpy(x_tr).reshape(shape), torch.from_numpy(y_tr)
            xe, ye = torch.from_numpy(x_te).reshape(shape), torch.from_numpy(y_te)
            t0 = time.perf_counter()
            torch.manual_seed(SEED)
            model = train_dense(make(), xt, yt)
            print(f"{name}: dense training {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            dense_path = tmp / f"{name}.pt"
            with torch.no_grad():
                torch.jit.save(torch.jit.trace(model, (xt[:2],)), str(dense_path))
            np.savez(tmp / f"{name}_train.npz", x=xt.numpy(), y=yt.numpy())
            np.savez(tmp / f"{name}_test.npz", x=xe.numpy(), y=ye.numpy())
            out = tmp / f"{name}_pruned.pt"
            cmd = [sys.executable, "-m", "dropcli.cli.main", "-q", "prune", str(dense_path), "--data", str(tmp / f"{name}_train.npz"),
                   "--val", str(tmp / f"{name}_test.npz"), "-o", str(out), "--json",
                   "--input-shape", "x".join(str(d) for d in (2,) + tuple(xt.shape[1:]))]
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
            t0 = time.perf_counter()
            ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            print(f"{name}: dropcli prune {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"dropcli prune failed for {name}: {proc.stderr.strip()[-500:]}")
            rep = json.loads(proc.stdout)
            s = rep["summary"]
            dense_ts, pruned_ts = torch.jit.load(str(dense_path)), torch.jit.load(str(out))
            lat1 = median_ms({"dense": dense_ts, "pruned": pruned_ts}, xe[:1], 300)
            lat256 = median_ms({"dense": dense_ts, "pruned": pruned_ts}, xe[:256], 100)
            with torch.no_grad():
                acc_dense = float((dense_ts(xe).argmax(1) == ye).float().mean())
                acc_pruned = float((pruned_ts(xe).argmax(1) == ye).float().mean())
            row = {"model": name, "acc_dense": acc_dense, "acc_pruned": acc_pruned, "drop_pts": 100 * (acc_dense - acc_pruned),
                   "w_before": s["weights_before"], "w_after": s["weights_after"], "compression": s["compression"],
                   "params_before": s["params_before"], "params_after": s["params_after"],
                   "shapes": [f"{r['layer']} {'x'.join(map(str, r['shape_before']))}->{'x'.join(map(str, r['shape_after']))}" for r in rep["layers"]],
                   "lat1": lat1, "lat256": lat256, "wall": wall, "cpu": cpu, "layers": rep["layers"],
                   "size": (s["size_before"], s["size_after"])}
            if name == "MLP":
                row["sparse"] = {b: sparse_vs_dense(pruned_ts, xe[:b]) for b in (1, 256)}
            rows.append(row)

    print(f"torch {torch.__version__}; 1 intra-op thread (latency here, and `dropcli prune` with OMP_NUM_THREADS=1); "
          f"prune defaults (sparse-vd); "
          f"digits {len(x_tr)} train / {len(x_te)} test\n")
    hdr = ("model", "dense acc", "pruned acc", "drop (pt)", "nonzero W before", "after", "compression", "target",
           "anchor (MNIST)", "lat b=1 dense/pruned (ms)", "lat b=256 dense/pruned (ms)", "prune wall / CPU (s)")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    ok_all = True
    for r in rows:
        tgt_c, tgt_d = TARGETS[r["model"]]
        anchor_name, anchor = ANCHORS[r["model"]]
        met = r["compression"] >= tgt_c and r["drop_pts"] <= tgt_d and r["lat1"]["pruned"] < r["lat1"]["dense"] \
            and r["lat256"]["pruned"] < r["lat256"]["dense"]
        ok_all &= met
        print(f"| {r['model']} | {100 * r['acc_dense']:.2f}% | {100 * r['acc_pruned']:.2f}% | {r['drop_pts']:.2f} | {r['w_before']} | "
              f"{r['w_after']} | {r['compression']:.1f}x | >={tgt_c:.0f}x, <={tgt_d} pt: {'met' if met else 'MISSED'} | "
              f"{anchor:.0f}x ({anchor_name}); dropcli at {r['compression'] / anchor:.2f} of it | "
              f"{r['lat1']['dense']:.3f} / {r['lat1']['pruned']:.3f} | {r['lat256']['dense']:.3f} / {r['lat256']['pruned']:.3f} | {r['wall']:.1f} / {r['cpu']:.1f} |")
    print()
    for r in rows:
        print(f"{r['model']}: " + "; ".join(r["shapes"]) + f"; all params {r['params_before']} -> {r['params_after']}; "
              f"file {r['size'][0]} -> {r['size'][1]} bytes")
        for L in r["layers"]:
            print(f"    {L['layer']:>4} {L['type']:<7} kept {L['weights_kept']:>6}/{L['weights_before']:<6} "
                  f"sparsity {100 * L['sparsity']:.1f}%  units removed {L['units_removed']}/{L['units_before']}")
    mlp_row = rows[0]
    print("\n--sparse-format check (pruned MLP, same weights, torch CSR vs dense, median ms):")
    for b, t in mlp_row["sparse"].items():
        print(f"    batch {b:>3}: dense {t['dense']:.4f}  csr {t['csr']:.4f}  -> CSR is {t['dense'] / t['csr']:.2f}x the speed of dense")
    print(f"\nall targets met: {ok_all}")


if __name__ == "__main__":
    main()
