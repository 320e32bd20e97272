"""MC-dropout speed: naive T forward passes vs dropcli's engines, measured side by side.

    python benchmarks/mc_speed.py            # 10 interleaved repetitions per path
    python benchmarks/mc_speed.py --quick    # 3 repetitions (about a minute)

The job: T = 50 samples, a batch of 256, 2 threads.
Models: MLP 784-512-512-10 with Dropout(0.5) after each hidden ReLU; a small CNN
(3x32x32, two conv(8, 16 channels)-BN-ReLU-pool blocks with Dropout2d(0.2), dropout before the linear head).

Paths, timed on the forward work alone (no file I/O), in one process, repetitions
interleaved (round-robin, order rotated each round) so that machine noise hits every
path alike; the table shows medians and the ratio vs the naive path of the same backend:

* torch naive: the module in eval mode with only its dropout modules in train mode
  (BatchNorm keeps its running statistics, as baal does), T forward passes, stacked;
* torch dropcli: the module saved as .pt2, loaded with dropcli.backends.load_model,
  dropcli.engines.runner.TorchRunner + dropcli.engines.runner.run_mc (includes the deterministic pass and the
  degenerate-sampling check that `dropcli uncertainty` runs);
* onnx naive: the model exported without dropout, `dropcli inject --p 0.5` at the same
  places, then T onnxruntime session runs with dropcli_mc=True;
* onnx dropcli: dropcli.engines.onnx_mc.OnnxRunner + run_mc (skipped while it does not exist).

Then the statistics are checked: naive vs engine, the average over examples of the
predictive mean and of the per-example variance (logits) must agree within 4 standard
errors (paired over examples).

Like the ``dropcli`` command, this process sets THP_MEM_ALLOC_ENABLE=1 before torch is imported
(unless the environment says otherwise): torch's CPU allocator then asks for transparent huge
pages on large blocks, so the tensors that every chunk allocates are not page-faulted in again
4 KiB at a time (docs/speed.md, "Page faults"). It applies to every path timed here.
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch's first large block (as dropcli.cli.main)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

T = 50
BATCH = 256
THREADS = 2
Z_OK = 4.0


class MLP(nn.Module):
    def __init__(self, dropout: bool = True):
        super().__init__()
        d = (lambda: nn.Dropout(0.5)) if dropout else nn.Identity
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), d(), nn.Linear(512, 512), nn.ReLU(), d(),
                                 nn.Linear(512, 10))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, dropout: bool = True):
        super().__init__()
        d2 = (lambda: nn.Dropout2d(0.2)) if dropout else nn.Identity
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), d2(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), d2(),
        )
        self.drop = nn.Dropout(0.5) if dropout else nn.Identity()
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.drop(torch.flatten(self.features(x), 1)))


def _init(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ------------------------------------------------------------------------------- paths


def naive_torch(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """[T, N, K] from T train-mode-dropout passes (everything else in eval)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.train()
    try:
        with torch.no_grad():
            out = torch.stack([model(x) for _ in range(T)])
    finally:
        model.eval()
    return out.numpy()


def make_engine_torch(model: nn.Module, example: torch.Tensor, d: Path):
    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, run_mc

    path = d / f"{type(model).__name__.lower()}.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model.eval(), (example[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        torch.export.save(ep, str(path))
    runner = TorchRunner(load_model(str(path)))
    seed = [0]

    def run(x: np.ndarray) -> np.ndarray:
        seed[0] += 1
        return run_mc(runner, [x], T, seed[0], batch_size=BATCH).samples

    return run, runner.n_sites


def make_onnx(plain: nn.Module, example: torch.Tensor, d: Path, after: str, p: float) -> Path:
    """Export the dropout-free twin and inject p at the same places with the real CLI."""
    src = d / f"{type(plain).__name__.lower()}_plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain.eval(), (example[:2],), str(src), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
    dst = d / f"{type(plain).__name__.lower()}_mc.onnx"
    cmd = [sys.executable, "-m", "dropcli.cli.main", "--quiet", "inject", str(src), "--p", str(p), "--after", after,
           "--exclude", "*head*", "-o", str(dst)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return dst


def make_naive_onnx(path: Path):
    import onnxruntime as ort

    from dropcli.backends.onnx.model import MC_INPUT

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    # dropcli_mc is an input with a default (an initializer), so ORT lists it as overridable
    names = {i.name for i in sess.get_inputs()} | {i.name for i in sess.get_overridable_initializers()}
    if MC_INPUT not in names:
        raise RuntimeError(f"{path} has no {MC_INPUT} input: {sorted(names)}")

    def run(x: np.ndarray) -> np.ndarray:
        feed = {"x": x, MC_INPUT: np.array(True)}
        return np.stack([sess.run(None, feed)[0] for _ in range(T)])

    return run


def make_engine_onnx(path: Path):
    from dropcli.backends import load_model
    from dropcli.engines.runner import run_mc
    from dropcli.engines.onnx_mc import OnnxRunner

    runner = OnnxRunner(load_model(str(path)), "cpu")
    seed = [0]

    def run(x: np.ndarray) -> np.ndarray:
        seed[0] += 1
        return run_mc(runner, [x], T, seed[0], batch_size=BATCH).samples

    return run, runner.n_sites


# ------------------------------------------------------------------------------- measuring


def interleaved(paths: dict[str, callable], x, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for k in names:  # warm-up, untimed
        paths[k](x)
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            paths[k](x)
            times[k].append(time.perf_counter() - t0)
    return times


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """z-scores (paired over examples) of the difference in mean predictive mean and mean variance."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    out = []
    for f in (lambda s: s.mean(0), lambda s: s.var(0)):
        d = (f(a) - f(b)).mean(-1)  # per example, averaged over outputs
        se = d.std(ddof=1) / math.sqrt(len(d))
        out.append(float(d.mean() / se) if se > 0 else 0.0)
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions per path instead of 10")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 10)
    torch.set_num_threads(THREADS)
    have_onnx_engine = importlib.util.find_spec("dropcli.engines.onnx_mc") is not None

    rows = []
    checks = []
    notes = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, cls, shape, after in (("MLP 784-512-512-10", MLP, (784,), "relu"),
                                        ("CNN 3x32x32", CNN, (3, 32, 32), "maxpool,flatten")):
            model = _init(cls(True), 0)
            plain = _init(cls(False), 0)
            plain.load_state_dict(model.state_dict())
            x = torch.from_numpy(np.random.default_rng(0).standard_normal((BATCH,) + shape).astype(np.float32))
            xn = x.numpy()
            eng, n_sites = make_engine_torch(model, x, d)
            paths = {"torch naive": lambda xx, m=model: naive_torch(m, torch.from_numpy(xx)), "torch dropcli": eng}
            try:
                onnx_path = make_onnx(plain, x, d, after, 0.5 if cls is MLP else 0.2)
                # element-wise dropout at the torch model's places (ONNX 'standard' is not channel-wise)
                paths["onnx naive"] = make_naive_onnx(onnx_path)
                if have_onnx_engine:
                    paths["onnx dropcli"] = make_engine_onnx(onnx_path)[0]
                elif not any("mc_onnx" in n for n in notes):
                    notes.append("onnx dropcli: skipped, dropcli.engines.onnx_mc is not importable yet")
            except Exception as e:  # noqa: BLE001
                notes.append(f"{name} onnx: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            print(f"[{name}] {n_sites} torch site(s); timing {len(paths)} paths x {reps} reps ...", file=sys.stderr, flush=True)
            times = interleaved(paths, xn, reps)
            for k, ts in times.items():
                base = statistics.median(times[k.split()[0] + " naive"])
                med = statistics.median(ts)
                rows.append((name, k, med * 1e3, min(ts) * 1e3, base / med))
            # statistics: naive vs engine, same backend
            for be in ("torch", "onnx"):
                if f"{be} naive" in paths and f"{be} dropcli" in paths:
                    za, zv = agreement(paths[f"{be} naive"](xn), paths[f"{be} dropcli"](xn))
                    checks.append((name, be, za, zv))

    print(f"\nMC dropout, T={T}, batch {BATCH}, {THREADS} threads, torch {torch.__version__}, "
          f"{reps} interleaved reps (medians)\n")
    print(f"| {'model':<20} | {'path':<14} | {'ms/batch':>9} | {'min ms':>8} | {'vs naive':>8} |")
    print(f"|{'-' * 22}|{'-' * 16}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for name, k, med, mn, ratio in rows:
        print(f"| {name:<20} | {k:<14} | {med:9.1f} | {mn:8.1f} | {ratio:7.2f}x |")
    print("\nstatistics, naive vs dropcli (z of the difference, paired over examples; |z| < "
          f"{Z_OK:g} is agreement):\n")
    ok = True
    for name, be, za, zv in checks:
        good = abs(za) < Z_OK and abs(zv) < Z_OK
        ok &= good
        print(f"  {name:<20} {be:<6} mean of predictive mean z={za:+.2f}, mean of per-example variance z={zv:+.2f}"
              f"  {'ok' if good else 'MISMATCH'}")
    for n in notes:
        print(f"  note: {n}")
    mlp = [r for r in rows if r[0].startswith("MLP") and r[1] == "torch dropcli"]
    if mlp:
        print(f"\nMLP torch target >= 3x vs naive: {mlp[0][4]:.2f}x {'met' if mlp[0][4] >= 3 else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
