"""Backend-agnostic MC driver: chunking under a memory budget, progress, checks.

A *runner* (torch: :class:`TorchRunner`; ONNX: ``dropcli.mc_onnx.OnnxRunner``) exposes
``input_specs``, ``n_sites``, ``run(inputs, indices, seed, T, t0) -> [B, T, K]`` and
``run_eval(inputs) -> [B, K]``. Chunks split over examples (and, when one example's T
samples exceed the budget, over samples at SAMPLE_BLOCK boundaries), so results are the
same whatever the chunking.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from dropcli.io.data import InputSpec
from dropcli.errors import DropcliError, UsageError
from dropcli.engines.keyed import SAMPLE_BLOCK

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


@contextlib.contextmanager
def no_progress(what: str, total: int):
    """The default progress report: ``progress(label, total)`` yields ``advance(k=1, info=None)``;
    this one shows nothing."""
    yield lambda k=1, info=None: None


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"--max-memory {text!r} is not a size", "write it like 512M or 2G")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise UsageError(f"--max-memory {text!r} must be positive")
    return n


def available_memory(device: str = "cpu") -> int:
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_budget(device: str = "cpu") -> int:
    """A safe fraction of free memory: a quarter on CPU, half on a GPU."""
    frac = 0.5 if device.startswith("cuda") else 0.25
    return max(64 << 20, int(available_memory(device) * frac))


@dataclass
class MCResult:
    samples: np.ndarray  # [T, N, K]
    eval: np.ndarray  # [N, K]
    chunks: int
    examples_per_chunk: int
    out_shape: tuple = ()  # the per-example output shape before flattening to K


def plan_chunks(n: int, T: int, row_bytes: int, budget: int, batch_size: int) -> tuple[int, int]:
    """(examples per chunk, samples per chunk) with rows * row_bytes <= budget."""
    rows = max(1, budget // max(row_bytes, 1))
    per_chunk = max(1, min(batch_size, rows // T if rows >= T else 1, n))
    t_chunk = T
    if rows < T:
        t_chunk = max(SAMPLE_BLOCK, (rows // SAMPLE_BLOCK) * SAMPLE_BLOCK)
    return per_chunk, min(t_chunk, T)


def run_mc(runner: Any, inputs: Sequence[np.ndarray], T: int, seed: int, batch_size: int = 256,
           max_memory: int | None = None, progress: Callable[[int], None] | None = None,
           index_offset: int = 0, check_degenerate: bool = True) -> MCResult:
    n = len(inputs[0])
    budget = max_memory or default_budget(getattr(runner, "device_name", "cpu"))
    row_bytes = runner.row_bytes(inputs)
    per_chunk, t_chunk = plan_chunks(n, T, row_bytes, budget, batch_size)
    samples: np.ndarray | None = None
    evals: list[np.ndarray] = []
    chunks = 0
    # (examples, samples) of every chunk in order: a runner that can draw a chunk's noise ahead
    # (``draws_ahead``) is told which chunk comes next, and draws its noise while this one runs
    order = [(i0, min(n, i0 + per_chunk), t0, min(T, t0 + t_chunk))
             for i0 in range(0, n, per_chunk) for t0 in range(0, T, t_chunk)]
    ahead = getattr(runner, "draws_ahead", False) and len(order) > 1
    for i0 in range(0, n, per_chunk):
        i1 = min(n, i0 + per_chunk)
        xs = [x[i0:i1] for x in inputs]
        idx = list(range(index_offset + i0, index_offset + i1))
        parts = []
        for t0 in range(0, T, t_chunk):
            t1 = min(T, t0 + t_chunk)
            if ahead and chunks + 1 < len(order):
                j0, j1, u0, u1 = order[chunks + 1]
                then = (list(range(index_offset + j0, index_offset + j1)), u1 - u0, u0)
                parts.append(runner.run(xs, idx, seed, t1 - t0, t0, then=then))
            else:
                parts.append(runner.run(xs, idx, seed, t1 - t0, t0))
            chunks += 1
        block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)  # [B, T, K...]
        if samples is None:
            samples = np.empty((T, n) + block.shape[2:], dtype=np.float32)
        samples[:, i0:i1] = np.swapaxes(block, 0, 1)
        evals.append(runner.run_eval(xs))
        if progress:
            progress(i1 - i0)
    assert samples is not None
    release = getattr(runner, "release", None)
    if release is not None:  # the engine's per-chunk buffers: not needed for the statistics
        release()
    ev = np.concatenate(evals, axis=0)
    out_shape = tuple(samples.shape[2:]) or (1,)
    if samples.ndim == 2:
        samples = samples[..., None]
        ev = ev[..., None]
    elif samples.ndim > 3:
        samples = samples.reshape(samples.shape[0], samples.shape[1], -1)
        ev = ev.reshape(ev.shape[0], -1)
    if check_degenerate:
        check_degenerate_examples(degenerate_examples(samples), T, index_offset)
    return MCResult(samples, ev, chunks, per_chunk, out_shape)


def final_op(runner: Any) -> str | None:
    """The op that makes the model's (first) output: an aten name (torch) or an ONNX op type;
    None when it cannot be told. Reshapes and casts are looked through."""
    passthrough = {"view", "reshape", "_unsafe_view", "clone", "contiguous", "to", "_to_copy", "alias", "detach",
                   "Reshape", "Identity", "Cast", "Flatten", "getitem"}
    model = getattr(runner, "model", None)
    gm = getattr(model, "gm", None)
    try:
        if gm is not None:
            from dropcli.backends.torch.fx import fname

            out = next(n for n in gm.graph.nodes if n.op == "output")
            node = out.args[0]
            while isinstance(node, (tuple, list)) and node:
                node = node[0]
            for _ in range(20):
                if not hasattr(node, "op") or node.op not in ("call_function", "call_method", "call_module"):
                    return None
                name = fname(node) if node.op != "call_module" else type(gm.get_submodule(node.target)).__name__
                if name not in passthrough or not node.args:
                    return name
                node = node.args[0]
            return None
        graph = getattr(getattr(model, "model", None), "graph", None)
        if graph is None or not graph.output:
            return None
        producers = {o: n for n in graph.node for o in n.output}
        name = graph.output[0].name
        for _ in range(20):
            node = producers.get(name)
            if node is None:
                return None
            if node.op_type not in passthrough or not node.input:
                return node.op_type
            name = node.input[0]
    except Exception:  # noqa: BLE001 - a hint only
        return None
    return None


def degenerate_examples(samples: np.ndarray) -> np.ndarray:
    """bool [N]: examples whose T > 1 samples are all identical."""
    T, n = samples.shape[:2]
    if T <= 1:
        return np.zeros(n, dtype=bool)
    flat = samples.reshape(T, n, -1)
    return np.all(flat == flat[:1], axis=(0, 2))


def check_degenerate_examples(same: np.ndarray, T: int, index_offset: int = 0) -> None:
    """The error for identical samples (both engines raise this same message)."""
    if same.any():
        bad = np.flatnonzero(same)
        raise DropcliError(
            f"degenerate sampling: the {T} samples of {len(bad)} of {len(same)} examples are identical (first: example {index_offset + bad[0]}); "
            "the sites produce no randomness there (p = 0, or a deterministic variant such as maxdrop)",
            "use p > 0 or another variant",
        )


class TorchRunner:
    """torch models through :class:`dropcli.mc_torch.TorchMC`."""

    def __init__(self, model: Any, device: str = "cpu"):
        import torch

        from dropcli.engines.torch_mc import TorchMC

        self.model = model
        self.device_name = device
        self.engine = TorchMC(model.gm, device)
        self._torch = torch

    @property
    def n_sites(self) -> int:
        return self.engine.n_sites

    def site_names(self) -> list[str]:
        return self.engine.describe_sites()

    def input_specs(self) -> list[InputSpec]:
        torch = self._torch
        specs = []
        phs = [n for n in self.model.gm.graph.nodes if n.op == "placeholder"]
        ex = self.model.example_inputs or ()
        for i, n in enumerate(phs):
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = [int(d) if isinstance(d, int) else None for d in val.shape]
                dtype = val.dtype
            elif i < len(ex):
                shape = [None] + list(ex[i].shape[1:])
                dtype = ex[i].dtype
            else:
                shape, dtype = None, torch.float32
            if shape:
                shape[0] = None
            specs.append(InputSpec(n.name, shape, np.dtype(str(dtype).replace("torch.", ""))))
        return specs

    def _tensors(self, xs: Sequence[np.ndarray]):
        return [self._torch.from_numpy(np.ascontiguousarray(x)) for x in xs]

    def row_bytes(self, inputs: Sequence[np.ndarray]) -> int:
        """Bytes per tiled row, measured on a small probe (an upper bound: all suffix values)."""
        return self.engine.probe_row_bytes(self._tensors([x[:1] for x in inputs]))

    def run(self, xs, indices, seed, T, t0=0) -> np.ndarray:
        # the deterministic pass of these inputs comes with the first samples' run when the engine
        # can compute it there (TorchMC.eval_in_run): run_mc asks for it next, with the same xs
        with_eval = t0 == 0 and self.engine.eval_in_run
        if t0 == 0:
            self._eval = None
        out = self.engine.run(self._tensors(xs), indices, seed, T, t0, with_eval=with_eval).float().cpu().numpy()
        if with_eval and self._torch.is_tensor(self.engine.eval_out):
            self._eval = (xs, self.engine.eval_out.float().cpu().numpy())
        self.engine.eval_out = None
        return out

    def run_eval(self, xs) -> np.ndarray:
        kept, self._eval = getattr(self, "_eval", None), None
        if kept is not None and kept[0] is xs:
            return kept[1]
        return self.engine.run_eval(self._tensors(xs)).float().cpu().numpy()

    def release(self) -> None:
        self.engine.release()
