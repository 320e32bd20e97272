"""Rows per second of `dropcli uncertainty` with --engine local and --engine ray (1 and 2
workers), on the same sharded input, measured side by side in one run.

    python benchmarks/ray_scale.py             # 32768 rows, 2 repetitions (a few minutes)
    python benchmarks/ray_scale.py --quick     # 8192 rows, 1 repetition

The job: an MLP 784-512-512-10 with standard dropout p = 0.5 after each hidden ReLU (saved
as .pt2), T = 50 samples, --batch-size 256, inputs in 8 .npz shards (x, y). Each path is a
whole `dropcli` process (python start-up, model load, Ray start-up and shut-down included),
run twice: on all rows and on the first shard's first 256 rows (a separate one-shard input),
so that the table shows both the end-to-end rate and the rate past the fixed cost:

    end-to-end rows/s  = N / t(N)
    steady rows/s      = (N - 256) / (t(N) - t(256))

Repetitions are interleaved (round-robin over the paths) and the median is shown. Every
run's --json report (summary and every example) is hashed: all paths must print the same
bytes, which is the identity check.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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
T = 50
SHARDS = 8
SMALL = 256


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Dropout(0.5), nn.Linear(512, 10))

    def forward(self, x):
        return self.net(x)


def build(d: Path, n: int) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    m = MLP().eval()
    model = d / "mlp.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(m, (torch.randn(2, 784),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        torch.export.save(ep, str(model))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 784)).astype(np.float32)
    y = rng.integers(0, 10, n)
    big = d / "shards"
    big.mkdir()
    cuts = np.linspace(0, n, SHARDS + 1).astype(int)
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        np.savez(big / f"part-{i}.npz", x=x[a:b], y=y[a:b])
    small = d / "small"
    small.mkdir()
    np.savez(small / "part-0.npz", x=x[:SMALL], y=y[:SMALL])
    return model, big, small


def run(model: Path, inp: Path, engine: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "dropcli.cli.main", "--quiet", "uncertainty", str(model), "--input", str(inp),
           "-T", str(T), "--batch-size", "256", "--json", *engine]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return dt, hashlib.sha256(p.stdout).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    n = args.rows or (8192 if args.quick else 32768)
    reps = args.reps or (1 if args.quick else 2)
    paths = {"local": [], "ray, 1 worker": ["--engine", "ray", "--workers", "1"],
             "ray, 2 workers": ["--engine", "ray", "--workers", "2"]}
    with tempfile.TemporaryDirectory() as tmp:
        model, big, small = build(Path(tmp), n)
        times: dict[tuple[str, str], list[float]] = {}
        hashes: dict[tuple[str, str], set[str]] = {}
        for r in range(reps):
            order = list(paths)[r % len(paths):] + list(paths)[:r % len(paths)]
            for name in order:
                for size, inp in (("N", big), ("small", small)):
                    dt, h = run(model, inp, paths[name])
                    times.setdefault((name, size), []).append(dt)
                    hashes.setdefault((name, size), set()).add(h)
                    print(f"  rep {r + 1}: {name:15s} {size:5s} {dt:7.2f} s", file=sys.stderr)
    print(f"\n`dropcli uncertainty`, MLP 784-512-512-10 (dropout 0.5 x2), T = {T}, --batch-size 256, "
          f"{n} rows in {SHARDS} .npz shards, {os.cpu_count()} CPU cores; median of {reps} whole-process run(s)\n")
    print(f"| engine | s for {n} rows | s for {SMALL} rows | end-to-end rows/s | steady rows/s (past start-up) |")
    print("|---|---|---|---|---|")
    for name in paths:
        tn = statistics.median(times[(name, "N")])
        ts = statistics.median(times[(name, "small")])
        steady = (n - SMALL) / (tn - ts) if tn > ts else float("nan")
        print(f"| {name} | {tn:.2f} | {ts:.2f} | {n / tn:,.0f} | {steady:,.0f} |")
    big_h = set().union(*(hashes[(p, "N")] for p in paths))
    small_h = set().union(*(hashes[(p, "small")] for p in paths))
    ok = len(big_h) == 1 and len(small_h) == 1
    print(f"\nidentity: every run's --json report (summary + {n} examples) has sha256 {next(iter(big_h))[:16]}... "
          f"-> {'IDENTICAL across all engines and worker counts' if ok else 'DIFFERENT: ' + str(big_h)}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
