"""Models saved with a fixed batch size (no dynamic_axes / dynamic_shapes: both exporters' default).

A batch-generic graph (an MLP) runs at full speed on a copy with a freed batch, and gives
bitwise the results of the same model exported with a dynamic batch. A graph that bakes the
batch in (Reshape to [2, ...]) runs through FixedBatchRunner: exactly the original in eval mode,
samples whose mean and variance match the site's analytic moments, keyed per example and
sample (chunking and padding do not change them), and a clear note / refusal in the CLI.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dropcli.engines.factory import build_runner
from dropcli.engines.fixed import FixedBatchRunner, declared_batch
from dropcli.engines.runner import run_mc

from helpers import Z, cli_err, cli_split

B0 = 2
P = 0.5


class Baked(nn.Module):
    """fc1 -> relu -> reshape through the batch size -> fc2; exported without a dynamic batch, the
    reshape's target shape becomes the constant [2, 4, 8]."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(x.shape[0], 4, 8).reshape(x.shape[0], 32))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixed")
    torch.manual_seed(0)
    baked = Baked().eval()
    x = torch.randn(B0, 16)
    torch.onnx.export(baked, (x,), str(d / "baked.onnx"), input_names=["x"], opset_version=17, dynamo=False)
    torch.export.save(torch.export.export(baked, (x,)), str(d / "baked.pt2"))
    mlp = _mlp()
    torch.onnx.export(mlp, (x[:1],), str(d / "mlp_static.onnx"), input_names=["x"], opset_version=17, dynamo=False)
    torch.export.save(torch.export.export(mlp, (x[:1],)), str(d / "mlp_static.pt2"))
    torch.onnx.export(mlp, (x[:1],), str(d / "mlp_dynamic.onnx"), input_names=["x"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {0: "N"}})
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((5, 16)).astype(np.float32)
    xs[1] = xs[0]  # two identical rows in one group: their samples must still differ
    np.save(d / "x.npy", xs)
    big = rng.standard_normal((96, 16)).astype(np.float32)
    np.savez(d / "train.npz", x=big, y=rng.integers(0, 4, 96))
    return d, baked, xs


INJECT = {"variant": "standard", "p": P, "after": "relu"}


def _runner(path):
    return build_runner(str(path), None, "cpu", INJECT)


def test_batch_generic_model_runs_tiled_and_bitwise_as_dynamic(files):
    d, _, xs = files
    static, dynamic = _runner(d / "mlp_static.onnx"), _runner(d / "mlp_dynamic.onnx")
    assert not isinstance(static, FixedBatchRunner) and declared_batch(static.model) is None  # a copy, batch freed
    a = run_mc(static, [xs], 40, seed=3).samples
    b = run_mc(dynamic, [xs], 40, seed=3).samples
    assert np.array_equal(a, b)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_baked_batch_runs_at_its_batch(files, fmt):
    d, baked, xs = files
    runner = _runner(d / f"baked.{fmt}")
    assert isinstance(runner, FixedBatchRunner) and runner.batch == B0
    # eval mode: exactly the original, run by its own runtime at its batch (the last row padded)
    padded = np.concatenate([xs, xs[:1]])
    if fmt == "onnx":
        sess = ort.InferenceSession(str(d / "baked.onnx"), providers=["CPUExecutionProvider"])
        ref = np.concatenate([sess.run(None, {"x": padded[i:i + B0]})[0] for i in range(0, 6, B0)])[:5]
    else:
        prog = torch.export.load(str(d / "baked.pt2")).module()
        with torch.no_grad():
            ref = np.concatenate([prog(torch.from_numpy(padded[i:i + B0])).numpy() for i in range(0, 6, B0)])[:5]
    np.testing.assert_allclose(runner.run_eval([xs]), ref, rtol=1e-6, atol=1e-6)

    # MC: y = fc2(m * h / q) with m ~ Bernoulli(q) per unit, so E[y] = fc2(h) and
    # Var[y_k] = sum_j W_kj^2 h_j^2 (1 - q) / q
    T = 600
    res = run_mc(runner, [xs], T, seed=0, batch_size=3)
    s = res.samples.astype(np.float64)  # [T, N, K]
    with torch.no_grad():
        h = torch.relu(baked.fc1(torch.from_numpy(xs))).double()
        mean = baked.fc2.double()(h).numpy()
        baked.fc2.float()
        var = ((1 - P) / P) * (h ** 2) @ (baked.fc2.weight.double().T ** 2)
    var = var.numpy()
    assert np.all(np.abs(s.mean(0) - mean) <= Z * np.sqrt(var / T)), (s.mean(0), mean)
    # the sample variance of a near-normal variable has relative sd sqrt(2 / (T - 1))
    assert np.all(np.abs(s.var(0, ddof=1) / var - 1) <= Z * np.sqrt(2 / (T - 1))), (s.var(0, ddof=1), var)
    # identical rows draw their own masks; keyed per example and sample: another chunking, the same bits
    assert not np.array_equal(s[:, 0], s[:, 1])
    first = res.samples[:40]
    assert np.array_equal(first, run_mc(runner, [xs], 40, seed=0, batch_size=5).samples)
    assert np.array_equal(first[:, 2:4], run_mc(runner, [xs[2:4]], 40, seed=0, index_offset=2).samples)
    assert not np.array_equal(first, run_mc(runner, [xs], 40, seed=1).samples)


def test_cli_says_why_and_analyze_refuses(files):
    d, _, _ = files
    res = cli_split("uncertainty", d / "baked.onnx", "--inject", "standard", "--p", "0.5", "--after", "relu",
                    "--input", d / "x.npy", "-T", "4", "--json")
    assert "fixed batch of 2" in res.stderr
    assert len(json.loads(res.stdout)["examples"]) == 5
    out = d / "baked_mc.onnx"
    cli_split("inject", d / "baked.onnx", "--after", "relu", "--p", "0.5", "-o", out)
    cli_err("analyze", out, "--input", d / "x.npy", "-T", "4", contains=("batch size it was saved with (2)",))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_training_frees_a_generic_batch_and_refuses_a_baked_one(files, fmt):
    d, _, xs = files
    cli_err("prune", d / f"baked.{fmt}", "--data", d / "train.npz", "-o", d / f"never.{fmt}",
            contains=("fixed batch of 2", "dynamic batch"))
    assert not (d / f"never.{fmt}").exists()
    out = d / f"mlp_ft.{fmt}"
    cli_split("finetune", d / f"mlp_static.{fmt}", "--data", d / "train.npz", "--variant", "concrete", "--after", "relu",
              "--epochs", "1", "-o", out)
    # the written model runs at any batch, and equals the original (batch 1) row by row in inference mode
    if fmt == "onnx":
        orig = ort.InferenceSession(str(d / "mlp_static.onnx"), providers=["CPUExecutionProvider"])
        ref = np.concatenate([orig.run(None, {"x": xs[i:i + 1]})[0] for i in range(len(xs))])
        got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": xs})[0]
    else:
        with torch.no_grad():
            orig = torch.export.load(str(d / "mlp_static.pt2")).module()
            ref = np.concatenate([orig(torch.from_numpy(xs[i:i + 1])).numpy() for i in range(len(xs))])
            got = torch.export.load(str(out)).module()(torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_bert_exported_with_the_exporters_defaults(tmp_path):
    """A hub-style ONNX BERT: the legacy exporter without dynamic_axes bakes batch 1 (and the
    sequence length) into its reshapes. Default inject, then MC at its batch; the deterministic
    pass equals onnxruntime's run of the original file row by row."""
    pytest.importorskip("transformers")
    from zoo import build_bert

    model = build_bert(torchscript=True)
    ids = torch.randint(1, 60, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    path = tmp_path / "bert.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], opset_version=17,
                          dynamo=False)
    rng = np.random.default_rng(0)
    x = {"input_ids": rng.integers(1, 60, (3, 8)), "attention_mask": np.ones((3, 8), dtype=np.int64)}
    x["attention_mask"][1, 6:] = 0
    runner = build_runner(str(path), None, "cpu", {"variant": "standard", "p": 0.2})
    assert isinstance(runner, FixedBatchRunner) and runner.batch == 1
    feeds = [x["input_ids"], x["attention_mask"]]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"input_ids": x["input_ids"][i:i + 1], "attention_mask": x["attention_mask"][i:i + 1]})[0]
                          for i in range(3)])
    np.testing.assert_allclose(runner.run_eval(feeds), ref, rtol=1e-5, atol=1e-5)
    res = run_mc(runner, feeds, 6, seed=0)
    assert res.samples.shape == (6, 3, ref.shape[1]) and np.isfinite(res.samples).all()
    assert not np.array_equal(res.samples[0], res.samples[1])
