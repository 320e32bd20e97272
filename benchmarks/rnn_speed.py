"""Recurrent layers: fused nn.LSTM / nn.GRU vs dropcli's cell-level loops, dropout off and on.

    python benchmarks/rnn_speed.py               # 7 interleaved repetitions per path
    python benchmarks/rnn_speed.py --quick       # 3 repetitions
    python benchmarks/rnn_speed.py --compile     # also torch.compile the loop (slow to compile)

Layers: 2 stacked layers, hidden 128, input 64, batch_first, unidirectional; a batch of 64
sequences of 50 steps ("batch 64") and an MC-sized batch of 16 examples x 32 samples = 512
rows ("batch 512"). 2 threads, forward work only, under torch.no_grad(). Repetitions are
interleaved (round-robin, order rotated each round) so machine noise hits every path alike.
The table shows the median and the minimum milliseconds per forward, and the ratio of the
medians to the fused layer's. On a shared machine the minimum is the steadier figure.

Paths:
* fused: the original nn.LSTM / nn.GRU in eval mode;
* site, inference mode: a dropcli recurrent site with MC off (the fused op on the same weights);
* loop eager / loop TorchScript: RecurrentLoop without masks, the per-direction loop in Python
  or as a TorchScript function (use_script=True);
* <variant> eager / TorchScript: the site in MC mode (masks drawn and applied in the loop);
* loop torch.compile (--compile): the eager loop under torch.compile (inductor), compile time
  excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from dropcli.backends.torch.rnn import RecurrentLoop
from dropcli.variants.recurrent import spec_by_name

THREADS = 2
H, I, L, S = 128, 64, 2, 50

VARIANTS = [("rnndrop", {}), ("recurrent", {"mask_per": "step"}), ("variational", {"tie": "tied"}),
            ("variational", {"tie": "untied"})]


def _site(name, layer, loop_script: bool, **extra):
    spec = spec_by_name(name)
    loop = RecurrentLoop.from_module(layer, use_script=loop_script)
    return spec.torch_module(rnn=loop, **spec.resolve_params({"p": 0.3, **extra}))


def paths(mode: str, batch: int, compile_too: bool):
    torch.manual_seed(0)
    layer = (nn.LSTM if mode == "lstm" else nn.GRU)(I, H, num_layers=L, batch_first=True).eval()
    x = torch.randn(batch, S, I)
    out = {"fused": lambda: layer(x)}
    off = _site("recurrent", layer, False)
    out["site, inference mode"] = lambda: off(x)
    loop_e = RecurrentLoop.from_module(layer)
    loop_s = RecurrentLoop.from_module(layer, use_script=True)
    out["loop eager (no masks)"] = lambda: loop_e(x)
    out["loop TorchScript (no masks)"] = lambda: loop_s(x)
    if compile_too:
        compiled = torch.compile(loop_e)
        t0 = time.perf_counter()
        compiled(x)
        print(f"[{mode} batch {batch}] torch.compile took {time.perf_counter() - t0:.1f} s to compile", flush=True)
        out["loop torch.compile (no masks)"] = lambda: compiled(x)
    for name, extra in VARIANTS:
        if name == "rnndrop" and mode == "gru":
            continue
        tag = name + ("" if not extra else f" {'/'.join(str(v) for v in extra.values())}")
        se = _site(name, layer, False, **extra).set_mc(True)
        ss = _site(name, layer, True, **extra).set_mc(True)
        out[f"{tag} eager"] = (lambda s=se: s(x))
        out[f"{tag} TorchScript"] = (lambda s=ss: s(x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    torch.set_num_threads(THREADS)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {THREADS} threads, {L} layers, hidden {H}, input {I}, {S} steps, p = 0.3, "
          f"median of {reps} interleaved runs")
    for mode in ("lstm", "gru"):
        for batch in (64, 512):
            ps = paths(mode, batch, args.compile)
            times: dict[str, list[float]] = {k: [] for k in ps}
            with torch.no_grad():
                for f in ps.values():  # warm-up (TorchScript profiling runs, allocator)
                    f()
                    f()
                keys = list(ps)
                for r in range(reps):
                    order = keys[r % len(keys):] + keys[: r % len(keys)]
                    for k in order:
                        t0 = time.perf_counter()
                        ps[k]()
                        times[k].append((time.perf_counter() - t0) * 1e3)
            base = statistics.median(times["fused"])
            print(f"\n{mode.upper()}, batch {batch}")
            bmin = min(times["fused"])
            print(f"| {'path':<36} | {'median ms':>9} | {'min ms':>8} | {'median vs fused':>15} | {'min vs fused':>12} |")
            print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|{'-' * 17}|{'-' * 14}|")
            for k, v in times.items():
                med, lo = statistics.median(v), min(v)
                print(f"| {k:<36} | {med:>9.1f} | {lo:>8.1f} | {med / base:>14.2f}x | {lo / bmin:>11.2f}x |", flush=True)


if __name__ == "__main__":
    main()
