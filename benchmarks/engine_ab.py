"""Two dropcli checkouts side by side on benchmarks/peers.py's job: is a change to the engine faster?

    python benchmarks/engine_ab.py --old /path/to/other/checkout            # 5 interleaved rounds
    python benchmarks/engine_ab.py --old ../main --model ts pt2 --reps 7

The job is peers.py's (MLP 784-512-512-10, Dropout(0.5) after each hidden ReLU, T = 50, batch 256,
2 threads, ``dropcli uncertainty ... --output out.npz`` as a whole process, 10,240 rows and 256
rows; the marginal time is the difference). Each round runs, for every model format asked, the
old checkout and this one (PYTHONPATH) on both sizes, the order of the two checkouts alternating
from round to round, so that machine noise hits both alike. The table shows, per checkout, the
median large run, the median small run, the median marginal (large minus small of the same round)
and its time per chunk of 256 rows (40 chunks), and the median over rounds of the paired ratio
old marginal / new marginal. On a shared machine only the paired ratio means something.

The outputs of the two checkouts are compared too: the per-example statistics must be equal bit
for bit (a speed change must not change results), and the script says which arrays differ if not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402


def run(repo: Path, model: Path, x: Path, out: Path, threads: int) -> tuple[float, float]:
    import resource

    env = dict(os.environ)
    env["PYTHONPATH"] = str(repo)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    argv = [sys.executable, "-m", "dropcli.cli.main", "--quiet", "uncertainty", str(model), "--input", str(x),
            "-T", str(peers.T), "--batch-size", str(peers.BATCH), "--seed", "0", "--output", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}) with {repo}: {' '.join(argv)}\n{r.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def differing(a: Path, b: Path) -> list[str]:
    import numpy as np

    with np.load(a) as za, np.load(b) as zb:
        names = [k for k in za.files if k != "summary_json"]
        return [k for k in names if k not in zb.files or not np.array_equal(za[k], zb[k], equal_nan=True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the other dropcli checkout (its root folder)")
    ap.add_argument("--model", nargs="+", default=["ts"], choices=["ts", "pt2", "onnx"])
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (medians)")
    ap.add_argument("--rows", type=int, default=peers.ROWS)
    ap.add_argument("--workdir", default=None, help="keep the job's models and inputs here (made once)")
    ap.add_argument("--threads", type=int, default=peers.THREADS,
                    help="threads per process (the job's: 2); with 1, the CPU seconds hardly depend on other load")
    args = ap.parse_args()
    old, new = Path(args.old).resolve(), REPO
    d = Path(args.workdir or tempfile.mkdtemp(prefix="dropcli-ab-"))
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "x.npy").exists() or not (d / "mlp_mc.onnx").exists():
        print(f"making the job in {d} ...", file=sys.stderr, flush=True)
        peers.make_job(d, args.rows)
    paths = {"ts": d / "mlp_ts.pt", "pt2": d / "mlp.pt2", "onnx": d / "mlp_mc.onnx"}
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.reps):
        pair = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
        for m in args.model:
            for who, repo in pair:
                for size, x in (("large", d / "x.npy"), ("small", d / "x_small.npy")):
                    dt, cpu = run(repo, paths[m], x, d / f"out_{who}_{m}_{size}.npz", args.threads)
                    times.setdefault((m, who, size), []).append(dt)
                    times.setdefault((m, who, size + " cpu"), []).append(cpu)
        print(f"round {r + 1}/{args.reps} done", file=sys.stderr, flush=True)
    chunks = -(-args.rows // peers.BATCH)
    print(f"{args.reps} interleaved rounds, {args.threads} thread(s), {args.rows} rows ({chunks} chunks) and "
          f"{peers.SMALL} rows; seconds (medians)")
    print(f"{'model':6} {'checkout':8} {'clock':6} {'large':>7} {'small':>7} {'marginal':>9} {'ms/chunk':>9}")
    for m in args.model:
        for clock in ("wall", "cpu"):
            tag = "" if clock == "wall" else " cpu"
            marg = {}
            for who in ("old", "new"):
                lg, sm = times[(m, who, "large" + tag)], times[(m, who, "small" + tag)]
                marg[who] = [a - b for a, b in zip(lg, sm)]
                med = statistics.median(marg[who])
                print(f"{m:6} {who:8} {clock:6} {statistics.median(lg):7.2f} {statistics.median(sm):7.2f} {med:9.2f} "
                      f"{med / chunks * 1e3:9.1f}")
            ratios = sorted(o / n for o, n in zip(marg["old"], marg["new"]))
            print(f"{m:6} {clock} paired marginal ratio old/new: median {statistics.median(ratios):.3f} "
                  f"(rounds: {' '.join(f'{q:.2f}' for q in ratios)})")
        diff = differing(d / f"out_old_{m}_large.npz", d / f"out_new_{m}_large.npz")
        print(f"{m:6} outputs {'bitwise equal' if not diff else 'DIFFER in ' + ', '.join(diff)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
