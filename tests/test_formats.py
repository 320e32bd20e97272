"""Round trips through `dropcli inject` for every model format, checked with the STOCK loaders.

For each output the checks are:
(a) it loads with its format's stock loader (torch.jit.load, torch.export.load(...).module(),
    onnxruntime.InferenceSession with DEFAULT options) in a subprocess where importing dropcli
    is impossible (pickle outputs are exempt: they hold dropcli's site classes);
(b) in inference mode its outputs equal the original model's exactly;
(c) in MC mode (`*.dropcli_mc` buffers set / `dropcli_mc` fed True) two runs differ, and
    BatchNorm running statistics are untouched.

The stock-loader checks of many outputs share one subprocess (see `stock_check`), because each
subprocess pays ~3 s of torch import. Checks use batch 3; the saved examples use batch 2, so a
batch size baked into an output shows up.

Known limitation (ONNX, default session): after injection into ResBlock, onnxruntime's NCHWc
layout pass no longer fuses conv2 + residual Add + Relu into one FusedConv (a site's Where sits on
the skip path), and the fused kernel rounds differently (~1e-7). The output is exactly equal to the
original under ORT_ENABLE_BASIC / ORT_DISABLE_ALL; under the default level it matches to 1e-6.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from dropcli.cli.main import app
from models import CNN, MLP, LSTMNet, ResBlock, randomise_bn, save_as

runner = CliRunner()
TESTS = Path(__file__).parent
MODELS_PY = str(TESTS / "models.py")

MODELS = {
    "MLP": (lambda: MLP(), (64,)),
    "CNN": (lambda: randomise_bn(CNN()), (1, 8, 8)),
    "ResBlock": (lambda: randomise_bn(ResBlock()), (1, 8, 8)),
    "LSTMNet": (lambda: LSTMNet(), (5, 8)),
}
FORMATS = {"torchscript": ".pt", "export": ".pt2", "pickle": ".pkl", "state_dict": ".sd", "onnx": ".onnx"}
EXAMPLE_BATCH, CHECK_BATCH = 2, 3
# (model, format) pairs whose default-session ONNX output is only close, not bit-equal (see docstring)
ORT_FUSION_DIFFERS = {("ResBlock", "onnx")}


def shape_arg(feat: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (EXAMPLE_BATCH,) + feat)


def load_args(name: str, fmt: str) -> list[str]:
    feat = MODELS[name][1]
    if fmt == "pickle":
        return ["--trust-pickle", "--import", MODELS_PY]
    if fmt == "state_dict":
        return ["--arch", f"{MODELS_PY}:{name}", "--input-shape", shape_arg(feat)]
    if fmt == "torchscript" and name != "MLP":  # an MLP's input width is read from its first Linear
        return ["--input-shape", shape_arg(feat)]
    return []


def invoke(*args: str, ok: bool = True):
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, f"dropcli {' '.join(map(str, args))} -> {res.exit_code}\n{res.stderr}\n{res.exception!r}"
    return res


def inspect_json(path, *extra) -> dict:
    return json.loads(invoke("inspect", path, "--json", *extra).stdout)


# ------------------------------------------------------------------------- stock loaders
CHECKER = textwrap.dedent(
    r"""
    import json, sys
    import numpy as np
    jobs = json.load(open(sys.argv[1]))
    out_dir = sys.argv[2]
    results = {}
    for j in jobs:
        r = results[j["id"]] = {}
        try:
            x = np.load(j["input"])
            saves = {}
            if j["kind"] == "onnx":
                import onnx, onnxruntime as ort
                m = onnx.load(j["path"], load_external_data=False)
                inits = {t.name for t in m.graph.initializer}
                r["graph_inputs"] = [[i.name, i.type.tensor_type.elem_type] for i in m.graph.input]
                sess = ort.InferenceSession(j["path"])  # DEFAULT session options
                name = sess.get_inputs()[0].name
                saves["eval"] = sess.run(None, {name: x})[0]
                basic = ort.SessionOptions()
                basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                sb = ort.InferenceSession(j["path"], basic)
                saves["eval_basic"] = sb.run(None, {name: x})[0]
                if j.get("mc", True):
                    a, b = (sess.run(None, {name: x, "dropcli_mc": np.array(True)})[0] for _ in range(2))
                    r["mc_differ"] = bool(not np.array_equal(a, b))
                    saves["mc"] = a
            else:
                import torch
                if j["kind"] == "torchscript":
                    m = torch.jit.load(j["path"])
                else:
                    m = torch.export.load(j["path"]).module()
                bn = {k: v.clone() for k, v in m.named_buffers() if "running_" in k}
                xt = torch.from_numpy(x)
                with torch.no_grad():
                    saves["eval"] = m(xt).numpy()
                    n = 0
                    for k, buf in m.named_buffers():
                        if k.endswith("dropcli_mc"):
                            buf.fill_(True)
                            n += 1
                    r["mc_buffers"] = n
                    if j.get("mc", True):
                        a, b = m(xt), m(xt)
                        r["mc_differ"] = bool(not torch.equal(a, b))
                        saves["mc"] = a.numpy()
                now = dict(m.named_buffers())
                r["bn_buffers"] = len(bn)
                r["bn_unchanged"] = all(torch.equal(v, now[k]) for k, v in bn.items())
            for key, arr in saves.items():
                p = f"{out_dir}/{j['id']}.{key}.npy"
                np.save(p, arr)
                r[key] = p
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {e}"[:2000]
    json.dump(results, open(f"{out_dir}/results.json", "w"))
    """
)


def stock_check(jobs: list[dict], workdir: Path) -> dict:
    """Run the stock loaders on ``jobs`` in ONE subprocess in which `import dropcli` fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "jobs.json").write_text(json.dumps(jobs))
    (workdir / "checker.py").write_text(CHECKER)
    code = (
        "import sys; sys.modules['dropcli'] = None; sys.argv = sys.argv[1:]; "
        "exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "checker.py"), str(workdir / "jobs.json"), str(workdir)],
        capture_output=True, text=True, cwd=str(workdir), env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((workdir / "results.json").read_text())


def kind_of(fmt: str) -> str:
    return {"state_dict": "torchscript"}.get(fmt, fmt)


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every test model saved in every format, plus inputs and reference outputs."""
    d = tmp_path_factory.mktemp("src")
    out = {}
    for i, (name, (make, feat)) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = make().eval()
        example = torch.randn((EXAMPLE_BATCH,) + feat)
        x = torch.randn((CHECK_BATCH,) + feat, generator=torch.Generator().manual_seed(100 + i))
        np.save(d / f"{name}.x.npy", x.numpy())
        with torch.no_grad():
            ref = model(x)
        files = {fmt: save_as(model, example, d / f"{name}{ext}", fmt) for fmt, ext in FORMATS.items()}
        out[name] = {"model": model, "x": x, "x_path": str(d / f"{name}.x.npy"), "ref": ref, "files": files}
    return out


@pytest.fixture(scope="module")
def roundtrips(sources, tmp_path_factory):
    """`dropcli inject` (standard, p=0.3, default selection) on every model x format."""
    d = tmp_path_factory.mktemp("rt")
    outs, jobs = {}, []
    for name, src in sources.items():
        for fmt, ext in FORMATS.items():
            o = d / f"{name}_{fmt}{ext}"
            res = invoke("inject", src["files"][fmt], "-o", o, "--variant", "standard", "--p", "0.3", "--json",
                         *load_args(name, fmt))
            outs[(name, fmt)] = (o, json.loads(res.stdout))
            if fmt != "pickle":
                jobs.append({"id": f"{name}_{fmt}", "kind": kind_of(fmt), "path": str(o), "input": src["x_path"]})
                if fmt == "onnx":
                    jobs.append({"id": f"{name}_onnx_orig", "kind": "onnx", "path": str(src["files"]["onnx"]),
                                 "input": src["x_path"], "mc": False})
    results = stock_check(jobs, d / "check")
    return outs, results


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(MODELS))
def test_inject_roundtrip(name, fmt, sources, roundtrips):
    outs, results = roundtrips
    out_path, report = outs[(name, fmt)]
    src = sources[name]
    assert out_path.exists()
    assert report["format"] == ("torchscript" if fmt == "state_dict" else fmt)
    assert report["sites"] and all(s["variant"] == "standard" and s["p"] == 0.3 for s in report["sites"])
    n_sites = len(report["sites"])
    assert not [p for p in out_path.parent.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]

    if fmt == "pickle":  # needs dropcli's classes to unpickle: checked in-process
        m = torch.load(str(out_path), weights_only=False)
        bn = {k: v.clone() for k, v in m.named_buffers() if "running_" in k}
        with torch.no_grad():
            assert torch.equal(m(src["x"]), src["ref"])
            mc = [b for k, b in m.named_buffers() if k.endswith("dropcli_mc")]
            assert len(mc) == n_sites
            for b in mc:
                b.fill_(True)
            assert not torch.equal(m(src["x"]), m(src["x"]))
        assert all(torch.equal(v, dict(m.named_buffers())[k]) for k, v in bn.items())
        return

    r = results[f"{name}_{fmt}"]
    assert "error" not in r, r["error"]
    ev = np.load(r["eval"])
    assert r["mc_differ"], "MC mode gave identical outputs"
    if fmt == "onnx":
        orig = results[f"{name}_onnx_orig"]
        assert "error" not in orig, orig["error"]
        names = [n for n, _ in r["graph_inputs"]]
        assert names.count("dropcli_mc") == 1
        assert dict(map(tuple, r["graph_inputs"]))["dropcli_mc"] == TensorProto.BOOL
        np.testing.assert_array_equal(np.load(r["eval_basic"]), np.load(orig["eval_basic"]))
        if (name, fmt) in ORT_FUSION_DIFFERS:
            np.testing.assert_allclose(ev, np.load(orig["eval"]), rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(ev, np.load(orig["eval"]))
        np.testing.assert_allclose(ev, src["ref"].numpy(), rtol=0, atol=1e-5)  # and close to torch
    else:
        assert torch.equal(torch.from_numpy(ev), src["ref"]), (ev - src["ref"].numpy())
        assert r["mc_buffers"] == n_sites
        assert r["bn_unchanged"]
        assert r["bn_buffers"] == (0 if name in ("MLP", "LSTMNet") else 4)


def test_torchscript_output_reloads_without_input_shape(roundtrips):
    """dropcli stores the example input in TorchScript it writes, so it can re-read its own output."""
    outs, _ = roundtrips
    info = inspect_json(outs[("CNN", "torchscript")][0])
    assert info["format"] == "torchscript"
    assert info["layers"][0]["is_input"]
    assert [l["kind"] for l in info["layers"]].count("conv") == 2


def test_pickle_output_keeps_sites_when_reloaded(roundtrips, tmp_path):
    """A dropcli pickle re-loaded by dropcli keeps its sites (not specialised to inference)."""
    outs, _ = roundtrips
    info = inspect_json(outs[("MLP", "pickle")][0], "--trust-pickle", "--import", MODELS_PY)
    drops = [l for l in info["layers"] if l["dropout"]]
    assert [d["dropout"] for d in drops] == [{"variant": "standard", "p": 0.3}] * 2


# ------------------------------------------------------------------------- --format conversions
CONVERSIONS = [
    ("CNN", "export", "onnx"),
    ("LSTMNet", "export", "onnx"),
    ("ResBlock", "torchscript", "onnx"),
    ("LSTMNet", "export", "torchscript"),
    ("MLP", "export", "torchscript"),
    ("CNN", "pickle", "export"),
    ("MLP", "pickle", "export"),
]


@pytest.fixture(scope="module")
def conversions(sources, tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    jobs, outs = [], {}
    for name, src_fmt, dst in CONVERSIONS:
        o = d / f"{name}_{src_fmt}_to{FORMATS[dst]}"
        extra = load_args(name, src_fmt)
        if src_fmt == "pickle" and name != "MLP":  # a CNN's input shape can't be guessed
            extra += ["--input-shape", shape_arg(MODELS[name][1])]
        invoke("inject", sources[name]["files"][src_fmt], "-o", o, "--format", dst, "--p", "0.3", *extra)
        key = f"{name}_{src_fmt}_{dst}"
        outs[key] = o
        jobs.append({"id": key, "kind": dst, "path": str(o), "input": sources[name]["x_path"]})
    return outs, stock_check(jobs, d / "check")


@pytest.mark.parametrize("name,src_fmt,dst", CONVERSIONS)
def test_format_conversion(name, src_fmt, dst, sources, conversions):
    outs, results = conversions
    r = results[f"{name}_{src_fmt}_{dst}"]
    assert "error" not in r, r["error"]
    np.testing.assert_allclose(np.load(r["eval"]), sources[name]["ref"].numpy(), rtol=0, atol=1e-5)
    assert r["mc_differ"]
    if dst == "onnx":
        mc = [i for i in r["graph_inputs"] if i[0] == "dropcli_mc"]
        assert mc == [["dropcli_mc", TensorProto.BOOL]]
        assert len(r["graph_inputs"]) == 2  # the model input and dropcli_mc, no per-site buffers
    else:
        assert r["bn_unchanged"] and r["mc_buffers"] >= 1


def test_pickle_to_export_needs_input_shape_for_cnn(sources, tmp_path):
    o = tmp_path / "cnn.pt2"
    res = invoke("inject", sources["CNN"]["files"]["pickle"], "-o", o, "--format", "export",
                 "--trust-pickle", "--import", MODELS_PY, ok=False)
    assert res.exit_code == 2 and "--input-shape" in res.stderr
    assert not o.exists() and list(tmp_path.iterdir()) == []


def test_onnx_to_torch_format_is_refused(sources, tmp_path):
    res = invoke("inject", sources["MLP"]["files"]["onnx"], "-o", tmp_path / "m.pt", "--format", "torchscript", ok=False)
    assert res.exit_code == 2 and "ONNX" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- ONNX specifics
def _onnx_with_reduce(path: Path, opset: int) -> Path:
    """Gemm -> Relu -> ReduceMean(axis 1, keepdims) -> Mul -> MatMul: Reduce* changes signature at opset 18."""
    rng = np.random.default_rng(opset)
    w = numpy_helper.from_array(rng.normal(size=(16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(16,)).astype(np.float32), "b")
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="/fc/Gemm", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="/act/Relu")]
    inits = [w, b]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["a", "axes"], ["m"], name="/mean/ReduceMean", keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", ["a"], ["m"], name="/mean/ReduceMean", axes=[1], keepdims=1))
    nodes.append(helper.make_node("Mul", ["a", "m"], ["s"], name="/scale/Mul"))
    nodes.append(helper.make_node("MatMul", ["s", "w2"], ["y"], name="/head/MatMul"))
    inits.append(numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def _ort(path, **kw):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), **kw)


@pytest.mark.parametrize("opset", [13, 18])
def test_onnx_opsets(opset, tmp_path):
    src = _onnx_with_reduce(tmp_path / f"m{opset}.onnx", opset)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    ref = _ort(src).run(None, {"x": x})[0]
    for variant in ("standard", "vanilla"):
        o = tmp_path / f"out_{variant}.onnx"
        invoke("inject", src, "-o", o, "--variant", variant, "--p", "0.3", "--after", "relu")
        m = onnx.load(str(o))
        onnx.checker.check_model(m, full_check=True)
        assert max(i.version for i in m.opset_import if i.domain in ("", "ai.onnx")) == opset
        s = _ort(o)
        ev = s.run(None, {"x": x})[0]
        a, b = (s.run(None, {"x": x, "dropcli_mc": np.array(True)})[0] for _ in range(2))
        assert not np.array_equal(a, b)
        if variant == "standard":
            np.testing.assert_array_equal(ev, ref)
        else:  # vanilla: relu output scaled by q at test time, feeding both ReduceMean and Mul
            q = 0.7  # y = (q a) * mean(q a) = q^2 * original
            np.testing.assert_allclose(ev, ref * q * q, rtol=1e-5, atol=1e-6)


def test_onnx_external_data(sources, tmp_path, monkeypatch):
    """An ONNX model whose weights live in a .data file: read it, write a working copy elsewhere."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    m = onnx.load(str(sources["CNN"]["files"]["onnx"]))
    onnx.save(m, str(a / "cnn.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="cnn.weights", size_threshold=0)
    assert (a / "cnn.weights").exists()
    x = sources["CNN"]["x"].numpy()
    ref = _ort(sources["CNN"]["files"]["onnx"]).run(None, {"x": x})[0]
    invoke("inject", a / "cnn.onnx", "-o", b / "out.onnx", "--p", "0.3")
    assert sorted(p.name for p in b.iterdir()) == ["out.onnx", "out.onnx.data"]
    header = onnx.load(str(b / "out.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    s = _ort(b / "out.onnx")
    np.testing.assert_array_equal(s.run(None, {"x": x})[0], ref)
    mc = [s.run(None, {"x": x, "dropcli_mc": np.array(True)})[0] for _ in range(2)]
    assert not np.array_equal(*mc)
    # the source folder is untouched
    assert sorted(p.name for p in a.iterdir()) == ["cnn.onnx", "cnn.weights"]
    # written again, into the working folder, over the earlier output (onnx checks the .data name
    # against the working folder: a rerun there used to fail with "External data file exists")
    monkeypatch.chdir(b)
    invoke("inject", a / "cnn.onnx", "-o", "out.onnx", "--p", "0.3")
    np.testing.assert_array_equal(_ort(b / "out.onnx").run(None, {"x": x})[0], ref)
    assert sorted(p.name for p in b.iterdir()) == ["out.onnx", "out.onnx.data"]
    # external weights can't go down a pipe: one line, and no file named "-" anywhere
    res = invoke("inject", a / "cnn.onnx", "-o", "-", "--p", "0.3", ok=False)
    assert res.exit_code == 1 and "external .data file" in res.output and "Traceback" not in res.output
    assert not Path("-").exists() and sorted(p.name for p in a.iterdir()) == ["cnn.onnx", "cnn.weights"]


def test_onnx_custom_domain_op_passes_through(tmp_path):
    """Ops dropcli doesn't know (custom domains) are kept; sites go around them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="/fc/MatMul"),
                           helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
                           helper.make_node("Scale", ["r"], ["y"], name="/custom/Scale", domain="com.acme")],
                          "g", [x], [y], initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "c.onnx"))
    invoke("inject", tmp_path / "c.onnx", "-o", tmp_path / "o.onnx", "--after", "relu", "--allow-output")
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert [n.op_type for n in out.graph.node if n.domain == "com.acme"] == ["Scale"]
    assert any(n.op_type == "RandomUniformLike" for n in out.graph.node)


# ------------------------------------------------------------------------- existing dropout
class Scale(nn.Module):
    def __init__(self, q: float):
        super().__init__()
        self.q = q

    def forward(self, x):
        return x * self.q


def _no_dropout_twin(model: nn.Module, q: float | None) -> nn.Module:
    """The same weights with `drop` removed (q None) or turned into a test-time scale by q."""
    twin = copy.deepcopy(model)
    twin.drop = nn.Identity() if q is None else Scale(q)
    return twin.eval()


@pytest.fixture(scope="module")
def with_dropout(tmp_path_factory):
    d = tmp_path_factory.mktemp("drop")
    torch.manual_seed(7)
    out = {}
    for name, model, feat in (("MLP", MLP(p=0.2), (64,)), ("CNN", randomise_bn(CNN(p=0.4)), (1, 8, 8))):
        model.eval()
        ex = torch.randn((EXAMPLE_BATCH,) + feat)
        x = torch.randn((CHECK_BATCH,) + feat)
        np.save(d / f"{name}.x.npy", x.numpy())
        files = {fmt: save_as(model, ex, d / f"{name}{FORMATS[fmt]}", fmt) for fmt in ("torchscript", "export", "pickle")}
        files["onnx"] = d / f"{name}.onnx"
        if name == "MLP":
            # torch keeps Dropout nodes only when exporting in training mode (which would also put
            # BatchNorm in training mode and update its running stats: a copy, and no BN here)
            torch.onnx.export(copy.deepcopy(model), (ex,), str(files["onnx"]), dynamo=False, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17,
                              training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
        else:  # an inference export, with a Dropout node added by hand after the Flatten
            save_as(model, ex, files["onnx"], "onnx")
            _add_onnx_dropout(files["onnx"], "Flatten", model.drop.p)
        out[name] = {"model": model, "x": x, "x_path": str(d / f"{name}.x.npy"), "files": files, "p": model.drop.p}
    return out


def _add_onnx_dropout(path: Path, after_op: str, p: float) -> None:
    m = onnx.load(str(path))
    g = m.graph
    i, node = next((i, n) for i, n in enumerate(g.node) if n.op_type == after_op)
    y = node.output[0]
    for n in g.node:
        for k, inp in enumerate(n.input):
            if inp == y:
                n.input[k] = y + "_dropped"
    g.initializer.append(numpy_helper.from_array(np.array(p, dtype=np.float32), "drop_ratio"))
    nodes = list(g.node)
    nodes.insert(i + 1, helper.make_node("Dropout", [y, "drop_ratio"], [y + "_dropped"], name="/drop/Dropout"))
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _drop_args(name: str, fmt: str) -> list[str]:
    if fmt == "pickle":
        return ["--trust-pickle", "--import", MODELS_PY]
    if fmt == "torchscript" and name != "MLP":
        return ["--input-shape", shape_arg((1, 8, 8))]
    return []


@pytest.mark.parametrize("name", ["MLP", "CNN"])
@pytest.mark.parametrize("fmt", ["torchscript", "export", "pickle", "onnx"])
def test_inspect_finds_existing_dropout(name, fmt, with_dropout):
    src = with_dropout[name]
    info = inspect_json(src["files"][fmt], *_drop_args(name, fmt))
    drops = [l for l in info["layers"] if l["dropout"]]
    assert len(drops) == 1 and drops[0]["kind"] == "dropout"
    assert drops[0]["dropout"] == {"variant": "dropout", "p": pytest.approx(src["p"])}
    assert "replace" in drops[0]["sites"]
    if fmt != "torchscript":  # TorchScript -> TS2EP names the op, not the module
        assert drops[0]["name"] == "drop"


@pytest.fixture(scope="module")
def replaced(with_dropout, tmp_path_factory):
    d = tmp_path_factory.mktemp("replaced")
    outs, jobs = {}, []
    for name, src in with_dropout.items():
        for fmt, path in src["files"].items():
            for action in ("remove", "replace"):
                o = d / f"{name}_{action}{FORMATS[fmt]}"
                args = ["--remove"] if action == "remove" else ["--replace", "--variant", "vanilla"]
                res = invoke("inject", path, "-o", o, *args, "--json", *_drop_args(name, fmt))
                outs[(name, fmt, action)] = (o, json.loads(res.stdout))
                if fmt != "pickle":
                    jobs.append({"id": f"{name}_{fmt}_{action}", "kind": fmt, "path": str(o), "input": src["x_path"],
                                 "mc": action == "replace"})
    return outs, stock_check(jobs, d / "check")


@pytest.mark.parametrize("action", ["remove", "replace"])
@pytest.mark.parametrize("fmt", ["torchscript", "export", "pickle", "onnx"])
@pytest.mark.parametrize("name", ["MLP", "CNN"])
def test_replace_and_remove_existing_dropout(name, fmt, action, with_dropout, replaced):
    src = with_dropout[name]
    out_path, report = replaced[0][(name, fmt, action)]
    p = src["p"]
    assert len(report["sites"]) == 1 and report["sites"][0]["was_p"] == pytest.approx(p)
    q = None if action == "remove" else 1 - p
    if action == "replace":  # without --p, the new site keeps the old dropout's p
        assert report["sites"][0]["variant"] == "vanilla" and report["sites"][0]["p"] == pytest.approx(p)
    with torch.no_grad():
        expected = _no_dropout_twin(src["model"], q)(src["x"])

    info = inspect_json(out_path, *(["--trust-pickle", "--import", MODELS_PY] if fmt == "pickle" else []))
    stock = [l for l in info["layers"] if l["dropout"] and l["dropout"]["variant"] == "dropout"]
    assert stock == [], "the stock dropout is still there"

    if fmt == "pickle":
        m = torch.load(str(out_path), weights_only=False)
        with torch.no_grad():
            got = m(src["x"])
            assert torch.equal(got, expected)
            if action == "replace":
                n = sum(b.fill_(True) is not None for k, b in m.named_buffers() if k.endswith("dropcli_mc"))
                assert n == 1 and not torch.equal(m(src["x"]), m(src["x"]))
        return
    r = replaced[1][f"{name}_{fmt}_{action}"]
    assert "error" not in r, r["error"]
    got = np.load(r["eval"])
    if fmt == "onnx":  # onnxruntime kernels vs torch
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-5)
    else:
        assert torch.equal(torch.from_numpy(got), expected), np.abs(got - expected.numpy()).max()
    if action == "replace":
        assert r["mc_differ"]
    if fmt == "onnx":
        assert not any(n.op_type == "Dropout" for n in onnx.load(str(out_path)).graph.node)


# ------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_inspect_json_each_format(fmt, sources):
    info = inspect_json(sources["CNN"]["files"][fmt], *load_args("CNN", fmt))
    assert info["backend"] == ("onnx" if fmt == "onnx" else "torch")
    assert info["format"] == fmt
    layers = info["layers"]
    for l in layers:
        assert set(l) >= {"name", "kind", "op", "shape", "params", "dropout", "sites", "is_output"}
    kinds = [l["kind"] for l in layers]
    assert kinds[0] == "input"
    # torch.onnx.export (eval) folds BatchNorm into the convs
    assert kinds.count("conv") == 2 and kinds.count("batchnorm") == (0 if fmt == "onnx" else 2)
    assert kinds.count("linear") == 1 and kinds.count("relu") == 2 and kinds.count("pool") == 1
    conv = [l for l in layers if l["kind"] == "conv"]
    assert [c["params"] for c in conv] == [8 * 9 + 8, 16 * 8 * 9 + 16]
    head = next(l for l in layers if l["kind"] == "linear")
    assert head["params"] == 256 * 10 + 10 and head["is_output"]
    if fmt != "pickle":  # a pickled CNN has no example input (without --input-shape): shapes unknown
        assert head["shape"][-1] == 10 and conv[1]["shape"][1] == 16
    bn_params = 2 * (8 + 16)  # folded away by the ONNX exporter
    assert info["parameters"] == sum(p.numel() for p in sources["CNN"]["model"].parameters()) - (
        bn_params if fmt == "onnx" else 0)
    assert all(l["dropout"] is None for l in layers)
    if fmt in ("export", "pickle", "state_dict", "onnx"):
        names = {l["name"] for l in layers}
        assert {"features.0", "features.3", "head"} <= names


# ------------------------------------------------------------------------- site selection
def _sites(res) -> list[str]:
    return [s["at"] for s in json.loads(res.stdout)["sites"]]


@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_site_selection(fmt, sources, tmp_path):
    src = sources["CNN"]["files"][fmt]
    o = tmp_path / f"o{FORMATS[fmt]}"

    def run(*a):
        return invoke("inject", src, "-o", o, "--json", *a)

    layers = inspect_json(src)["layers"]
    by_kind = lambda *k: [l["name"] for l in layers if l["kind"] in k and not l["is_output"]]  # noqa: E731
    assert sorted(_sites(run())) == sorted(by_kind("relu"))  # default: after activations
    assert sorted(_sites(run("--after", "relu"))) == sorted(by_kind("relu"))
    assert sorted(_sites(run("--after", "linear,conv"))) == sorted(by_kind("conv"))  # the head is the output layer
    assert sorted(_sites(run("--after", "linear", "--after", "conv", "--allow-output"))) == sorted(
        [l["name"] for l in layers if l["kind"] in ("conv", "linear")])
    if fmt == "export":
        feats = _sites(run("--layers", "features.*"))
        assert sorted(feats) == sorted(l["name"] for l in layers if l["name"].startswith("features.") and not l["is_output"])
        assert _sites(run("--after", "relu", "--exclude", "features.2")) == ["features.5"]
    # --after activation,linear never puts a site after the output layer by default...
    for at in _sites(run("--after", "activation,linear")):
        assert not next(l for l in layers if l["name"] == at)["is_output"]
    # ...and asking only for it is an error that names the way out
    res = invoke("inject", src, "-o", o, "--after", "linear", ok=False)
    assert res.exit_code == 2 and "--allow-output" in res.stderr
    assert _sites(run("--after", "linear", "--allow-output")) == [l["name"] for l in layers if l["kind"] == "linear"]


def test_default_selection_skips_output_activation(tmp_path):
    """A softmax/activation after the last weighted layer is in the output region: no site there."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))

    p = save_as(Head(), torch.randn(2, 8), tmp_path / "h.pt2", "export")
    layers = inspect_json(p)["layers"]
    sig = next(l for l in layers if l["kind"] == "sigmoid")
    assert sig["is_output"]
    assert _sites(invoke("inject", p, "-o", tmp_path / "o.pt2", "--json")) == [
        next(l["name"] for l in layers if l["kind"] == "relu")]


# ------------------------------------------------------------------------- the real entry point
def test_entry_point_subprocess(sources, tmp_path):
    """`dropcli` as installed: inject + inspect --json, as a user runs them."""
    o = tmp_path / "mlp_mc.onnx"
    r = subprocess.run(["dropcli", "inject", str(sources["MLP"]["files"]["onnx"]), "-o", str(o), "--p", "0.25"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dropcli_mc" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(["dropcli", "inspect", str(o), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    drops = [l for l in json.loads(r.stdout)["layers"] if l["dropout"]]
    assert [d["dropout"] for d in drops] == [{"variant": "standard", "p": 0.25}] * 2
