"""A model that indexes its own batch: ``logits[arange(batch), last]``, the pooling of
transformers' decoder classifiers (GPT-2, Llama, Mistral ... ForSequenceClassification).

``arange(batch)`` is made from the input's size alone. The MC engines run the layers after the
first site on B*T tiled rows: such a tensor must be rebuilt at B*T there, not tiled (tiled, it
reads [0, 0, ..., 1, 1, ...] and picks example 0's samples for every example). Checked on the
written .pt2 (torch engine) and ONNX: every example's MC mean matches its own deterministic
output within the sampling error, and the two engines agree in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dropcli.engines.factory import build_runner
from dropcli.engines.runner import run_mc

from helpers import Z

S, F, K = 5, 6, 3


class LastTokenClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop, self.out = nn.Linear(F, 32), nn.Dropout(0.3), nn.Linear(32, K)

    def forward(self, x):  # x [N, S, F]; the "last token" of a row: how many of its positions are positive
        logits = self.out(self.drop(torch.relu(self.fc(x))))
        last = (x[..., 0] > 0).sum(-1).clamp(max=S - 1)
        return logits[torch.arange(x.shape[0]), last]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bidx")
    torch.manual_seed(0)
    m = LastTokenClassifier().eval()
    x = torch.randn(2, S, F)
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=({0: batch},)), str(d / "m.pt2"))
    torch.onnx.export(m, (x,), str(d / "m.onnx"), input_names=["x"], dynamic_axes={"x": {0: "N"}}, opset_version=17,
                      dynamo=False, training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    rng = np.random.default_rng(1)
    xs = (rng.standard_normal((6, S, F)) * np.arange(1, 7)[:, None, None]).astype(np.float32)  # rows far apart
    return d, xs


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_each_example_samples_its_own_rows(files, fmt):
    d, xs = files
    runner = build_runner(str(d / f"m.{fmt}"), None, "cpu", None)
    assert runner.n_sites == 1
    T = 400
    res = run_mc(runner, [xs], T, seed=0)
    s = res.samples.astype(np.float64)  # [T, N, K]
    mean, sd = s.mean(0), s.std(0, ddof=1)
    # inverted dropout before a linear layer: E[output] = the deterministic output, per example
    assert np.all(np.abs(mean - res.eval) <= Z * sd / np.sqrt(T) + 1e-6), (mean, res.eval)
    assert not np.allclose(s[:, 0], s[:, 1])


def test_engines_agree_in_distribution(files):
    d, xs = files
    a = run_mc(build_runner(str(d / "m.pt2"), None, "cpu", None), [xs], 400, seed=0).samples.astype(np.float64)
    b = run_mc(build_runner(str(d / "m.onnx"), None, "cpu", None), [xs], 400, seed=1).samples.astype(np.float64)
    se = np.sqrt(a.var(0, ddof=1) / 400 + b.var(0, ddof=1) / 400)
    assert np.all(np.abs(a.mean(0) - b.mean(0)) <= Z * se + 1e-6)
    np.testing.assert_allclose(a.std(0), b.std(0), rtol=Z * np.sqrt(1 / 400), atol=1e-6)
