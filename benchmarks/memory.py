"""Peak memory of `dropcli uncertainty` against --max-memory (issue 17, part 2).

The claim: peak RSS <= (baseline + budget) * 1.1, where the baseline is the peak of the same
command on 256 rows (the process with its imports and the model loaded, almost no work), and
the budget is --max-memory. Per-example results are streamed to the output file as computed,
so memory does not grow with N beyond the few numbers per row the summary keeps.

Each case runs `dropcli uncertainty` as a whole process (a tiny 4-16-3 MLP with dropout, labels,
--format jsonl/csv/parquet to a file) and reads the child's peak RSS from getrusage. Prints a table.

    python benchmarks/memory.py                 # 1,000,000 rows, T = 20, --max-memory 256M
    python benchmarks/memory.py --rows 200000 --samples 100 --budget 64M
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build(d: Path, rows: list[int]) -> Path:
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)).eval()
    ep = torch.export.export(model, (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = d / "mlp.pt2"
    torch.export.save(ep, str(path))
    rng = np.random.default_rng(0)
    for n in rows:
        np.savez(d / f"x{n}.npz", x=rng.standard_normal((n, 4)).astype(np.float32), y=rng.integers(0, 3, n))
    return path


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of ``cmd`` run in a fresh wrapper process."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, r.returncode)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, check=True).stdout
    kb, secs, rc = out.split()
    if rc != "0":
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}")
    return int(kb) * 1024, float(secs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--samples", "-T", type=int, default=20)
    ap.add_argument("--budget", default="256M")
    ap.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "parquet"])
    args = ap.parse_args()
    from dropcli.engines.runner import parse_size

    budget = parse_size(args.budget)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = build(d, [256] + args.rows)

        def run(n: int) -> tuple[int, float]:
            out = d / f"out{n}.{args.format}"
            cmd = [sys.executable, "-m", "dropcli.cli.main", "--quiet", "uncertainty", str(model), "--input",
                   str(d / f"x{n}.npz"), "-T", str(args.samples), "--max-memory", args.budget, "-o", str(out)]
            res = peak_rss(cmd)
            if args.format == "parquet":
                import pyarrow.parquet as pq

                lines = pq.ParquetFile(out).metadata.num_rows
            else:
                lines = sum(1 for _ in open(out)) - (args.format == "csv")
            assert lines == n, (lines, n)
            out.unlink()
            return res

        base, _ = run(256)
        limit = (base + budget) * 1.1
        print(f"dropcli uncertainty, 4-16-3 MLP, T={args.samples}, --max-memory {args.budget}, --format {args.format}; "
              f"baseline (256 rows) {base / 2**20:.0f} MiB; limit (baseline + budget) x 1.1 = {limit / 2**20:.0f} MiB")
        print(f"{'rows':>10} | {'peak RSS (MiB)':>14} | {'over baseline':>13} | {'peak / limit':>12} | {'seconds':>8} | holds")
        print("-" * 78)
        for n in args.rows:
            peak, secs = run(n)
            print(f"{n:>10,} | {peak / 2**20:>14.0f} | {(peak - base) / 2**20:>13.0f} | {peak / limit:>12.2f} | "
                  f"{secs:>8.1f} | {'yes' if peak <= limit else 'NO'}")


if __name__ == "__main__":
    main()
