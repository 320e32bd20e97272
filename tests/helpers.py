"""Shared test machinery: single-site torch/ONNX models and variance-derived tolerances.

Tolerances: a mean of n independent draws with per-draw std sigma has std sigma/sqrt(n);
we accept |observed - expected| <= Z * sigma/sqrt(n) with Z = 6 (two-sided p ~ 2e-9 per
check), so a correct implementation essentially never fails and a wrong formula (a bias
larger than a few standard errors) is caught. Seeds are fixed, so runs are reproducible.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from dropcli.backends.onnx.model import MC_INPUT, OnnxModel
from dropcli.cli.main import app
from dropcli.backends.plan import candidates
from dropcli.variants import get_variant
from dropcli.variants.base import SiteModule

Z = 6.0
_RUNNER = None


def cli(*args: Any, code: int = 0):
    """Run dropcli in-process; assert the exit code and that no traceback leaked; the result."""
    global _RUNNER
    if _RUNNER is None:
        from typer.testing import CliRunner

        _RUNNER = CliRunner()
    res = _RUNNER.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"{[str(a) for a in args]}: exit {res.exit_code}\n{res.output}{res.exception!r}"
    assert "Traceback" not in res.output, res.output
    return res


def cli_split(*args: Any, code: int = 0, input=None):
    """:func:`cli` for tests that read stdout and stderr apart (``res.stdout``, ``res.stderr``)."""
    global _RUNNER
    if _RUNNER is None:
        from typer.testing import CliRunner

        _RUNNER = CliRunner()
    res = _RUNNER.invoke(app, [str(a) for a in args], input=input)
    assert res.exit_code == code, f"exit {res.exit_code} (want {code}): {res.stderr}{res.exception!r}"
    assert "Traceback" not in res.stderr
    return res


def cli_err(*args: Any, code: int = 1, contains: tuple[str, ...] = (), input=None, ignore: tuple[str, ...] = ()):
    """Exit ``code`` with exactly one line on stderr (--quiet: no log lines), nothing on stdout.
    ``ignore``: stderr lines containing any of these are not dropcli's (Ray's own notices)."""
    res = cli_split("--quiet", *args, code=code, input=input)
    lines = [ln for ln in res.stderr.strip().splitlines() if not any(i in ln for i in ignore)]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    assert res.stdout == ""
    for c in contains:
        assert c.lower() in res.stderr.lower(), res.stderr
    return res


def tol(sigma: float, n: int, z: float = Z) -> float:
    """Allowed deviation of a mean of n draws with std sigma."""
    return z * sigma / math.sqrt(n)


def binom_tol(rate: float, n: int, z: float = Z) -> float:
    """Allowed deviation of an observed rate over n independent Bernoulli(rate) trials."""
    return tol(math.sqrt(max(rate * (1 - rate), 1e-12)), n, z)


def torch_site(name: str, mc: bool = True, **params: Any) -> SiteModule:
    spec = get_variant(name)
    m = spec.torch_module(**spec.resolve_params(params))
    return m.set_mc(mc)


def onnx_site(name: str, shape: Sequence[int | None], opset: int = 17, **params: Any) -> onnx.ModelProto:
    """A graph x -> Identity -> [site] -> y, rewritten through the real ONNX backend.

    ``shape`` may hold None for dynamic dimensions. Input-level variants attach to x.
    """
    spec = get_variant(name)
    dims = [d if d is not None else f"d{i}" for i, d in enumerate(shape)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, dims)
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, dims)
    if spec.attaches == "residual":
        # y = a + Relu(Identity(a)): a residual add whose branch is the Relu
        nodes = [
            helper.make_node("Identity", ["x"], ["a"], name="stem"),
            helper.make_node("Identity", ["a"], ["b"], name="branch"),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ]
        vis = [a, b]
    else:
        nodes = [helper.make_node("Identity", ["x"], ["y"], name="layer")]
        vis = []
    g = helper.make_graph(nodes, "site", [x], [y], value_info=vis)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    om = OnnxModel(model, "test")
    layers = candidates(om.layers(), spec)
    if spec.attaches == "residual":
        layer = next(l for l in layers if l.name == "add")
    elif spec.attaches == "input":
        layer = next(l for l in layers if l.name == "x")
    else:
        layer = next(l for l in layers if l.name == "layer")
    om.insert(layer, spec, spec.resolve_params(params))
    om.finalize()
    return om.model


def ort_session(model: onnx.ModelProto, seedless_default: bool = True) -> ort.InferenceSession:
    """A DEFAULT onnxruntime session (all optimisations on), as users will run it."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, x: np.ndarray, mc: bool = True) -> np.ndarray:
    return sess.run(None, {"x": x.astype(np.float32), MC_INPUT: np.array(mc)})[0]


def assert_close_mean(observed: float, expected: float, sigma: float, n: int, what: str, z: float = Z) -> None:
    t = tol(sigma, n, z)
    assert abs(observed - expected) <= t, f"{what}: observed {observed:.6g}, expected {expected:.6g} +- {t:.3g}"


def assert_same_distribution(a: np.ndarray, b: np.ndarray, what: str, z: float = Z) -> None:
    """Two-sample check on mean and variance of flattened draws (torch vs ONNX)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    se = math.sqrt(a.var() / a.size + b.var() / b.size)
    assert abs(a.mean() - b.mean()) <= z * max(se, 1e-12), f"{what}: means {a.mean():.6g} vs {b.mean():.6g} (se {se:.3g})"
    # variance: the sample variance of n draws has std ~ sqrt((m4 - s^4)/n)
    def var_se(v: np.ndarray) -> float:
        c = v - v.mean()
        return math.sqrt(max((c ** 4).mean() - c.var() ** 2, 1e-24) / v.size)

    se_v = math.sqrt(var_se(a) ** 2 + var_se(b) ** 2)
    assert abs(a.var() - b.var()) <= z * max(se_v, 1e-12), f"{what}: variances {a.var():.6g} vs {b.var():.6g} (se {se_v:.3g})"


def interrupt_training(monkeypatch, at_step: int = 3) -> None:
    """Make dropcli's training loop raise KeyboardInterrupt (Ctrl-C) at its ``at_step``-th batch."""
    import dropcli.training.loop as train_mod

    calls = {"n": 0}
    real = train_mod.data_loss

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_step:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "data_loss", interrupted)


def assert_moments_match(y: np.ndarray, mean: np.ndarray, var: np.ndarray, what: str, z: float = Z) -> None:
    """Draws stacked on axis 0 against the exact mean and variance of each element: within z
    standard errors each (the SE of a sample variance is sqrt((m4 - v^2)/n))."""
    y = np.asarray(y, dtype=np.float64)
    n = len(y)
    zm = np.abs(y.mean(0) - mean) / np.sqrt(var / n)
    assert zm.max() <= z, f"{what}: MC mean differs from the exact mean (max z {zm.max():.2f})"
    c = y - y.mean(0)
    se_v = np.sqrt(np.maximum((c ** 4).mean(0) - c.var(0) ** 2, 1e-30) / n)
    zv = np.abs(y.var(0) - var) / se_v
    assert zv.max() <= z, f"{what}: MC variance differs from the exact variance (max z {zv.max():.2f})"


def assert_same_moments(a: np.ndarray, b: np.ndarray, what: str, z: float = Z) -> None:
    """Two samples of draws stacked on axis 0 (e.g. torch vs ONNX MC passes): per element of the
    rest, the means agree within z standard errors, and so do the variances (the SE of a sample
    variance is sqrt((m4 - v^2)/n))."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    se = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
    zm = np.abs(a.mean(0) - b.mean(0)) / np.maximum(se, 1e-9)
    assert zm.max() <= z, f"{what}: means differ, max z = {zm.max():.2f}"

    def var_se(v: np.ndarray) -> np.ndarray:
        c = v - v.mean(0)
        return np.sqrt(np.maximum((c ** 4).mean(0) - c.var(0) ** 2, 0) / len(v))

    se_v = np.sqrt(var_se(a) ** 2 + var_se(b) ** 2)
    zv = np.abs(a.var(0) - b.var(0)) / np.maximum(se_v, 1e-12)
    assert zv.max() <= z, f"{what}: variances differ, max z = {zv.max():.2f}"


# --------------------------------------------------------------------------- layer-replacing variants


def torch_layer_site(name: str, module: torch.nn.Module, act: torch.nn.Module | None = None, mc: bool = True,
                     **params: Any) -> SiteModule:
    """A REPLACE variant's site built from a stock layer module (and activation module)."""
    spec = get_variant(name)
    return spec.torch_module.from_module(module, act=act, **params).set_mc(mc)


def onnx_layer_model(nodes: Sequence[onnx.NodeProto], x_shape: Sequence[int | None], y_shape: Sequence[int | None] | None,
                     inits: dict[str, np.ndarray] | None = None, opset: int = 17, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A graph x -> nodes -> y (the last node's output must be named y); ``None`` dims are dynamic."""
    from onnx import numpy_helper

    dims = [d if d is not None else f"d{i}" for i, d in enumerate(x_shape)]
    x = helper.make_tensor_value_info("x", dtype, dims)
    if y_shape is None:  # same rank as x, sizes left to shape inference
        y_shape = [None] * len(x_shape)
    ydims = [d if d is not None else f"e{i}" for i, d in enumerate(y_shape)]
    y = helper.make_tensor_value_info("y", dtype, ydims)
    g = helper.make_graph(list(nodes), "layer", [x], [y],
                          initializer=[numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_replace(model: onnx.ModelProto, name: str, layer: str | None = None, **params: Any) -> onnx.ModelProto:
    """Rewrite ``layer`` (default: the only candidate) of ``model`` with variant ``name``
    through the real ONNX backend; returns the rewritten model."""
    spec = get_variant(name)
    om = OnnxModel(model, "test")
    cands = candidates(om.layers(), spec)
    chosen = [l for l in cands if layer is None or l.name == layer]
    assert len(chosen) == 1, [l.name for l in cands]
    om.insert(chosen[0], spec, spec.resolve_params(params))
    om.finalize()
    return om.model


def repeat_rows(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` copies of a batch along dim 0 (copy k of example i at row k*B + i)."""
    return np.concatenate([x] * n, axis=0)
