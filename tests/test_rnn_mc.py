"""MC dropout on recurrent classifiers where the recurrent layer returns (output, state).

ONNX: tensors that cross the prefix/suffix cut are tiled along their own batch axis.

An ONNX LSTM/GRU reads ``X [seq, batch, in]`` and an initial state ``[dirs, batch, hidden]``
(built by the exporter from the input's batch) and writes ``Y [seq, dirs, batch, hidden]``: batch
is axis 1 or 2, not 0. The MC engine finds each crossing value's batch axis by symbolic shape
inference and tiles it there; tiled along axis 0, onnxruntime refused the state
(``Input initial_h must have shape {1,32,24}``).

Checked here on the legacy exporter's graphs (the zoo tier runs both exporters' LSTM/GRU through
``uncertainty``): the batch axes found, the eval pass equal to onnxruntime on the original file,
seeded MC reproducible, and each example's MC logits distributed as a dropout of the same LSTM
output computed in torch (mean and variance, tolerances from the sample variance).

Torch, symbolic traces (pickle, state_dict): an ``nn.LSTM`` module call returns a tuple; the
default site goes on the output sequence (``getitem(call, 0)``), never on the tuple, and the
injected model samples the same distribution; the state_dict's TorchScript output runs at a batch
size other than the traced one.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import dropcli
from dropcli.backends.onnx.model import OnnxModel
from dropcli.engines.factory import make_runner
from dropcli.engines.onnx_mc import OnnxRunner, batch_axes
from helpers import assert_same_distribution, ort_session
from tests import zoo
from tests.zoo import VOCAB, RNNClassifier

P = 0.3
T = 400
B = 3  # != the export's batch
SEQ = 6


class BiRNN(nn.Module):
    """Two bidirectional LSTMs in a row: Y is [seq, 2, batch, hidden], and the second layer's
    input and initial state cross the cut (a site sits after each layer)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = nn.LSTM(16, 12, bidirectional=True, batch_first=True)
        self.rnn2 = nn.LSTM(24, 12, bidirectional=True, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, input_ids):
        out, _ = self.rnn(self.embed(input_ids))
        out, _ = self.rnn2(out)
        return self.head(out[:, -1])


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["lstm", "gru", "bilstm"])
def case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("rnn_onnx")
    torch.manual_seed(0)
    model = (BiRNN() if request.param == "bilstm" else RNNClassifier(request.param)).eval()
    src = d / f"{request.param}.onnx"
    torch.onnx.export(model, (_tokens(2),), str(src), dynamo=False, opset_version=17, input_names=["input_ids"],
                      output_names=["out"], dynamic_axes={"input_ids": {0: "batch"}, "out": {0: "batch"}})
    m = dropcli.load(str(src))
    from dropcli.api.models import inject_sites

    sites = inject_sites(m, "standard", p=P)
    layers = [mod for mod in model.modules() if isinstance(mod, (nn.LSTM, nn.GRU))]
    assert [s["kind"] for s in sites] == [type(r).__name__.lower() for r in layers], sites
    out = d / f"{request.param}_mc.onnx"
    dropcli.save(m, str(out))
    return request.param, model, src, OnnxRunner(OnnxModel.load(out), "cpu")


def test_batch_axes_follow_the_recurrent_layout(case):
    name, _, src, _ = case
    m = onnx.load(str(src))
    g = onnx.shape_inference.infer_shapes(m, data_prop=True).graph
    axes = batch_axes({v.name: v for v in [*g.value_info, *g.input, *g.output]}, {"batch"})
    rec = [n for n in m.graph.node if n.op_type in ("LSTM", "GRU")]
    assert rec
    for n in rec:
        assert axes[n.input[0]] == 1, "X is [seq, batch, in]"
        assert axes[n.output[0]] == 2, "Y is [seq, dirs, batch, hidden]"
        states = [x for x in n.input[5:] if x]
        assert states and all(axes[x] == 1 for x in states), "initial states are [dirs, batch, hidden]"
    assert axes["out"] == 0


def test_eval_pass_is_the_original(case):
    _, _, src, runner = case
    x = _tokens(B, seed=1).numpy()
    want = ort_session(onnx.load(str(src))).run(None, {"input_ids": x})[0]
    got = runner.run_eval([x])
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-6


def test_mc_samples_per_example_like_torch(case):
    name, model, _, runner = case
    x = _tokens(B, seed=1)
    got = runner.run([x.numpy()], list(range(B)), seed=0, T=T)
    assert got.shape == (B, T, 3)
    np.testing.assert_array_equal(got, runner.run([x.numpy()], list(range(B)), seed=0, T=T))  # --seed repeats
    assert not np.array_equal(got, runner.run([x.numpy()], list(range(B)), seed=1, T=T))
    ref = _reference(model, x)
    _same(got, ref, name)
    # the site's noise [seq, dirs, rows, hidden] is fed from KeyedNoise, rows moved to axis 2
    assert runner.batch_invariant and [f.kind for f in runner.noise_feeds] == ["keep"] * len(runner.noise_feeds)
    chunked = np.concatenate([runner.run([x[:1].numpy()], [0], seed=0, T=T), runner.run([x[1:].numpy()], [1, 2], seed=0, T=T)])
    np.testing.assert_array_equal(chunked, got)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_onnx_mc_equals_torch_mc(cell, tmp_path):
    """The same model as ONNX and as a pickle, the default site on the recurrent output: the two
    engines draw the same keyed keep-masks (per example [seq, hidden] in torch, [seq, 1, hidden]
    in ONNX: the same bits in the same order), so the MC samples agree to float rounding."""
    from dropcli.api.models import inject_sites

    torch.manual_seed(0)
    model = RNNClassifier(cell).eval()
    x = _tokens(B, seed=1)
    src = tmp_path / "m.onnx"
    torch.onnx.export(model, (_tokens(2),), str(src), dynamo=False, opset_version=17, input_names=["input_ids"],
                      output_names=["out"], dynamic_axes={"input_ids": {0: "batch"}, "out": {0: "batch"}})
    torch.save(model, str(tmp_path / "m.pt"))
    got = {}
    for path, opts in [(src, {}), (tmp_path / "m.pt", zoo.load_options(zoo.ZOO[cell], "pickle"))]:
        m = dropcli.load(str(path), **opts)
        inject_sites(m, "standard", p=P)
        got[path.suffix] = make_runner(m, "cpu").run([x.numpy()], list(range(B)), seed=3, T=64)
    assert np.unique(got[".pt"]).size > 64
    np.testing.assert_allclose(got[".onnx"], got[".pt"], rtol=0, atol=1e-5)


def _reference(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """[B, T, C] logits: dropout p after each recurrent layer's output sequence, T independent
    masks per example, written out in torch."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        h = model.embed(x).repeat_interleave(T, 0)
        for layer in [mod for mod in model.modules() if isinstance(mod, (nn.LSTM, nn.GRU))]:
            h, _ = layer(h)
            h = h * (torch.rand(h.shape, generator=g) >= P).float() / (1 - P)
        return model.head(h[:, -1]).reshape(len(x), T, -1).numpy()


def _same(got: np.ndarray, ref: np.ndarray, name: str) -> None:
    for i in range(len(got)):
        assert np.unique(got[i, :, 0]).size > T // 4, f"example {i}: the samples barely vary"
        for c in range(ref.shape[-1]):
            assert_same_distribution(got[i, :, c], ref[i, :, c], f"{name} example {i} class {c}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("fmt", ["pickle", "state_dict"])
def test_symbolic_trace_site_on_the_output_sequence(cell, fmt, tmp_path):
    from dropcli.api.models import inject_sites

    entry = zoo.ZOO[cell]
    src = zoo.save(entry, fmt, tmp_path)
    m = dropcli.load(str(src), **zoo.load_options(entry, fmt))
    row = next(r for r in m.layers() if r.kind == cell)
    assert row.name == "rnn" and row.shape[-2:] == [zoo.SEQ, 24], (row.name, row.shape)
    sites = inject_sites(m, "standard", p=P)
    assert [(s["at"], s["kind"]) for s in sites] == [("rnn", cell)], sites
    site = next(n for n in m.gm.graph.nodes if n.op == "call_module" and n.target == sites[0]["site"])
    src_node = site.args[0]
    assert src_node.target is operator.getitem and src_node.args[1] == 0, "the site must read the output sequence"
    assert m.gm.get_submodule(src_node.args[0].target).__class__ is (nn.LSTM if cell == "lstm" else nn.GRU)
    model = entry.build().eval()
    if fmt == "state_dict":  # written as TorchScript: equal to the original at another batch size
        out = tmp_path / "mc.pt"
        dropcli.save(m, str(out))
        ts = torch.jit.load(str(out))
        with torch.no_grad():
            np.testing.assert_allclose(ts(_tokens(5, seed=2)).numpy(), model(_tokens(5, seed=2)).detach().numpy(),
                                       rtol=0, atol=1e-5)
    x = _tokens(B, seed=1)
    runner = make_runner(m, "cpu")  # (the runner puts the model's sites in MC mode)
    np.testing.assert_allclose(runner.run_eval([x.numpy()]), model(x).detach().numpy(), rtol=0, atol=1e-6)
    got = runner.run([x.numpy()], list(range(B)), seed=0, T=T)
    _same(got, _reference(model, x), f"{cell}/{fmt}")
