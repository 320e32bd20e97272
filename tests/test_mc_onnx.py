"""The ONNX MC engine (dropcli.engines.onnx_mc.OnnxRunner): one session run per chunk over a rewritten
graph whose prefix runs once on the B examples and whose noise is fed from KeyedNoise.

Models are the tests' real ones (MLP, CNN with BatchNorm, ResBlock), exported with
torch.onnx.export and injected through the real ONNX backend. Seeds are fixed; statistical
tolerances come from tests/helpers.py (6 standard errors).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dropcli.backends import load_model
from dropcli.backends.onnx.model import MC_INPUT, OnnxModel
from dropcli.engines.runner import TorchRunner, run_mc
from dropcli.engines.onnx_mc import OnnxRunner
from dropcli.engines.noise import SAMPLE_BLOCK
from dropcli.backends.plan import apply_inject, plan_inject
from dropcli.model.selection import Selection
from dropcli.variants import get_variant, load_all
from helpers import assert_same_distribution, binom_tol, ort_session
from models import CNN, MLP, ResBlock, randomise_bn, save_as

load_all()


class CNNView(CNN):
    """The CNN with the batch size read at the top and used at the end (x.view(n, -1)): its
    Shape -> Gather -> Concat chain sits in the prefix and feeds a Reshape in the suffix."""

    def forward(self, x):
        n = x.size(0)
        x = self.features(x)
        return self.head(self.drop(x.view(n, -1)))


def _inject(model, variant: str = "standard", p: float = 0.3, layers: list[str] | None = None):
    spec = get_variant(variant)
    params = spec.resolve_params({"p": p})
    sel = Selection(layers=layers or [])
    apply_inject(model, spec, params, plan_inject(model, spec, sel))
    return model


def _example(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return MLP().eval(), torch.randn(2, 64)
    if name == "cnn":
        return randomise_bn(CNN()), torch.randn(2, 1, 8, 8)
    if name == "cnnview":
        return randomise_bn(CNNView()), torch.randn(2, 1, 8, 8)
    return randomise_bn(ResBlock()), torch.randn(2, 1, 8, 8)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path, torch.nn.Module]]:
    d = tmp_path_factory.mktemp("mc_onnx")
    out = {}
    for name in ("mlp", "cnn", "cnnview", "res"):
        mod, ex = _example(name)
        out[name] = (save_as(mod, ex, d / f"{name}.onnx", "onnx"), save_as(mod, ex, d / f"{name}.pt2", "export"), mod)
    return out


def _data(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + shape).astype(np.float32)


def _runner(path: Path, **kw) -> OnnxRunner:
    return OnnxRunner(_inject(OnnxModel.load(path), **kw), "cpu")


SHAPES = {"mlp": (64,), "cnn": (1, 8, 8), "cnnview": (1, 8, 8), "res": (1, 8, 8)}


# ----------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("name", ["mlp", "cnn", "res"])
def test_seeded_runs_are_bitwise_identical_and_seeds_differ(files, name):
    r = _runner(files[name][0])
    x = _data(SHAPES[name], 20)
    a = run_mc(r, [x], 16, seed=7).samples
    b = run_mc(_runner(files[name][0]), [x], 16, seed=7).samples  # a fresh runner and session
    c = run_mc(r, [x], 16, seed=8).samples
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert r.batch_invariant


@pytest.mark.parametrize("name", ["mlp", "cnnview", "res"])
def test_samples_do_not_depend_on_batch_neighbours_or_chunking(files, name):
    r = _runner(files[name][0])
    n, T = 45, SAMPLE_BLOCK + 6
    x = _data(SHAPES[name], n, seed=1)
    ref = run_mc(r, [x], T, seed=3, batch_size=64)  # one chunk
    assert ref.chunks == 1
    small = run_mc(r, [x], T, seed=3, batch_size=7)  # chunks of 7 examples (padded to MIN_ROWS)
    assert small.chunks == 7
    assert np.array_equal(ref.samples, small.samples)
    # a memory budget that fits one SAMPLE_BLOCK of one example: chunks over examples and over T
    rb = r.row_bytes([x])
    tiny = run_mc(r, [x[:4]], T, seed=3, batch_size=64, max_memory=rb * SAMPLE_BLOCK)
    assert tiny.examples_per_chunk == 1 and tiny.chunks == 4 * 2
    assert np.array_equal(ref.samples[:, :4], tiny.samples)
    # an example among other neighbours, at another position in its batch: same samples
    idx = [30, 2, 44]
    own = r.run([x[idx]], idx, seed=3, T=T)
    assert np.array_equal(own, np.swapaxes(ref.samples[:, idx], 0, 1).reshape(own.shape))
    # a sample chunk that starts at a SAMPLE_BLOCK boundary repeats the same samples
    part = r.run([x[idx]], idx, seed=3, T=T - SAMPLE_BLOCK, t0=SAMPLE_BLOCK)
    assert np.array_equal(part, own[:, SAMPLE_BLOCK:])


def test_multi_chunk_budget_path_matches_and_respects_budget(files):
    r = _runner(files["cnn"][0])
    x = _data(SHAPES["cnn"], 70, seed=2)
    T = 20
    rb = r.row_bytes([x])
    # row_bytes from shape inference: at least the site's [16*8*8] float input and its bool mask
    assert rb >= 8 * 8 * 8 * (4 + 1)
    budget = rb * T * 9  # 9 examples of T samples per chunk
    res = run_mc(r, [x], T, seed=0, batch_size=256, max_memory=budget)
    assert res.examples_per_chunk == 9 and res.chunks == 8
    full = run_mc(r, [x], T, seed=0, batch_size=256)
    assert full.chunks == 1
    assert np.array_equal(res.samples, full.samples)
    assert np.array_equal(res.eval, full.eval)


def test_next_chunks_noise_is_drawn_in_the_background_with_the_same_bits(files, monkeypatch):
    """run_mc tells the runner which chunk comes next; its noise is drawn in a background thread
    while the session runs. Every chunk after the first is drawn there, and the samples are bit
    for bit those drawn on demand (including a short last chunk and chunks split over T)."""
    import threading

    r = _runner(files["cnn"][0])
    x = _data(SHAPES["cnn"], 45, seed=4)
    where: list[str] = []
    draw = r.draw_noise

    def spy(*a, **k):
        where.append(threading.current_thread().name)
        return draw(*a, **k)

    monkeypatch.setattr(r, "draw_noise", spy)
    ahead = run_mc(r, [x], 40, seed=5, batch_size=20)
    assert ahead.chunks == 3 and len(where) == 3
    assert where[0] == threading.current_thread().name and all(w.startswith("dropcli-noise") for w in where[1:])
    split = run_mc(r, [x[:6]], 40, seed=5, batch_size=20, max_memory=r.row_bytes([x]) * 32)  # one example, T: 32 + 8
    assert split.chunks == 2 * 6
    monkeypatch.setattr(OnnxRunner, "draws_ahead", False)
    where.clear()
    plain = run_mc(r, [x], 40, seed=5, batch_size=20)
    assert set(where) == {threading.current_thread().name}
    np.testing.assert_array_equal(ahead.samples, plain.samples)
    np.testing.assert_array_equal(split.samples, plain.samples[:, :6])


# ----------------------------------------------------------------------------- eval and p = 0
@pytest.mark.parametrize("name", ["mlp", "cnn", "res"])
def test_eval_reproduces_the_original_model_and_p0_equals_eval(files, name):
    path = files[name][0]
    x = _data(SHAPES[name], 40, seed=4)
    model = _inject(OnnxModel.load(path), p=0.0)
    # the injected model in a DEFAULT session, dropcli_mc at its default (False)
    plain = ort_session(model.model).run(None, {"x": x})[0]
    r = OnnxRunner(model, "cpu")
    assert r.n_sites > 0
    ev = r.run_eval([x])
    assert np.array_equal(ev, plain)
    one = run_mc(r, [x], 1, seed=0)
    assert np.array_equal(one.samples[0], ev)
    # the model before injection: the sites split onnxruntime's fusions, so equal to rounding
    before = ort_session(onnx.load(str(path))).run(None, {"x": x})[0]
    np.testing.assert_allclose(ev, before, rtol=0, atol=1e-6)
    # and the torch module itself
    ref = files[name][2](torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ev, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- torch agreement
@pytest.mark.parametrize("name", ["mlp", "cnnview", "res"])
def test_samples_agree_with_the_torch_engine(files, name):
    """Both engines draw each site's keep-mask from KeyedNoise with the same call numbers, so
    the SAMPLES agree (not just their distribution) up to float rounding of the two kernels."""
    onnx_path, pt2_path, _ = files[name]
    ro = _runner(onnx_path, p=0.3)
    rt = TorchRunner(_inject(load_model(pt2_path), p=0.3), "cpu")
    assert ro.n_sites == rt.n_sites and ro.n_sites >= 2
    x = _data(SHAPES[name], 40, seed=5)
    a = run_mc(ro, [x], 48, seed=11)
    b = run_mc(rt, [x], 48, seed=11)
    scale = float(np.abs(b.samples).max())
    np.testing.assert_allclose(a.samples, b.samples, rtol=0, atol=1e-5 * max(scale, 1.0))
    np.testing.assert_allclose(a.eval, b.eval, rtol=0, atol=1e-5 * max(scale, 1.0))
    # sanity: the samples really vary
    assert float(a.samples.std(0).mean()) > 1e-3


def test_ranked_variant_distribution_matches_torch(files):
    """dropact draws Gumbel keys from fed uniforms: samples agree with torch to rounding too,
    unless the ranking flips on a near tie; check the per-output MC mean/variance within 6 se."""
    onnx_path, pt2_path, _ = files["mlp"]
    ro = _runner(onnx_path, variant="dropact", p=0.3)
    rt = TorchRunner(_inject(load_model(pt2_path), variant="dropact", p=0.3), "cpu")
    x = _data(SHAPES["mlp"], 8, seed=6)
    a = run_mc(ro, [x], 400, seed=1).samples
    b = run_mc(rt, [x], 400, seed=2).samples  # independent draws: a two-sample test
    for k in range(3):
        assert_same_distribution(a[:, 0, k], b[:, 0, k], f"dropact output {k}")


# ----------------------------------------------------------------------------- stock Dropout
def _dropout_graph(ratio: float, training: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 500])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 500])
    inits = [onnx.numpy_helper.from_array(np.array(ratio, dtype=np.float32), "ratio"),
             onnx.numpy_helper.from_array(np.array(training), "training")]
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="act"),
             helper.make_node("Dropout", ["h", "ratio", "training"], ["y", "mask"], name="drop")]
    g = helper.make_graph(nodes, "d", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_stock_dropout_nodes_become_sites_with_their_rate(ratio):
    r = OnnxRunner(OnnxModel(_dropout_graph(ratio, training=True), "t"))
    assert r.n_sites == 1 and r.site_names() == ["drop"]
    assert not any(n.op_type == "Dropout" for n in r.mc_model.graph.node)
    x = np.abs(_data((500,), 40, seed=7)) + 0.5
    s = r.run([x], list(range(40)), seed=0, T=20)  # [40, 20, 500]
    dropped = float((s == 0).mean())
    assert abs(dropped - ratio) <= binom_tol(ratio, s.size)
    kept = s != 0
    np.testing.assert_allclose(s[kept], np.broadcast_to(x[:, None] / (1 - ratio), s.shape)[kept], rtol=1e-6)
    # eval: dropout off, although the graph says training_mode = True
    assert np.array_equal(r.run_eval([x]), x)


def test_exported_training_mode_mlp_dropout(tmp_path):
    torch.manual_seed(0)
    m = MLP(p=0.4).eval()
    path = tmp_path / "mlp_drop.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, 64),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING)
    om = OnnxModel.load(path)
    assert sum(n.op_type == "Dropout" for n in om.model.graph.node) == 1
    r = OnnxRunner(om)
    assert r.n_sites == 1 and [f.q for f in r.noise_feeds] == [pytest.approx(0.6)]
    x = _data((64,), 40, seed=8)
    res = run_mc(r, [x], 32, seed=0)
    assert float(res.samples.std(0).mean()) > 1e-3
    ref = m(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(res.eval, ref, rtol=1e-4, atol=1e-5)
    # the same model traced to TorchScript (aten::dropout frozen off): the torch engine draws
    # the same masks, so the samples agree
    ts = save_as(m, torch.randn(2, 64), tmp_path / "mlp_drop.ts", "torchscript")
    rt = TorchRunner(load_model(ts), "cpu")
    b = run_mc(rt, [x], 32, seed=0)
    np.testing.assert_allclose(res.samples, b.samples, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- structure
def test_one_session_run_per_chunk_and_prefix_runs_on_B_rows(files):
    r = _runner(files["cnnview"][0])
    g = r.mc_model.graph
    names = {i.name for i in g.input}
    assert MC_INPUT not in names and "dropcli_T" in names and "x" in names
    assert not any(n.op_type == "Where" and MC_INPUT in n.input for n in g.node)
    first_conv = next(n for n in g.node if n.op_type == "Conv")
    assert first_conv.name in r.prefix_nodes and first_conv.input[0] == "x"  # the untiled input
    assert first_conv.name not in r.suffix_nodes
    assert all(r.prefix_nodes.index(n) >= 0 for n in r.prefix_nodes)
    # the batch-size chain (Shape -> Gather -> ... -> Concat) is recomputed in the suffix
    assert r.duplicated_nodes, "the view(n, -1) shape chain should be duplicated"
    reshape = next(n for n in g.node if n.op_type == "Reshape" and n.name in r.suffix_nodes and "/dropcli_" not in n.name)
    assert reshape.input[1].endswith("__dropcli_dup")

    calls = []
    x = _data(SHAPES["cnnview"], 50, seed=9)
    r.run([x[:2]], [0, 1], 0, 2)  # create the session
    sess = r._mc_session
    real = sess.run

    def counting(*a, **kw):
        out = real(*a, **kw)
        calls.append(out[0].shape[0])
        return out

    sess.run = counting
    res = run_mc(r, [x], 10, seed=0, batch_size=40)
    assert res.chunks == 2 and len(calls) == 2
    assert calls == [40 * 10, 32 * 10]  # the last chunk of 10 examples is padded to MIN_ROWS

    # the prefix really runs on B rows: expose the first conv's output and check its batch
    m = onnx.ModelProto()
    m.CopyFrom(r.mc_model)
    m.graph.output.append(helper.make_empty_tensor_value_info(first_conv.output[0]))
    feeds = {"x": x[:40], "dropcli_T": np.array([10], dtype=np.int64)}
    feeds.update(r.draw_noise(0, list(range(40)), 0, 10))
    outs = ort_session(m).run(None, feeds)
    assert outs[0].shape[0] == 400 and outs[1].shape[0] == 40


def test_model_without_sites_has_none_and_cuda_needs_the_provider(files):
    r = OnnxRunner(OnnxModel.load(files["mlp"][0]))
    assert r.n_sites == 0 and r.mc_model is None
    assert [(s.name, s.shape, s.dtype) for s in r.input_specs()] == [("x", [None, 64], np.dtype(np.float32))]
    import onnxruntime as ort

    from dropcli.errors import DropcliError
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(DropcliError, match="CUDAExecutionProvider"):
            OnnxRunner(OnnxModel.load(files["mlp"][0]), "cuda")


def test_in_graph_rng_site_is_reproducible_but_flagged(files):
    """dropcorr's [N, N] noise depends on the batch beyond dim 0: it stays in-graph RNG with a
    seed derived from --seed; the runner says it is not batch-invariant."""
    r = _runner(files["mlp"][0], variant="dropcorr", p=0.3)
    assert not r.batch_invariant and len(r.ingraph_random) == r.n_sites
    x = _data(SHAPES["mlp"], 40, seed=10)
    a = run_mc(r, [x], 8, seed=1).samples
    b = run_mc(r, [x], 8, seed=1).samples
    c = run_mc(r, [x], 8, seed=2).samples
    assert np.array_equal(a, b) and not np.array_equal(a, c)
