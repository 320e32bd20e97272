"""End-to-end MC-dropout speed against the tools users would pick instead: baal and torch-uncertainty.

    python benchmarks/peers.py                    # 3 interleaved repetitions (a few minutes)
    python benchmarks/peers.py --reps 1 --rows 2560   # a quick look
    python benchmarks/peers.py --peer-python /path/to/venv/bin/python

The job: an MLP 784-512-512-10 with Dropout(0.5) after each hidden ReLU, T = 50, batch 256,
2 threads. Every tool runs as a WHOLE PROCESS (start-up, imports, model loading, sampling,
statistics, writing per-example mean probabilities, entropy and mutual information), once
over 10,240 rows and once over 256 rows; the marginal time is the difference. The runs are
interleaved (round-robin, the order rotated each round) so that machine noise hits every
tool alike; the table shows medians.

Tools:
* baal: ``MCDropoutModule`` in a ``ModelWrapper``, ``predict_on_batch(x, iterations=T)`` per
  batch of 256 (it stacks the batch T times in memory, as baal does by default);
* torch-uncertainty: ``mc_dropout(model, num_estimators=T)`` (batched, its default). Its
  package import needs torchvision, which does not install beside torch 2.13, so its
  ``methods/mc_dropout.py`` file is loaded directly (it needs only torch and einops);
* dropcli: ``dropcli uncertainty MODEL --input x.npy -T 50 --batch-size 256 --output out.npz``
  on the same network saved as TorchScript (traced), as .pt2 (torch.export) and as ONNX
  (exported without dropout, then ``dropcli inject --p 0.5 --after relu``).

The peers are installed from the package registry into the benchmark's own virtual
environment (``benchmarks/.venv-peers``, created on first use: ``pip install torch==2.13.0
baal torch-uncertainty``), never into dropcli's. ``--peer-python`` uses another interpreter
that has them. dropcli runs with this interpreter, from this checkout (PYTHONPATH).

The network is trained for a few seconds on synthetic 10-class data (clusters in 784-d) so
that examples range from confident to ambiguous; then the statistics are checked against
baal's on the 10,240 rows: the per-example mean probabilities must agree within 0.02 (mean
absolute difference over examples and classes) and the per-example mutual information must
correlate with baal's at r >= 0.9. Two MC runs with T = 50 differ by their sampling noise,
so the line "torch-uncertainty vs baal" shows the size of that noise between two peers.

Targets (issue 17): marginal >= 4x the best peer for TorchScript and .pt2, >= 3.5x for ONNX;
a 256-row run under 3 s for TorchScript and under 2 s for ONNX.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T = 50
BATCH = 256
THREADS = 2
ROWS = 10240
SMALL = 256
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_VENV = HERE / ".venv-peers"
PEER_PACKAGES = ["torch==2.13.0", "baal", "torch-uncertainty"]
MEAN_TOL = 0.02
MI_CORR = 0.9
TARGETS = {"dropcli TorchScript": (4.0, 3.0), "dropcli .pt2": (4.0, None), "dropcli ONNX": (3.5, 2.0)}


# ------------------------------------------------------------------------- the peers' side
# (runs under the peer interpreter: imports torch, numpy and the peer, never dropcli)

def _mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(),
                         nn.Dropout(0.5), nn.Linear(512, 10))


def _write_stats(out_path: str, logits) -> None:
    """logits [T, N, K] -> per-example mean probabilities, entropy, expected entropy, MI."""
    import numpy as np
    import torch

    probs = torch.softmax(logits.float(), dim=-1)
    mean = probs.mean(0)
    eps = 1e-12
    entropy = -(mean * torch.log(mean + eps)).sum(-1)
    expected = -(probs * torch.log(probs + eps)).sum(-1).mean(0)
    np.savez(out_path, mean=mean.numpy(), entropy=entropy.numpy(), expected_entropy=expected.numpy(),
             mutual_info=(entropy - expected).clamp_min(0).numpy())


def peer_worker(tool: str, state: str, x_path: str, out_path: str) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0 if tool == "baal" else 1)  # two independent MC runs: their gap is the sampling noise
    model = _mlp()
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    x = torch.from_numpy(np.load(x_path))
    outs = []
    if tool == "baal":
        from baal.bayesian.dropout import MCDropoutModule
        from baal.modelwrapper import ModelWrapper, TrainingArgs

        wrapper = ModelWrapper(MCDropoutModule(model), TrainingArgs(batch_size=BATCH, use_cuda=False, workers=0,
                                                                    replicate_in_memory=True))
        wrapper.model.eval()  # MCDropoutModule keeps its dropout layers sampling in eval mode
        for i in range(0, len(x), BATCH):
            out = wrapper.predict_on_batch(x[i:i + BATCH], iterations=T)  # [B, K, T]
            outs.append(out.permute(2, 0, 1))
    elif tool == "torch-uncertainty":
        import importlib.util

        spec = importlib.util.find_spec("torch_uncertainty")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("torch-uncertainty is not installed in this interpreter")
        path = Path(list(spec.submodule_search_locations)[0]) / "methods" / "mc_dropout.py"
        mspec = importlib.util.spec_from_file_location("tu_mc_dropout", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        mc = mod.mc_dropout(model, num_estimators=T)
        mc.eval()
        with torch.no_grad():
            for i in range(0, len(x), BATCH):
                xb = x[i:i + BATCH]
                outs.append(mc(xb).reshape(T, len(xb), -1))  # [(m b), K], estimator-major
    else:
        raise SystemExit(f"unknown peer {tool!r}")
    _write_stats(out_path, torch.cat(outs, dim=1))


# ------------------------------------------------------------------------- setup

def ensure_peer_python(arg: str | None) -> str:
    if arg:
        return arg
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {PEER_VENV} and installing {' '.join(PEER_PACKAGES)} (once) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return str(py)


def peer_versions(py: str) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({k: m.version(k) for k in ('baal', 'torch-uncertainty', 'torch')}))")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def make_job(d: Path, rows: int) -> dict[str, Path]:
    """Train the MLP briefly on synthetic data; save it in every format; write the inputs."""
    import warnings

    import numpy as np
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    K, D = 10, 784
    centers = rng.standard_normal((K, D)).astype(np.float32) * 0.12

    def sample(n):
        # half the examples from one class, half between two (mixed 30-70%): confident and ambiguous
        y = rng.integers(0, K, n)
        other = rng.integers(0, K, n)
        mix = np.where(rng.uniform(size=(n, 1)) < 0.5, 1.0, rng.uniform(0.3, 0.7, (n, 1))).astype(np.float32)
        x = mix * centers[y] + (1 - mix) * centers[other] + rng.standard_normal((n, D)).astype(np.float32)
        return x.astype(np.float32), np.where(mix[:, 0] >= 0.5, y, other)

    xtr, ytr = sample(8192)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    model.train()
    for _ in range(4):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 128):
            b = perm[i:i + 128]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    model.eval()
    x, _ = sample(rows)
    paths = {"state": d / "mlp_state.pt", "ts": d / "mlp_ts.pt", "pt2": d / "mlp.pt2", "onnx": d / "mlp_mc.onnx",
             "x": d / "x.npy", "x_small": d / "x_small.npy"}
    np.save(paths["x"], x)
    np.save(paths["x_small"], x[:SMALL])
    torch.save(model.state_dict(), paths["state"])
    ex = torch.from_numpy(x[:2])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, ex), str(paths["ts"]))
        ep = torch.export.export(model, (ex,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        torch.export.save(ep, str(paths["pt2"]))
        plain = torch.nn.Sequential(*[m for m in model if not isinstance(m, torch.nn.Dropout)]).eval()
        torch.onnx.export(plain, (ex,), str(d / "mlp_plain.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    subprocess.run([sys.executable, "-m", "dropcli.cli.main", "--quiet", "inject", str(d / "mlp_plain.onnx"),
                    "--p", "0.5", "--after", "relu", "-o", str(paths["onnx"])], check=True, env=_env(),
                   stdout=subprocess.DEVNULL)
    return paths


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(THREADS)
    return env


def commands(peer_py: str, paths: dict[str, Path]) -> dict[str, callable]:
    """tool -> (x path, out path) -> argv."""
    me = str(Path(__file__).resolve())

    def peer(tool):
        return lambda x, out: [peer_py, me, "--worker", tool, str(paths["state"]), str(x), str(out)]

    def dropcli(model):
        return lambda x, out: [sys.executable, "-m", "dropcli.cli.main", "--quiet", "uncertainty", str(model),
                               "--input", str(x), "-T", str(T), "--batch-size", str(BATCH), "--seed", "0",
                               "--output", str(out)]

    return {"baal": peer("baal"), "torch-uncertainty": peer("torch-uncertainty"),
            "dropcli TorchScript": dropcli(paths["ts"]), "dropcli .pt2": dropcli(paths["pt2"]),
            "dropcli ONNX": dropcli(paths["onnx"])}


def run_once(argv: list[str]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds: user + system of the process and its threads)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# ------------------------------------------------------------------------- statistics

def read_stats(path: Path) -> dict:
    import numpy as np

    with np.load(path) as z:
        if "mean" in z.files:  # a peer
            return {"mean": z["mean"], "entropy": z["entropy"], "mi": z["mutual_info"]}
        k = sum(1 for f in z.files if f.startswith("mean_"))
        return {"mean": np.stack([z[f"mean_{j}"] for j in range(k)], axis=1), "entropy": z["entropy"],
                "mi": z["mutual_info"]}


def agreement(a: dict, b: dict) -> dict:
    import numpy as np

    d = np.abs(a["mean"].astype(np.float64) - b["mean"])
    return {"mean_abs": float(d.mean()), "class_mean_max": float(np.abs(a["mean"].mean(0) - b["mean"].mean(0)).max()),
            "entropy_corr": float(np.corrcoef(a["entropy"], b["entropy"])[0, 1]),
            "mi_corr": float(np.corrcoef(a["mi"], b["mi"])[0, 1])}


# ------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians)")
    ap.add_argument("--rows", type=int, default=ROWS, help="rows of the large run")
    ap.add_argument("--peer-python", default=None, help="an interpreter with baal and torch-uncertainty installed")
    ap.add_argument("--only", nargs="*", default=None, help="run only these tools (names as in the table)")
    ap.add_argument("--workdir", default=None, help="keep models, inputs and outputs here")
    args = ap.parse_args()
    peer_py = ensure_peer_python(args.peer_python)
    versions = peer_versions(peer_py)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        print("training and saving the MLP ...", file=sys.stderr, flush=True)
        paths = make_job(d, args.rows)
        cmds = commands(peer_py, paths)
        if args.only:
            cmds = {k: v for k, v in cmds.items() if k in args.only or k in ("baal",)}
        names = list(cmds)
        jobs = [(k, size) for k in names for size in ("large", "small")]
        times: dict[tuple[str, str], list[float]] = {j: [] for j in jobs}
        cpu: dict[tuple[str, str], list[float]] = {j: [] for j in jobs}
        for r in range(args.reps):
            order = jobs[(2 * r) % len(jobs):] + jobs[:(2 * r) % len(jobs)]
            for k, size in order:
                x = paths["x"] if size == "large" else paths["x_small"]
                out = d / f"out_{k.replace(' ', '_').replace('.', '')}_{size}.npz"
                dt, ct = run_once(cmds[k](x, out))
                times[(k, size)].append(dt)
                cpu[(k, size)].append(ct)
                print(f"  rep {r + 1}/{args.reps}  {k:<20} {size:<5} {dt:6.2f} s  (CPU {ct:6.2f} s)", file=sys.stderr,
                      flush=True)
        stats = {k: read_stats(d / f"out_{k.replace(' ', '_').replace('.', '')}_large.npz") for k in names}

    med = {j: statistics.median(ts) for j, ts in times.items()}
    marginal = {k: med[(k, "large")] - med[(k, "small")] for k in names}
    cmed = {j: statistics.median(ts) for j, ts in cpu.items()}
    cmarginal = {k: cmed[(k, "large")] - cmed[(k, "small")] for k in names}
    peers = [k for k in names if not k.startswith("dropcli")]
    best = min(marginal[k] for k in peers)
    cbest = min(cmarginal[k] for k in peers)
    print(f"\nMC dropout end to end: MLP 784-512-512-10, dropout 0.5, T={T}, batch {BATCH}, {THREADS} threads; "
          f"{args.rows} rows vs {SMALL} rows; medians of {args.reps} interleaved runs (whole processes)")
    print(f"peers: baal {versions['baal']}, torch-uncertainty {versions['torch-uncertainty']} (torch {versions['torch']})\n")
    print(f"| {'tool':<36} | {'whole run (s)':>13} | {f'{SMALL} rows (s)':>13} | {'marginal (s)':>12} | "
          f"{'marginal vs best peer':>21} | {'CPU marginal (s)':>16} | {'CPU vs best peer':>16} |")
    print(f"|{'-' * 38}|{'-' * 15}|{'-' * 15}|{'-' * 14}|{'-' * 23}|{'-' * 18}|{'-' * 18}|")
    label = {"baal": f"baal {versions['baal']} (MCDropoutModule)",
             "torch-uncertainty": f"torch-uncertainty {versions['torch-uncertainty']} (mc_dropout)"}
    for k in names:
        print(f"| {label.get(k, k + ' model'):<36} | {med[(k, 'large')]:13.2f} | {med[(k, 'small')]:13.2f} | "
              f"{marginal[k]:12.2f} | {best / marginal[k]:20.2f}x | {cmarginal[k]:16.2f} | "
              f"{cbest / cmarginal[k]:15.2f}x |")
    print("(wall-clock medians; CPU = user + system seconds of the process, all threads: steadier on a busy machine)")

    ok = True
    print(f"\nstatistics vs baal on the {args.rows} rows (mean |diff| of per-example mean probabilities <= {MEAN_TOL}; "
          f"correlation of per-example MI >= {MI_CORR}):")
    for k in names:
        if k == "baal":
            continue
        a = agreement(stats[k], stats["baal"])
        good = a["mean_abs"] <= MEAN_TOL and a["mi_corr"] >= MI_CORR
        ok &= good or not k.startswith("dropcli")
        print(f"  {k:<20} mean |diff| {a['mean_abs']:.4f}  (max class-average diff {a['class_mean_max']:.4f})  "
              f"entropy r {a['entropy_corr']:.3f}  MI r {a['mi_corr']:.3f}  {'ok' if good else 'MISMATCH'}")

    print("\ntargets:")
    for k, (ratio, secs) in TARGETS.items():
        if k not in marginal:
            continue
        got = best / marginal[k]
        line = f"  {k:<20} marginal {got:.2f}x best peer (target >= {ratio:g}x): {'met' if got >= ratio else 'NOT met'}"
        if secs is not None:
            s = med[(k, "small")]
            line += f"; {SMALL}-row run {s:.2f} s (target < {secs:g} s): {'met' if s < secs else 'NOT met'}"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        peer_worker(*sys.argv[2:6])
    else:
        sys.exit(main())
