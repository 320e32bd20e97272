"""`dropcli uncertainty`: semantics (eval-mode layers, seeds, chunking invariance), inputs,
outputs, statistics, errors, devices and backends.

Models are saved with tests/models.py and given dropout with the real `dropcli inject`.
Most runs go through typer's CliRunner, in-process; a few checks call the engine
(dropcli.engines.runner.run_mc) directly where the CLI does not expose what is checked.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dropcli.analysis import stats
from helpers import cli_err
from helpers import cli_split as cli
from models import CNN, MLP, randomise_bn, save_as

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
N = 24


# ----------------------------------------------------------------------------- helpers


def unc(model, inp, *extra, code: int = 0, input=None):
    return cli("--quiet", "uncertainty", model, "--input", inp, *extra, code=code, input=input)


def run_json(model, inp, *extra, input=None) -> dict:
    res = unc(model, inp, "--json", *extra, input=input)
    return json.loads(res.stdout)


def run_npz(model, inp, out: Path, *extra) -> dict[str, np.ndarray]:
    unc(model, inp, "--format", "npz", "--output", out, *extra)
    with np.load(out, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def example_matrix(report: dict, keys=("pred", "confidence", "entropy", "expected_entropy", "mutual_info",
                                       "variation_ratio")) -> np.ndarray:
    ex = report["examples"]
    return np.array([[e[k] for k in keys] + [e[k] for k in sorted(e) if k.startswith(("mean_", "std_"))] for e in ex])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("unc_models")
    torch.manual_seed(0)
    mlp = MLP()
    plain = save_as(mlp, torch.randn(2, 64), d / "mlp.pt2", "export")
    cnn = randomise_bn(CNN())
    cnn_plain = save_as(cnn, torch.randn(2, 1, 8, 8), d / "cnn.pt2", "export")
    reg = MLP(d_out=1)
    reg_plain = save_as(reg, torch.randn(2, 64), d / "reg.pt2", "export")
    out = {"mlp_plain": plain, "mlp_module": mlp.eval(), "cnn_module": cnn.eval(), "reg_plain": reg_plain}
    for name, src, p in (("mlp", plain, 0.3), ("mlp_p0", plain, 0.0), ("cnn", cnn_plain, 0.3), ("reg", reg_plain, 0.2)):
        dst = d / f"{name}_mc.pt2"
        cli("--quiet", "inject", src, "--p", p, "--after", "relu", "-o", dst)
        out[name] = dst
    onnx_plain = save_as(mlp, torch.randn(2, 64), d / "mlp.onnx", "onnx")
    cli("--quiet", "inject", onnx_plain, "--p", 0.3, "--after", "relu", "-o", d / "mlp_mc.onnx")
    out["onnx"] = d / "mlp_mc.onnx"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("unc_data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 64)).astype(np.float32)
    y = rng.integers(0, 10, N)
    img = rng.standard_normal((N, 1, 8, 8)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    np.savez(d / "xy.npz", x=x, y=y)
    np.save(d / "img.npy", img)
    return {"dir": d, "x": x, "y": y, "img": img, "npy": d / "x.npy", "labels": d / "y.npy", "npz": d / "xy.npz",
            "img_npy": d / "img.npy"}


@pytest.fixture(scope="module")
def base_report(models, data):
    """The reference run: MLP, x.npy + labels, T=20, seed 0."""
    return run_json(models["mlp"], data["npy"], "-T", 20, "--labels", data["labels"])


# ----------------------------------------------------------------------------- semantics


def test_batchnorm_running_stats_unchanged(models, data):
    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, run_mc

    model = load_model(str(models["cnn"]))
    r = TorchRunner(model)
    before = {k: v.clone() for k, v in model.gm.state_dict().items() if "running" in k or "num_batches" in k}
    assert any("running_mean" in k for k in before), sorted(model.gm.state_dict())
    res = run_mc(r, [data["img"]], 10, seed=0)
    after = {k: v for k, v in model.gm.state_dict().items() if k in before}
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed during the MC run"
    # the deterministic pass equals the original module in eval mode (BN with running stats)
    with torch.no_grad():
        ref = models["cnn_module"](torch.from_numpy(data["img"])).numpy()
    np.testing.assert_allclose(res.eval, ref, rtol=1e-5, atol=1e-5)
    # and the CLI run does not touch the model file
    blob = models["cnn"].read_bytes()
    unc(models["cnn"], data["img_npy"], "-T", 5, "--json")
    assert models["cnn"].read_bytes() == blob


def test_p0_t1_reproduces_eval_exactly(models, data):
    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, run_mc

    r = TorchRunner(load_model(str(models["mlp_p0"])))
    res = run_mc(r, [data["x"]], 1, seed=3)
    assert res.samples.shape == (1, N, 10)
    assert np.array_equal(res.samples[0], res.eval)
    with torch.no_grad():
        ref = models["mlp_module"](torch.from_numpy(data["x"])).numpy()
    np.testing.assert_allclose(res.eval, ref, rtol=1e-5, atol=1e-6)
    # via the CLI: MC prediction == deterministic prediction, zero spread
    rep = run_json(models["mlp_p0"], data["npy"], "-T", 1)
    for e in rep["examples"]:
        assert e["pred"] == e["eval_pred"]
        assert e["mutual_info"] == 0.0 and e["variation_ratio"] == 0.0
        assert all(e[k] == 0.0 for k in e if k.startswith("std_"))


def test_seed_bitwise_reproducible(models, data, tmp_path, base_report):
    a = unc(models["mlp"], data["npy"], "--json", "-T", 20, "--labels", data["labels"]).stdout
    assert json.loads(a) == base_report
    b = unc(models["mlp"], data["npy"], "--json", "-T", 20, "--labels", data["labels"]).stdout
    assert a == b  # byte for byte
    z1 = run_npz(models["mlp"], data["npy"], tmp_path / "a.npz", "-T", 20, "--keep-samples")
    z2 = run_npz(models["mlp"], data["npy"], tmp_path / "b.npz", "-T", 20, "--keep-samples")
    assert z1.keys() == z2.keys()
    for k in z1:
        assert z1[k].dtype == z2[k].dtype and np.array_equal(z1[k], z2[k]), k
    other = run_json(models["mlp"], data["npy"], "-T", 20, "--seed", 1)
    assert example_matrix(other).tolist() != example_matrix(base_report).tolist(), "--seed has no effect"


def test_batch_size_and_memory_invariance(models, data, tmp_path):
    """Per-example results are bitwise identical however the work is chunked (T=70 > SAMPLE_BLOCK)."""
    from dropcli.backends import load_model
    from dropcli.engines.runner import TorchRunner, parse_size, plan_chunks

    T = 70
    ref = run_npz(models["mlp"], data["npy"], tmp_path / "ref.npz", "-T", T, "--keep-samples")
    # the tiny budget really splits over samples
    r = TorchRunner(load_model(str(models["mlp"])))
    per_chunk, t_chunk = plan_chunks(N, T, r.row_bytes([data["x"]]), parse_size("2K"), 256)
    assert per_chunk == 1 and t_chunk < T
    for extra in (("--batch-size", 1), ("--batch-size", 7), ("--batch-size", 256), ("--max-memory", "2K")):
        got = run_npz(models["mlp"], data["npy"], tmp_path / f"b{extra[1]}.npz", "-T", T, "--keep-samples", *extra)
        for k in ref:
            if k == "summary_json":
                continue
            assert np.array_equal(ref[k], got[k]), f"{k} differs with {extra}"


def test_example_independent_of_others(models, data, tmp_path):
    full = run_npz(models["mlp"], data["npy"], tmp_path / "full.npz", "-T", 40, "--keep-samples")
    # a prefix of the rows: same results for those rows
    np.save(tmp_path / "head.npy", data["x"][:5])
    head = run_npz(models["mlp"], tmp_path / "head.npy", tmp_path / "head.npz", "-T", 40, "--keep-samples")
    assert np.array_equal(head["samples"], full["samples"][:, :5])
    assert np.array_equal(head["entropy"], full["entropy"][:5])
    # change every other row: the untouched rows keep their results
    x2 = data["x"].copy()
    x2[1::2] = np.random.default_rng(9).standard_normal(x2[1::2].shape).astype(np.float32) * 3
    np.save(tmp_path / "mixed.npy", x2)
    mixed = run_npz(models["mlp"], tmp_path / "mixed.npy", tmp_path / "mixed.npz", "-T", 40, "--keep-samples")
    assert np.array_equal(mixed["samples"][:, 0::2], full["samples"][:, 0::2])
    assert not np.array_equal(mixed["samples"][:, 1::2], full["samples"][:, 1::2])


def test_degenerate_sampling_is_an_error(models, data, tmp_path):
    cli_err("uncertainty", models["mlp_p0"], "--input", data["npy"], "-T", 5, "-o", tmp_path / "r.json",
            contains=("degenerate",))
    assert not (tmp_path / "r.json").exists()


def test_no_sites_error_and_inject_on_the_fly(models, data, tmp_path, monkeypatch):
    cli_err("uncertainty", models["mlp_plain"], "--input", data["npy"], contains=("no dropout sites", "--inject"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    blob = models["mlp_plain"].read_bytes()
    res = unc(models["mlp_plain"], data["npy"], "--inject", "standard", "--p", 0.2, "-T", 10, "--output", work / "r.json")
    assert res.stdout == ""
    rep = json.loads((work / "r.json").read_text())
    assert rep["summary"]["sites"] >= 1 and len(rep["examples"]) == N
    assert sorted(p.name for p in work.iterdir()) == ["r.json"]
    assert models["mlp_plain"].read_bytes() == blob
    assert sorted(p.name for p in models["mlp_plain"].parent.iterdir() if not p.name.endswith((".pt2", ".onnx"))) == []


# ----------------------------------------------------------------------------- inputs


def _write_inputs(d: Path, x: np.ndarray, y: np.ndarray) -> dict[str, Path]:
    paths = {}
    np.savez(d / "named.npz", x=x, y=y)
    paths["npz_xy"] = d / "named.npz"
    np.savez(d / "other.npz", features=x, labels=y)
    paths["npz_named"] = d / "other.npz"
    torch.save(torch.from_numpy(x), d / "t.pt")
    paths["pt_tensor"] = d / "t.pt"
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, d / "d.pt")
    paths["pt_dict"] = d / "d.pt"
    np.savetxt(d / "h.csv", x, delimiter=",", fmt="%.9g", header=",".join(f"f{i}" for i in range(64)), comments="")
    paths["csv_header"] = d / "h.csv"
    np.savetxt(d / "n.csv", x, delimiter=",", fmt="%.9g")
    paths["csv_plain"] = d / "n.csv"
    return paths


def test_every_input_format(models, data, tmp_path, base_report):
    ref = run_json(models["mlp"], data["npy"], "-T", 20)
    want = example_matrix(ref)
    assert np.array_equal(want, example_matrix(base_report))  # labels do not change the per-example numbers
    for kind, path in _write_inputs(tmp_path, data["x"], data["y"]).items():
        got = run_json(models["mlp"], path, "-T", 20)
        assert np.array_equal(example_matrix(got), want), kind
        if kind in ("npz_xy", "npz_named", "pt_dict"):  # labels found beside the inputs
            assert got["summary"]["mc"]["accuracy"] == base_report["summary"]["mc"]["accuracy"], kind
    # stdin: npy bytes, then CSV text
    buf = io.BytesIO()
    np.save(buf, data["x"])
    got = run_json(models["mlp"], "-", "-T", 20, input=buf.getvalue())
    assert np.array_equal(example_matrix(got), want)
    text = "\n".join(",".join(f"{v:.9g}" for v in row) for row in data["x"]) + "\n"
    got = run_json(models["mlp"], "-", "-T", 20, input=text)
    assert np.array_equal(example_matrix(got), want)


def test_integer_inputs_for_float_model(models, tmp_path):
    xi = np.random.default_rng(1).integers(-3, 4, (N, 64)).astype(np.int64)
    np.save(tmp_path / "i.npy", xi)
    np.save(tmp_path / "f.npy", xi.astype(np.float32))
    np.savetxt(tmp_path / "i.csv", xi, delimiter=",", fmt="%d")
    a = run_json(models["mlp"], tmp_path / "i.npy", "-T", 10)
    b = run_json(models["mlp"], tmp_path / "f.npy", "-T", 10)
    c = run_json(models["mlp"], tmp_path / "i.csv", "-T", 10)
    assert np.array_equal(example_matrix(a), example_matrix(b))
    assert np.array_equal(example_matrix(c), example_matrix(b))


def test_bad_inputs(models, data, tmp_path):
    m = models["mlp"]
    np.save(tmp_path / "shape.npy", np.zeros((4, 63), np.float32))
    cli_err("uncertainty", m, "--input", tmp_path / "shape.npy", contains=("shape", "64"))
    np.save(tmp_path / "str.npy", np.array([["a"] * 64] * 3))
    cli_err("uncertainty", m, "--input", tmp_path / "str.npy", contains=("dtype",))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    cli_err("uncertainty", m, "--input", tmp_path / "obj.npy")
    nan = data["x"].copy()
    nan[3, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cli_err("uncertainty", m, "--input", tmp_path / "nan.npy", contains=("nan", "example 3"))
    (tmp_path / "empty.npy").write_bytes(b"")
    cli_err("uncertainty", m, "--input", tmp_path / "empty.npy", contains=("empty",))
    np.save(tmp_path / "zero.npy", np.zeros((0, 64), np.float32))
    cli_err("uncertainty", m, "--input", tmp_path / "zero.npy", contains=("empty",))
    (tmp_path / "cut.npy").write_bytes(data["npy"].read_bytes()[:200])
    cli_err("uncertainty", m, "--input", tmp_path / "cut.npy")
    (tmp_path / "words.csv").write_text("a,b\nc,d\n")
    cli_err("uncertainty", m, "--input", tmp_path / "words.csv")
    np.save(tmp_path / "short.npy", data["y"][:-1])
    cli_err("uncertainty", m, "--input", data["npy"], "--labels", tmp_path / "short.npy", contains=("labels", str(N)))
    cli_err("uncertainty", m, "--input", data["npy"], "--fail-above", "bogus=1", code=2, contains=("bogus",))
    cli_err("uncertainty", m, "--input", data["npy"], "--fail-above", "mutual_info", code=2)
    cli_err("uncertainty", m, "--input", tmp_path / "missing.npy", contains=("does not exist",))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------- outputs


def test_output_formats(models, data, tmp_path, base_report):
    m, x, y = models["mlp"], data["npy"], data["labels"]
    common = ("-T", 20, "--labels", y)
    unc(m, x, *common, "-o", tmp_path / "r.json")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep == base_report
    assert set(rep) == {"summary", "examples"} and len(rep["examples"]) == N
    s = rep["summary"]
    assert s["n"] == N and s["samples"] == 20 and s["task"] == "classification" and s["sites"] == 2
    for k in ("distribution", "mc", "eval", "accuracy_at_coverage", "error_auroc"):
        assert k in s, k

    unc(m, x, *common, "-o", tmp_path / "r.jsonl")
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == N
    recs = [json.loads(ln) for ln in lines]
    assert recs == rep["examples"]

    unc(m, x, *common, "-o", tmp_path / "r.csv")
    rows = (tmp_path / "r.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert header == list(rep["examples"][0]) and len(rows) == N + 1
    arr = np.loadtxt(tmp_path / "r.csv", delimiter=",", skiprows=1)
    assert arr.shape == (N, len(header))
    np.testing.assert_allclose(arr[:, header.index("entropy")], [e["entropy"] for e in rep["examples"]], rtol=1e-8)

    z = run_npz(m, x, tmp_path / "r.npz", *common, "--keep-samples")
    assert z["samples"].shape == (20, N, 10) and z["samples"].dtype == np.float32
    assert json.loads(str(z["summary_json"]))["n"] == N
    assert np.array_equal(z["pred"], [e["pred"] for e in rep["examples"]])

    # '-' is stdout, for every format
    assert unc(m, x, *common, "--format", "jsonl", "-o", "-").stdout.strip().splitlines() == lines
    assert unc(m, x, *common, "--format", "csv", "-o", "-").stdout.strip().splitlines() == rows
    raw = unc(m, x, *common, "--format", "npz", "-o", "-").stdout_bytes
    with np.load(io.BytesIO(raw)) as zz:
        assert np.array_equal(zz["entropy"], z["entropy"])
    # the default table goes to stdout, not a file
    table = unc(m, x, *common).stdout
    assert "entropy" in table and "accuracy" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json", "r.jsonl", "r.npz"]


def test_fail_above_gate(models, data):
    res = cli("--quiet", "uncertainty", models["mlp"], "--input", data["npy"], "-T", 10, "--json",
              "--fail-above", "mutual_info=0", code=3)
    rep = json.loads(res.stdout)  # the report is still written
    assert rep["summary"]["gate"]["tripped"] is True
    assert "gate" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = cli("--quiet", "uncertainty", models["mlp"], "--input", data["npy"], "-T", 10, "--json",
              "--fail-above", "mutual_info=1e9", code=0)
    assert json.loads(res.stdout)["summary"]["gate"]["tripped"] is False


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed (pip install 'dropcli[plot]')")
def test_plot_writes_png(models, data, tmp_path):
    unc(models["mlp"], data["npy"], "-T", 10, "--labels", data["labels"], "--plot", tmp_path / "p.png",
        "-o", tmp_path / "r.json")
    unc(models["reg"], data["npy"], "-T", 10, "--plot", tmp_path / "reg.png", "--json")
    for name in ("p.png", "reg.png"):
        blob = (tmp_path / name).read_bytes()
        assert blob.startswith(b"\x89PNG\r\n\x1a\n") and len(blob) > 5000, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "r.json", "reg.png"]


def test_plot_without_matplotlib_is_one_line_error(models, data, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    cli_err("uncertainty", models["mlp"], "--input", data["npy"], "-T", 5, "--plot", tmp_path / "p.png",
            "-o", tmp_path / "r.json", contains=("matplotlib", "dropcli[plot]"))
    assert not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------- statistics


def test_statistics_match_samples(models, data, tmp_path, base_report):
    z = run_npz(models["mlp"], data["npy"], tmp_path / "s.npz", "-T", 20, "--keep-samples", "--labels", data["labels"])
    per = stats.classification(stats.to_probs(z["samples"]))
    ex = base_report["examples"]
    for k in ("entropy", "mutual_info", "variation_ratio", "expected_entropy", "confidence"):
        np.testing.assert_allclose([e[k] for e in ex], per[k], rtol=1e-12, atol=0, err_msg=k)
    assert [e["pred"] for e in ex] == per["pred"].tolist()
    ent = np.array([e["entropy"] for e in ex])
    mi = np.array([e["mutual_info"] for e in ex])
    assert np.all(mi >= 0) and np.all(ent >= mi - 1e-12) and np.all(ent <= math.log(10) + 1e-9)
    assert np.any(mi > 0)
    vr = np.array([e["variation_ratio"] for e in ex])
    assert np.all((vr >= 0) & (vr <= 1 - 1 / 10 + 1e-12))
    # accuracy with labels
    correct = [e["pred"] == e["label"] for e in ex]
    assert all(e["correct"] == int(c) for e, c in zip(ex, correct))
    assert base_report["summary"]["mc"]["accuracy"] == pytest.approx(np.mean(correct), abs=1e-15)
    ev = [e["eval_pred"] == e["label"] for e in ex]
    assert base_report["summary"]["eval"]["accuracy"] == pytest.approx(np.mean(ev), abs=1e-15)
    # summary distributions are over the same per-example values
    assert base_report["summary"]["distribution"]["entropy"]["mean"] == pytest.approx(ent.mean(), rel=1e-12)


def test_regression_task(models, data, tmp_path):
    y = np.random.default_rng(3).standard_normal(N).astype(np.float32)
    np.save(tmp_path / "yr.npy", y)
    z = run_npz(models["reg"], data["npy"], tmp_path / "r.npz", "-T", 30, "--labels", tmp_path / "yr.npy",
                "--keep-samples")
    rep = run_json(models["reg"], data["npy"], "-T", 30, "--labels", tmp_path / "yr.npy")
    s = rep["summary"]
    assert s["task"] == "regression" and "no --tau" in s["variance"]
    for k in ("rmse", "mae", "gaussian_nll"):
        assert k in s["mc"]
    samples = z["samples"].astype(np.float64)
    assert samples.shape == (30, N, 1)
    ex = rep["examples"]
    np.testing.assert_allclose([e["mean_0"] for e in ex], samples.mean(0)[:, 0], rtol=1e-12)
    np.testing.assert_allclose([e["var_0"] for e in ex], samples.var(0)[:, 0], rtol=1e-10)
    assert s["mc"]["rmse"] == pytest.approx(np.sqrt(np.mean((samples.mean(0)[:, 0] - y) ** 2)), rel=1e-6)
    tau = 4.0
    rep_t = run_json(models["reg"], data["npy"], "-T", 30, "--labels", tmp_path / "yr.npy", "--tau", tau)
    assert "tau" in rep_t["summary"]["variance"] and "no --tau" not in rep_t["summary"]["variance"]
    np.testing.assert_allclose([e["var_0"] - f["var_0"] for e, f in zip(rep_t["examples"], ex)], 1 / tau, rtol=1e-9)
    np.testing.assert_allclose([e["mean_0"] for e in rep_t["examples"]], [e["mean_0"] for e in ex], rtol=0)
    cli_err("uncertainty", models["reg"], "--input", data["npy"], "--tau", "-1", code=2)
    cli_err("uncertainty", models["reg"], "--input", data["npy"], "--fail-above", "entropy=1", code=2)
    assert unc(models["reg"], data["npy"], "-T", 10, "--fail-above", "std=1e9", "--json").exit_code == 0


# ----------------------------------------------------------------------------- devices and backends


def test_device_cuda(models, data):
    if not torch.cuda.is_available():
        cli_err("uncertainty", models["mlp"], "--input", data["npy"], "--device", "cuda", contains=("cuda",))
        pytest.skip("no CUDA GPU: checked the one-line error only")
    cpu = run_json(models["mlp"], data["npy"], "-T", 20)
    gpu = run_json(models["mlp"], data["npy"], "-T", 20, "--device", "cuda")
    assert gpu["summary"]["device"].startswith("cuda")
    keys = [k for k in cpu["examples"][0] if k not in ("pred", "eval_pred", "index")]
    a = np.array([[e[k] for k in keys] for e in cpu["examples"]])
    b = np.array([[e[k] for k in keys] for e in gpu["examples"]])
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


def test_onnx_report_shape(models, data, tmp_path):
    tor = run_json(models["mlp"], data["npy"], "-T", 20, "--labels", data["labels"])
    onx = run_json(models["onnx"], data["npy"], "-T", 20, "--labels", data["labels"])
    assert onx["summary"]["backend"] == "onnx" and onx["summary"]["sites"] == 2
    assert set(onx["summary"]) == set(tor["summary"]) - {"backend"} | {"backend"}
    assert list(onx["examples"][0]) == list(tor["examples"][0]) and len(onx["examples"]) == N
    # same weights: the deterministic pass agrees
    assert [e["eval_pred"] for e in onx["examples"]] == [e["eval_pred"] for e in tor["examples"]]
    assert onx["summary"]["eval"]["nll"] == pytest.approx(tor["summary"]["eval"]["nll"], abs=1e-5)
    ent = np.array([e["entropy"] for e in onx["examples"]])
    mi = np.array([e["mutual_info"] for e in onx["examples"]])
    assert np.all(mi >= 0) and np.all(ent >= mi - 1e-12) and np.any(mi > 0)
    # seeds and chunking invariance hold for ONNX too
    z = run_npz(models["onnx"], data["npy"], tmp_path / "a.npz", "-T", 40, "--keep-samples")
    z2 = run_npz(models["onnx"], data["npy"], tmp_path / "b.npz", "-T", 40, "--keep-samples", "--batch-size", 7,
                 "--max-memory", "2K")
    assert z["samples"].shape == (40, N, 10)
    assert np.array_equal(z["samples"], z2["samples"])
    cli_err("uncertainty", models["onnx"], "--input", tmp_path / "nope.npy", contains=("does not exist",))
