"""The layer-replacing mechanism (REPLACE variants), for every such variant in the registry:

- `dropcli inject` swaps the chosen layers for sites in every torch format and in ONNX;
  `inspect` lists each site as one dropout row (also after saving and re-loading);
- `--remove` gives back the stock layer, and the original function exactly; `--replace`
  turns the site back into its layer and rewrites it again (another REPLACE variant) or puts
  an activation-level variant after it;
- the trained tensors are kept (same values and dtype: a float64 model stays float64);
- `dropcli uncertainty` samples the sites in both engines: seeded runs repeat, an example's
  samples do not depend on its batch, and the torch and ONNX engines draw the same samples
  (both feed the same keyed noise) up to float rounding.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dropcli.backends import load_model
from dropcli.engines.runner import TorchRunner, run_mc
from dropcli.engines.onnx_mc import OnnxRunner
from dropcli.backends.plan import apply_inject, plan_inject
from dropcli.model.selection import Selection
from dropcli.variants import get_variant, load_all
from dropcli.variants.base import REPLACE
from helpers import cli
from models import MLP, PoolCNN, randomise_bn, save_as

REPLACING = sorted(n for n, s in load_all().items() if s.attaches == REPLACE)
# the test model for each layer class (recurrent variants come with their own models)
MODEL_FOR = {"linear": "mlp", "conv": "pool", "maxpool": "pool", "avgpool": "pool"}
SHAPES = {"mlp": (64,), "pool": (1, 8, 8)}


def _model_key(name: str) -> str | None:
    for cls in load_all()[name].replaces:
        if cls in MODEL_FOR:
            return MODEL_FOR[cls]
    return None


CASES = [n for n in REPLACING if _model_key(n)]
# variants without a drop probability get these parameters instead of p (sparse-vd: a start
# variance large enough for visible MC noise)
NO_P = {"sparse-vd": {"log_sigma2": -6.0}}


def _has_p(name: str) -> bool:
    return any(q.name == "p" for q in load_all()[name].params)


def _params(name: str, p: float) -> dict:
    return {"p": p} if _has_p(name) else dict(NO_P.get(name, {}))


def _flags(name: str, p: float) -> list[str]:
    return [a for k, v in _params(name, p).items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _dropout(name: str, p: float) -> dict:
    return {"variant": name, "p": p if _has_p(name) else None}




def _inspect(path, *extra):
    return json.loads(cli("inspect", path, "--json", *extra).stdout)["layers"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("layer_sites")
    torch.manual_seed(0)
    out = {}
    for key, model in (("mlp", MLP().eval()), ("pool", randomise_bn(PoolCNN()))):
        ex = torch.rand((2,) + SHAPES[key])
        out[key] = {"model": model, "x": torch.rand((6,) + SHAPES[key], generator=torch.Generator().manual_seed(3))}
        for fmt, ext in (("export", "pt2"), ("torchscript", "pt"), ("onnx", "onnx")):
            out[key][fmt] = save_as(model, ex, d / f"{key}.{ext}", fmt)
    return out


def _run(path, fmt, x):
    if fmt == "onnx":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return ort.InferenceSession(str(path), so).run(None, {"x": x.numpy()})[0]
    m = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        return m(x).numpy()


@pytest.mark.parametrize("fmt,ext", [("export", "pt2"), ("torchscript", "pt"), ("onnx", "onnx")])
@pytest.mark.parametrize("name", CASES)
def test_inject_inspect_remove_replace_roundtrip(name, fmt, ext, sources, tmp_path):
    key = _model_key(name)
    src, x, model = sources[key][fmt], sources[key]["x"], sources[key]["model"]
    spec = load_all()[name]
    with torch.no_grad():
        ref = model(x).numpy()
    shape = ["--input-shape", "x".join(map(str, (2,) + SHAPES[key]))] if fmt == "torchscript" else []
    before = _inspect(src, *shape)
    rewritable = [l for l in before if l["layer_class"] in spec.replaces and not l["is_output"]]
    assert rewritable, "the test model has nothing to rewrite"

    a = tmp_path / f"a.{ext}"
    out = json.loads(cli("inject", src, "--variant", name, *_flags(name, 0.3), "-o", a, "--json", *shape).stdout)
    assert [s["at"] for s in out["sites"]] == [l["name"] for l in rewritable]
    rows = _inspect(a)
    sites = [l for l in rows if l["dropout"]]
    assert [s["dropout"] for s in sites] == [_dropout(name, 0.3)] * len(rewritable)
    assert not any(l["layer_class"] in spec.replaces and not l["is_output"] for l in rows), "a layer was left"
    if spec.identity_at_test:
        np.testing.assert_allclose(_run(a, fmt, x), ref, rtol=1e-5, atol=1e-6)

    # remove: the stock layers come back and compute the original function
    b = tmp_path / f"b.{ext}"
    cli("inject", a, "--remove", "-o", b)
    rows_b = _inspect(b)
    assert not any(l["dropout"] for l in rows_b)
    assert sorted(l["layer_class"] for l in rows_b if l["layer_class"]) == sorted(l["layer_class"] for l in before if l["layer_class"])
    np.testing.assert_allclose(_run(b, fmt, x), ref, rtol=1e-6, atol=1e-6)

    # replace by an activation-level variant: back to the layer, gaussian after it (inference = original)
    c = tmp_path / f"c.{ext}"
    cli("inject", a, "--replace", "--variant", "gaussian", "-o", c)
    sites_c = [l for l in _inspect(c) if l["dropout"]]
    assert [s["dropout"] for s in sites_c] == [{"variant": "gaussian", "p": 0.3 if _has_p(name) else 0.5}] * len(rewritable)
    np.testing.assert_allclose(_run(c, fmt, x), ref, rtol=1e-6, atol=1e-6)

    # replace by the same variant with another p: rewritten again, numbered after the old sites
    e = tmp_path / f"e.{ext}"
    out_e = json.loads(cli("inject", a, "--replace", "--variant", name, *_flags(name, 0.2), "-o", e, "--json").stdout)
    assert {s["site"] for s in out_e["sites"]}.isdisjoint({s["name"] for s in sites})
    assert [s["dropout"] for s in _inspect(e) if s["dropout"]] == [_dropout(name, 0.2)] * len(rewritable)


@pytest.mark.parametrize("name", CASES)
def test_pickle_and_state_dict_inputs(name, tmp_path):
    """Module-call graphs (pickles, state_dict + --arch): the site replaces the nn module; the
    pickle output keeps live SiteModules that re-load, and --remove restores stock modules."""
    key = _model_key(name)
    torch.manual_seed(1)
    model = MLP().eval() if key == "mlp" else randomise_bn(PoolCNN())
    x = torch.rand((5,) + SHAPES[key])
    src = save_as(model, x[:2], tmp_path / "m.pkl", "pickle")
    imp = ["--trust-pickle", "--import", "tests/models.py"]
    a = tmp_path / "a.pkl"
    cli("inject", src, "--variant", name, *_flags(name, 0.25), "-o", a, *imp)
    assert any(l["dropout"] and l["dropout"]["variant"] == name for l in _inspect(a, *imp))
    b = tmp_path / "b.pkl"
    cli("inject", a, "--remove", "-o", b, *imp)
    restored = torch.load(str(b), weights_only=False)
    with torch.no_grad():
        np.testing.assert_array_equal(restored(x).numpy(), model(x).numpy())
    sd = save_as(model, x[:2], tmp_path / "sd.pt", "state_dict")
    arch = "tests/models.py:MLP" if key == "mlp" else "tests/models.py:PoolCNN"
    shape = "2x64" if key == "mlp" else "2x1x8x8"
    c = tmp_path / "c.pt"
    cli("inject", sd, "--arch", arch, "--input-shape", shape, "--variant", name, *_flags(name, 0.25), "-o", c)
    assert any(l["dropout"] and l["dropout"]["variant"] == name for l in _inspect(c))


@pytest.mark.parametrize("name", CASES)
def test_float64_model_keeps_dtype_and_tensors(name):
    key = _model_key(name)
    torch.manual_seed(2)
    model = (MLP() if key == "mlp" else randomise_bn(PoolCNN())).double().eval()
    from dropcli.backends.torch.model import TorchModel

    gm = torch.fx.symbolic_trace(model)
    tm = TorchModel(gm, "pickle", (torch.zeros((2,) + SHAPES[key], dtype=torch.float64),))
    spec = get_variant(name)
    done = apply_inject(tm, spec, spec.resolve_params(_params(name, 0.3)), plan_inject(tm, spec, Selection()))
    sites = tm.site_modules()
    assert len(sites) == len(done) >= 1
    originals = dict(model.named_modules())
    for d in done:
        site = sites[d["site"]]
        orig = originals[d["at"]]
        for tname in site.tensor_names:
            t = getattr(site, tname)
            assert t.dtype == torch.float64
            assert torch.equal(t, getattr(orig, tname)), f"{d['at']}.{tname} changed"
    x = torch.rand((4,) + SHAPES[key], dtype=torch.float64)
    for mc in (False, True):
        for m in sites.values():
            m.set_mc(mc)
        with torch.no_grad():
            assert tm.gm(x).dtype == torch.float64


def test_usage_errors(tmp_path):
    torch.manual_seed(0)
    mlp = save_as(MLP(p=0.2).eval(), torch.rand(2, 64), tmp_path / "mlp.pt2", "export")
    res = cli("inject", mlp, "--variant", "maxpool-dropout", "-o", tmp_path / "o.pt2", code=2)
    assert "max-pooling" in res.output
    res = cli("inject", mlp, "--replace", "--variant", "avgpool-dropout", "-o", tmp_path / "o.pt2", code=2)
    assert "can't take the place of the dropout layer" in res.output
    assert not (tmp_path / "o.pt2").exists()


# ----------------------------------------------------------------------------- MC engines
def _inj(path, name, p=0.3):
    m = load_model(path)
    spec = get_variant(name)
    apply_inject(m, spec, spec.resolve_params(_params(name, p)), plan_inject(m, spec, Selection()))
    return m


@pytest.mark.parametrize("name", CASES)
def test_uncertainty_engines_agree_and_are_batch_invariant(name, sources):
    key = _model_key(name)
    x = np.random.default_rng(7).random((40,) + SHAPES[key]).astype(np.float32)
    rt = TorchRunner(_inj(sources[key]["export"], name), "cpu")
    ro = OnnxRunner(_inj(sources[key]["onnx"], name), "cpu")
    assert rt.n_sites == ro.n_sites >= 1
    a = run_mc(rt, [x], 40, seed=5)
    b = run_mc(ro, [x], 40, seed=5)
    scale = max(1.0, float(np.abs(a.samples).max()))
    np.testing.assert_allclose(b.samples, a.samples, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(b.eval, a.eval, rtol=0, atol=1e-5 * scale)
    assert float(a.samples.std(0).mean()) > 1e-4, "MC mode did not vary"
    # an example's samples do not depend on the batch it sits in (global example index)
    part = run_mc(TorchRunner(_inj(sources[key]["export"], name), "cpu"), [x[5:9]], 40, seed=5, index_offset=5)
    np.testing.assert_array_equal(part.samples, a.samples[:, 5:9])
    parto = run_mc(ro, [x[5:9]], 40, seed=5, index_offset=5, batch_size=3)
    np.testing.assert_array_equal(parto.samples, b.samples[:, 5:9])
    again = run_mc(rt, [x], 40, seed=5)
    np.testing.assert_array_equal(again.samples, a.samples)


@pytest.mark.parametrize("name", CASES)
def test_uncertainty_cli_both_backends(name, sources, tmp_path):
    key = _model_key(name)
    x = np.random.default_rng(8).random((12,) + SHAPES[key]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    reports = []
    for fmt, ext in (("export", "pt2"), ("onnx", "onnx")):
        out = tmp_path / f"m.{ext}"
        cli("--quiet", "inject", sources[key][fmt], "--variant", name, *_flags(name, 0.3), "-o", out)
        res = cli("--quiet", "uncertainty", out, "--input", tmp_path / "x.npy", "-T", 24, "--seed", 3, "--json")
        reports.append(json.loads(res.stdout))
        # --inject on the fly works too
        res2 = cli("--quiet", "uncertainty", sources[key][fmt], "--input", tmp_path / "x.npy", "-T", 8,
                    "--inject", name, *(["--p", 0.3] if _has_p(name) else []), "--json")
        assert json.loads(res2.stdout)["summary"]["sites"] >= 1
    assert reports[0]["summary"]["sites"] == reports[1]["summary"]["sites"] >= 1
    for r in reports:
        assert len(r["examples"]) == 12 and r["summary"]["distribution"]["mutual_info"]["max"] > 0
