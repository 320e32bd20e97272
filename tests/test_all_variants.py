"""Every registered variant, end to end through `dropcli inject`, in both backends.

Driven by the registry, so a new variant is covered here without editing this file:
- inference mode: the torch output equals the original torch model exactly, the ONNX
  output equals the original ONNX model exactly (default onnxruntime session), and torch
  and ONNX agree to float tolerance (different kernels). Variants whose test rule is not
  the identity (``identity_at_test`` False: vanilla, the layer rewrites with their own test
  rules) are checked torch against ONNX, and against their rule in their own test files;
- layer-replacing variants run on every test model that has a layer they rewrite (the MLP
  and the CNN with both kinds of pooling);
- MC mode: per-output means over T passes agree between torch and ONNX within a tolerance
  derived from the sample variances, and stochastic variants actually vary.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dropcli.backends.onnx.model import MC_INPUT
from dropcli.cli.main import app
from dropcli.variants import load_all
from dropcli.variants.base import set_mc
from helpers import assert_same_moments, ort_session
from models import CNN, MLP, LSTMNet, PoolCNN, ResBlock, randomise_bn, save_as

import onnx
import onnxruntime as ort

runner = CliRunner()
T = 300
# per-variant options for the test models (8x8 digit-sized maps)
EXTRA = {"dropblock": ["--block-size", "3"], "cutout": ["--hole-size", "4"],
         # the ONNX exporter folds BatchNorm into the conv before it, so the two backends' theta
         # (and hence which tiny weights sparse-vd's test rule masks) differ; a small start
         # variance masks none and keeps the exact torch == ONNX check meaningful
         "sparse-vd": ["--log-sigma2", "-20"],
         # the pooling CNN's only Linear layer is its output layer
         "fastdropout": ["--allow-output"]}
DETERMINISTIC_MC = {"maxdrop"}
# cases whose test rule is the identity although the variant's is not in general: fastdropout's
# rule is mu = W x + b on a Linear layer with no activation after it (the pooling CNN's head)
IDENTITY_CASES = {("fastdropout", "pool")}


def _models_for(spec):
    if spec.attaches == "replace":
        return [k for k, classes in LAYER_CLASSES.items() if set(spec.replaces) & classes]
    if spec.attaches == "residual":
        return ["res"]
    if spec.attaches == "input" or (spec.ranks and 2 not in spec.ranks):
        return ["cnn"]
    return ["mlp"]


# the layers each test model has for the layer-replacing variants
LAYER_CLASSES = {"mlp": {"linear"}, "pool": {"linear", "conv", "maxpool", "avgpool"}, "lstm": {"lstm", "gru"}}
CASES = [(name, key) for name in sorted(load_all()) for key in _models_for(load_all()[name])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    out = {}
    for key, model, shape in (
        ("mlp", MLP(), (4, 64)),
        ("cnn", randomise_bn(CNN()), (4, 1, 8, 8)),
        ("res", randomise_bn(ResBlock()), (4, 1, 8, 8)),
        ("pool", randomise_bn(PoolCNN()), (4, 1, 8, 8)),
        ("lstm", LSTMNet().eval(), (4, 5, 8)),
    ):
        ex = torch.rand(shape)
        out[key] = {
            "model": model,
            "export": save_as(model, ex, d / f"{key}.pt2", "export"),
            "onnx": save_as(model, ex, d / f"{key}.onnx", "onnx"),
            "x": torch.rand((8,) + shape[1:], generator=torch.Generator().manual_seed(1)),
        }
    return out


# Variants whose test rule reads the layer's weights and the activation after it: torch and ONNX
# see different graphs where the ONNX exporter folded a BatchNorm into the conv before it (the
# ONNX conv then has other weights and a ReLU right after it), so they are compared on the conv
# that both graphs share.
WEIGHT_RULES = {"dropconnect", "standout"}
EXTRA_ON = {(n, "pool"): ["--layers", "features.0"] for n in WEIGHT_RULES}


def _inject(src, dst, name, p=0.3, key=None):
    has_p = any(q.name == "p" for q in load_all()[name].params)
    args = ["inject", str(src), "--variant", name, *(["--p", str(p)] if has_p else []), "-o", str(dst),
            *EXTRA.get(name, []), *EXTRA_ON.get((name, key), [])]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return dst


@pytest.mark.parametrize("name,key", CASES)
def test_variant_end_to_end(name, key, saved, tmp_path):
    spec = load_all()[name]
    m = saved[key]
    x = m["x"]
    t_out = _inject(m["export"], tmp_path / "out.pt2", name, key=key)
    o_out = _inject(m["onnx"], tmp_path / "out.onnx", name, key=key)

    with torch.no_grad():
        ref = m["model"](x)
    tm = torch.export.load(str(t_out)).module()
    sess = ort_session(onnx.load(str(o_out)))
    # Exactness is checked without onnxruntime's fusions: a site between a conv and a residual
    # add blocks the conv+add+relu fusion, whose rounding differs in the last bit (~1e-7).
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    basic.log_severity_level = 3
    sess_b = ort.InferenceSession(str(o_out), basic)
    sess_orig = ort.InferenceSession(str(m["onnx"]), basic)
    xin = x.numpy()

    # inference mode
    with torch.no_grad():
        t_eval = tm(x)
    o_eval = sess.run(None, {"x": xin})[0]
    if not spec.identity_at_test and (name, key) not in IDENTITY_CASES:
        # vanilla scales the activations by q at test time, layer rewrites have their own test
        # rules: those are checked in their own test files; here torch must match ONNX
        if name != "sparse-vd":  # its test rule only masks weights below the threshold (none here)
            assert not torch.equal(t_eval, ref)
    else:
        assert torch.equal(t_eval, ref), "torch inference output changed"
        orig = sess_orig.run(None, {"x": xin})[0]
        np.testing.assert_array_equal(sess_b.run(None, {"x": xin})[0], orig)
        np.testing.assert_allclose(o_eval, orig, rtol=1e-6, atol=1e-6)  # default session, fusions on
    np.testing.assert_allclose(o_eval, t_eval.numpy(), rtol=1e-4, atol=1e-5)

    # MC mode
    assert set_mc(tm, True) >= 1
    torch.manual_seed(123)
    with torch.no_grad():
        ts = np.stack([tm(x).numpy() for _ in range(T)])
    os_ = np.stack([sess.run(None, {"x": xin, MC_INPUT: np.array(True)})[0] for _ in range(T)])
    if name in DETERMINISTIC_MC:
        np.testing.assert_allclose(os_[0], ts[0], rtol=1e-4, atol=1e-5)
        return
    assert ts.std(0).max() > 0 and os_.std(0).max() > 0, "MC mode did not vary"
    # 6 standard errors per output: a correct pair fails with probability ~1e-9 per element
    assert_same_moments(ts, os_, f"{name}: torch vs ONNX MC", z=6.0)
