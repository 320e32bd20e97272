"""dropcli.engines.keyed: the numpy MT19937 streams are bit for bit torch's CPU generator, so the
keep-masks of both engines (and of every earlier release) stay the same for a seed; an ONNX MC
run imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dropcli.engines import keyed
from dropcli.engines.keyed import SAMPLE_BLOCK, keep_masks, mt_words, raw_words
from dropcli.engines.noise import KeyedNoise

ROOT = Path(__file__).resolve().parents[1]


def _torch_words(seed: int, n: int) -> np.ndarray:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=g).numpy().view(np.uint64)


def _reference_raw(seed, call, indices, t0, t1, rest, per_word):
    """The draw as torch makes it: one seeded torch generator per (example, sample block)."""
    out = []
    for i in indices:
        for b0 in range(t0, t1, SAMPLE_BLOCK):
            n = min(b0 + SAMPLE_BLOCK, t1) - b0
            g = torch.Generator()
            g.manual_seed(keyed.key(seed, call, i, b0 // SAMPLE_BLOCK))
            out.append(torch.randint(-(2**63), 2**63 - 1, (n * rest // per_word,), dtype=torch.int64, generator=g))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("how", ["vector", "numpy", "torch"])
@pytest.mark.parametrize("n", [1, 311, 312, 700, 1900, 2100])  # within one state, at its end, over several twists; numpy: staged, then not
def test_mt_words_are_torch_randint(n, how):
    seeds = [0, 1, 5489, 2**32 + 7, 2**63 - 1, 987654321987]  # the generator keeps the low 32 bits
    got = mt_words(np.array(seeds, dtype=np.uint64), n, how)
    assert got.shape == (len(seeds), n)
    for k, s in enumerate(seeds):
        np.testing.assert_array_equal(got[k], _torch_words(s, n), err_msg=f"seed {s}")


def test_keys_are_key_per_example():
    idx = [0, 1, 7, -1, -2, 2**40]
    assert keyed.keys(3, 5, idx, 1) == [keyed.key(3, 5, i, 1) for i in idx]


def test_numpy_words_staged_in_parts_are_the_same(monkeypatch):
    """The numpy path stages a bounded number of outputs at once: generators split over several
    staging passes give the same words, also into rows that are a slice of a wider array."""
    seeds = np.array([0, 1, 5489, 2**32 + 7, 2**63 - 1], dtype=np.uint64)
    ref = mt_words(seeds, 40, "vector")
    monkeypatch.setattr(keyed, "_STAGE_WORDS", 160)  # two generators a pass
    wide = np.zeros((5, 50), dtype=np.uint64)
    mt_words(seeds, 40, "numpy", out=wide[:, 5:45])
    np.testing.assert_array_equal(wide[:, 5:45], ref)
    assert not wide[:, :5].any() and not wide[:, 45:].any()


@pytest.mark.parametrize("indices,t0,t1,rest,per_word", [
    ([0, 1, 2, -1, -2], 0, 50, 512, 64),  # two blocks of unequal length, padded rows' negative indices
    ([7, 9], 32, 50, 64, 8),  # a chunk starting at the second block
    ([3], 0, 20, 12, 4),
    ([1, 2], 0, 33, 5, 64),  # not word-aligned: None
    ([0, 5, -1], 0, 40, 256, 4),  # long streams (2048 words a generator): one generator after the other
])
def test_raw_words_match_one_torch_generator_per_example_and_block(indices, t0, t1, rest, per_word):
    got = raw_words(11, 3, indices, t0, t1, rest, per_word)
    if any((min(b + SAMPLE_BLOCK, t1) - b) * rest % per_word for b in range(t0, t1, SAMPLE_BLOCK)):
        assert got is None
        return
    np.testing.assert_array_equal(got, _reference_raw(11, 3, indices, t0, t1, rest, per_word))


@pytest.mark.parametrize("q", [0.5, 0.75, 0.3, 1.0, 0.0])
def test_keep_masks_are_the_torch_engines_and_have_rate_q(q):
    idx = list(range(40))
    rest = (16,)
    kn = KeyedNoise(5, idx, 0, 64)
    kn.call = 2
    ref = kn.keep_mask_like(torch.empty((40 * 64,) + rest), q).numpy()
    # two requests in one pass: the second must not change the first
    got, other = keep_masks(5, idx, 0, 64, [(2, rest, q), (3, (8,), 0.5)])
    np.testing.assert_array_equal(got, ref)
    assert other.shape == (40 * 64, 8)
    n = got.size
    se = np.sqrt(q * (1 - q) / n)
    assert abs(got.mean() - q) <= 5 * se + 1e-12  # the realised keep rate (q quantised to 1/65536)
    # as a float mask {0, 1/q} (what the ONNX engine feeds to one Mul): the same draws
    scale = 1.0 / q if q > 0 else 1.0
    (f,) = keep_masks(5, idx, 0, 64, [(2, rest, q)], [scale])
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, np.where(ref, np.float32(scale), np.float32(0)))


def test_onnx_uncertainty_imports_no_torch(tmp_path):
    """`dropcli uncertainty` on an ONNX model (standard sites, the default device) runs without torch."""
    from dropcli.backends import load_model
    from dropcli.backends.plan import apply_inject, plan_inject
    from dropcli.model.selection import Selection
    from dropcli.variants import get_variant

    src = ROOT / "examples" / "digits_mlp.onnx"
    m = load_model(str(src))
    spec = get_variant("standard")
    apply_inject(m, spec, spec.resolve_params({"p": 0.5}), plan_inject(m, spec, Selection.from_options("relu", None, None, False)))
    mc = tmp_path / "mc.onnx"
    m.save(str(mc))
    # each standard site is one Mul by a fed float mask {0, 1/q}: no Cast or second Mul per pass; the
    # first site multiplies the untiled value [B, 1, H] by the mask seen as [B, T, H] (no Expand)
    from dropcli.engines.onnx_mc import OnnxRunner

    r = OnnxRunner(load_model(str(mc)))
    nodes = r.mc_model.graph.node
    assert len(r.noise_feeds) == 2 and not any(n.op_type == "Expand" for n in nodes)
    for feed in r.noise_feeds:
        assert feed.scale == 2.0
        (reader,) = [n for n in nodes if feed.name in n.input]
        if reader.op_type == "Reshape":  # the first site: mask as [B, T, H]
            (reader,) = [n for n in nodes if reader.output[0] in n.input]
            assert any(x.endswith("__dropcli_unsq") for x in reader.input)
        assert reader.op_type == "Mul"
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32))
    probe = (
        "import json, sys\n"
        "from dropcli.cli.main import app\n"
        "try:\n    app(args=sys.argv[1:], prog_name='dropcli')\n"
        "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, "-q", "uncertainty", str(mc), "--input", str(x), "-T", "40",
                        "--output", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"code": 0, "torch": False}
    with np.load(tmp_path / "out.npz") as z:
        assert z["mutual_info"].shape == (40,) and float(z["mutual_info"].mean()) > 0


def _saved_mlp(tmp_path, sites):
    import warnings

    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), sites[0], nn.Linear(16, 16), nn.ReLU(), sites[1],
                      nn.Linear(16, 3)).eval()
    path = tmp_path / "m.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(m, (torch.randn(2, 12),), dynamic_shapes=({0: torch.export.Dim.AUTO},)),
                          str(path))
    return str(path)


def test_torch_site_on_the_untiled_value_gives_the_tiled_paths_samples(tmp_path):
    """Stock dropout right after the prefix multiplies its mask by the value seen as [B, 1, ...]
    instead of T tiled copies: the samples are bit for bit those of the tiled path."""
    from torch import nn

    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, run_mc

    r = TorchRunner(load_model(_saved_mlp(tmp_path, [nn.Dropout(0.5), nn.Dropout(0.3)])))
    x = np.random.default_rng(1).standard_normal((45, 12)).astype(np.float32)
    hits = []
    fuse = r.engine._site_on_untiled
    r.engine._site_on_untiled = lambda *a, **k: hits.append(fuse(*a, **k)) or hits[-1]
    fused = run_mc(r, [x], 40, seed=7, batch_size=20).samples
    assert sum(h is not None for h in hits) >= 3  # the first site of each of the 3 chunks (and the size probe)
    r.engine._site_on_untiled = lambda *a, **k: None
    tiled = run_mc(r, [x], 40, seed=7, batch_size=20).samples
    np.testing.assert_array_equal(fused, tiled)
    assert float(fused.std(0).mean()) > 1e-3


@pytest.mark.parametrize("budget", [None, 1000])  # 1000 bytes: chunks split over the samples too
def test_torch_eval_pass_computed_in_the_mc_run_is_run_evals(tmp_path, budget):
    """The deterministic pass that the MC run computes from its prefix values is bit for bit a
    separate run_eval's, with chunks split over examples and over T; the samples do not change."""
    from torch import nn

    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, run_mc

    r = TorchRunner(load_model(_saved_mlp(tmp_path, [nn.Dropout(0.5), nn.Dropout(0.3)])))
    assert r.engine.eval_in_run
    x = np.random.default_rng(1).standard_normal((45, 12)).astype(np.float32)
    calls = []
    plain = r.engine.run_eval
    r.engine.run_eval = lambda *a, **k: calls.append(1) or plain(*a, **k)
    both = run_mc(r, [x], 40, seed=7, batch_size=20, max_memory=budget)
    groups = -(-45 // both.examples_per_chunk)
    assert not calls and both.chunks == (groups if budget is None else 2 * groups)  # budget: T = 40 in 32 + 8
    r.engine.eval_in_run = False
    apart = run_mc(r, [x], 40, seed=7, batch_size=20, max_memory=budget)
    assert len(calls) == groups
    np.testing.assert_array_equal(both.eval, apart.eval)
    np.testing.assert_array_equal(both.samples, apart.samples)
    assert float(np.abs(both.eval - both.samples.mean(0)).max()) > 0  # the eval pass is not a sample's mean


def test_torch_eval_pass_stays_apart_for_dropcli_sites(tmp_path):
    """A model with dropcli sites (switched by set_mc for the deterministic pass) keeps run_eval."""
    from dropcli.backends import load_model
    from dropcli.engines.factory import inject_on_the_fly
    from dropcli.engines.runner import TorchRunner
    from torch import nn

    model = load_model(_saved_mlp(tmp_path, [nn.Identity(), nn.Identity()]))
    inject_on_the_fly(model, "dropout", p=0.5, after="relu")
    assert not TorchRunner(model).engine.eval_in_run
