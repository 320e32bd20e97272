"""The Python API (``import dropcli``): every verb on the bundled examples, each checked against
the CLI's ``--json`` for the same arguments and seed (the CLI is a thin layer over these
functions, so the two must agree exactly), plus what the API adds: models and arrays in
memory, copies instead of edits in place, exceptions instead of exit codes, a light import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dropcli
from dropcli.errors import DropcliError, UsageError
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
MLP_PT = EX / "digits_mlp.pt"
MLP_ONNX = EX / "digits_mlp.onnx"
DATA = EX / "digits_test.npz"


@pytest.fixture(scope="module")
def digits():
    with np.load(DATA) as d:
        return {k: d[k] for k in d.files}


def cli_json(*args) -> dict:
    return json.loads(cli("--quiet", *args, "--json").stdout)


# ----------------------------------------------------------------------------- import


def test_import_dropcli_is_light_and_lazy():
    """`import dropcli` loads no torch, onnx or numpy; the verbs load on first use; prune and
    variants are both API functions and subpackages."""
    code = (
        "import sys, dropcli\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'dropcli.api') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(dropcli.uncertainty) and 'dropcli.api' in sys.modules\n"
        "import dropcli.variants as V, dropcli.prune.core\n"
        "assert callable(dropcli.variants) and callable(dropcli.prune) and V.get_variant('standard').name == 'standard'\n"
        "assert dropcli.prune.core.PruneConfig is sys.modules['dropcli.prune.core'].PruneConfig\n"
        "assert dropcli.variants('standard')['name'] == 'standard'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ----------------------------------------------------------------------------- verbs vs the CLI


def test_variants_and_inspect_equal_the_cli():
    assert dropcli.variants() == cli_json("variants")
    for m in (MLP_PT, MLP_ONNX):
        assert dropcli.inspect(str(m)) == cli_json("inspect", m)
        assert dropcli.inspect(dropcli.load(m)) == cli_json("inspect", m)


def test_inject_returns_a_copy_equal_to_the_cli_output(tmp_path):
    m = dropcli.load(MLP_ONNX)
    before = [l.name for l in m.layers()]
    m2 = dropcli.inject(m, "standard", p=0.1, after="relu")
    assert [l.name for l in m.layers()] == before  # the caller's model is unchanged
    assert dropcli.save(m2, tmp_path / "api.onnx") == "onnx"
    rep = cli_json("inject", MLP_ONNX, "--variant", "standard", "--p", 0.1, "--after", "relu", "-o", tmp_path / "cli.onnx")
    assert (tmp_path / "api.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    assert len(rep["sites"]) == 2
    assert dropcli.inspect(m2)["layers"] == dropcli.inspect(str(tmp_path / "cli.onnx"))["layers"]
    # variant parameters are keyword arguments; remove strips the sites again
    m3 = dropcli.inject(m2, remove=True)
    assert not any(l.kind == "dropout" for l in m3.layers())
    with pytest.raises(UsageError, match="unknown variant"):
        dropcli.inject(m, "no-such-variant")
    with pytest.raises(UsageError, match="unknown variant parameter"):
        dropcli.inject(m, "standard", p=0.1, hole=3)


def test_uncertainty_equals_the_cli_json(tmp_path, digits):
    """Path in, path out: the API's report is the CLI's --json, byte for byte once serialised
    the same way; the arrays are the per-example columns."""
    cli("--quiet", "inject", MLP_ONNX, "--p", 0.2, "--after", "relu", "-o", tmp_path / "mc.onnx")
    mc = str(tmp_path / "mc.onnx")
    want = cli_json("uncertainty", mc, "--input", DATA, "-T", 20, "--seed", 3)
    r = dropcli.uncertainty(mc, str(DATA), T=20, seed=3)
    assert r.to_json() == want
    assert r.task == "classification" and r.n == 360
    assert r.mean.shape == (360, 10) and r.samples.shape == (20, 360, 10)
    ex = want["examples"]
    np.testing.assert_array_equal(r.mutual_info, [e["mutual_info"] for e in ex])
    np.testing.assert_array_equal(r.entropy, [e["entropy"] for e in ex])
    assert r.summary["mc"]["accuracy"] == want["summary"]["mc"]["accuracy"]
    # a loaded model and arrays in memory: the same numbers (the report names the model by its source)
    r2 = dropcli.uncertainty(dropcli.load(mc), digits["x"], labels=digits["y"], T=20, seed=3)
    got = r2.to_json()
    assert got["summary"].pop("model") == mc
    want["summary"].pop("model")
    assert got == want


def test_uncertainty_inject_on_the_fly_and_moments_of_the_cli(tmp_path, digits):
    want = cli_json("uncertainty", MLP_ONNX, "--input", DATA, "-T", 10, "--inject", "standard", "--p", 0.3,
                    "--after", "relu")
    m = dropcli.load(MLP_ONNX)
    n_layers = len(m.layers())
    lines = []
    r = dropcli.uncertainty(str(MLP_ONNX), str(DATA), T=10, inject="standard", p=0.3, after="relu", log=lines.append)
    assert r.to_json() == want
    assert lines[0] == "injected standard (p=0.3) at 2 site(s), not saved"
    r2 = dropcli.uncertainty(m, digits["x"], labels=digits["y"], T=10, inject="standard", p=0.3, after="relu")
    assert np.array_equal(r2.mean, r.mean)
    assert len(m.layers()) == n_layers  # on-the-fly sites went into a copy
    # regression (no labels), with tau, and the gate
    np.save(tmp_path / "x.npy", digits["x"][:50])
    rr = dropcli.uncertainty(str(MLP_PT), str(tmp_path / "x.npy"), T=10, task="regression", tau=2.0, fail_above="std=0.0")
    wr = json.loads(cli("--quiet", "uncertainty", MLP_PT, "--input", tmp_path / "x.npy", "-T", 10, "--task", "regression",
                        "--tau", 2.0, "--fail-above", "std=0.0", "--json", code=3).stdout)
    assert rr.to_json() == wr and rr.tripped and rr.summary["gate"]["tripped"]
    assert rr.task == "regression" and rr.var.shape == (50, 10)


def test_analyze_equals_the_cli_json(digits):
    want = cli_json("analyze", MLP_PT, "--input", DATA, "-T", 8, "--seed", 1)
    seen = []

    def progress(label, total):
        import contextlib

        @contextlib.contextmanager
        def bar():
            seen.append((label, total))
            yield lambda k=1, info=None: seen.append(k)

        return bar()

    assert dropcli.analyze(str(MLP_PT), str(DATA), T=8, seed=1, progress=progress) == want
    assert seen[0] == ("analyze", 360) and sum(seen[1:]) == 360
    got = dropcli.analyze(dropcli.load(MLP_PT), digits["x"], digits["y"], T=8, seed=1)
    assert got.pop("model") == str(MLP_PT)
    want.pop("model")
    assert got == want


def test_convert_equals_the_cli(tmp_path):
    rep = cli_json("convert", MLP_PT, "--to", "vanilla", "-o", tmp_path / "cli.pt")
    m = dropcli.load(MLP_PT)
    v = dropcli.convert(m, "vanilla")
    assert [l["convention"] for l in dropcli.inspect(v)["layers"] if "convention" in l] == ["vanilla"] * len(rep["converted"])
    assert all(l.get("convention") != "vanilla" for l in dropcli.inspect(m)["layers"])  # a copy
    dropcli.save(v, tmp_path / "api.pt")
    assert dropcli.inspect(str(tmp_path / "api.pt"))["layers"] == dropcli.inspect(str(tmp_path / "cli.pt"))["layers"]
    with pytest.raises(UsageError, match="--to"):
        dropcli.convert(m, "sideways")


SLOW_KEYS = ("latency_ms_before", "latency_ms_after", "output", "size_after")


def outputs(tmp_path, name):
    """The same file name in two folders (a TorchScript archive records its file name)."""
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    return tmp_path / "cli" / name, tmp_path / "api" / name


def test_prune_equals_the_cli_json(tmp_path):
    via_cli, via_api = outputs(tmp_path, "small.pt")
    want = cli_json("prune", MLP_PT, "--data", DATA, "--epochs", 2, "--retrain-epochs", 1, "--kl-weight", 0.1,
                    "--allow-larger", "-o", via_cli)
    got = dropcli.prune(str(MLP_PT), str(DATA), str(via_api), epochs=2, retrain_epochs=1, kl_weight=0.1, seed=0,
                         allow_larger=True)
    for rep in (want, got):
        for k in SLOW_KEYS:
            rep["summary"].pop(k)
    assert got == want
    # the archives record their (temporary) file name: compare the weights
    import torch

    a, b = torch.jit.load(str(via_api)).state_dict(), torch.jit.load(str(via_cli)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_equals_the_cli_json(tmp_path):
    via_cli, via_api = outputs(tmp_path, "learned.onnx")
    want = cli_json("finetune", MLP_ONNX, "--data", DATA, "--variant", "concrete", "--after", "relu", "--epochs", 1,
                    "--samples", 4, "-o", via_cli)
    got = dropcli.finetune(dropcli.load(MLP_ONNX), str(DATA), str(via_api), variant="concrete", after="relu",
                           epochs=1, samples=4)
    for rep in (want, got):
        rep["summary"].pop("output")
    assert got == want
    assert via_api.read_bytes() == via_cli.read_bytes()


# ----------------------------------------------------------------------------- errors


def test_errors_are_exceptions_with_the_cli_message(tmp_path, digits):
    with pytest.raises(DropcliError, match="has no dropout sites") as e:
        dropcli.uncertainty(str(MLP_ONNX), digits["x"], T=5)
    assert "--inject standard" in e.value.one_line()
    with pytest.raises(UsageError, match="--samples must be >= 1"):
        dropcli.uncertainty(str(MLP_PT), digits["x"], T=0)
    with pytest.raises(UsageError, match="unknown --task"):
        dropcli.analyze(str(MLP_PT), digits["x"], task="ranking")
    with pytest.raises(DropcliError, match="missing.pt"):
        dropcli.load(tmp_path / "missing.pt")


def test_ray_engine_takes_a_model_path(digits):
    pytest.importorskip("ray")
    with pytest.raises(UsageError, match="engine='ray'"):
        dropcli.uncertainty(dropcli.load(MLP_PT), digits["x"], T=5, engine="ray")


def test_readme_python_api_section_runs(tmp_path):
    """The README's "Python API" example runs as written (in a copy of examples/)."""
    import shutil

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copytree(EX, tmp_path / "examples", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "has no dropout sites" in r.stdout
    for name in ("digits_mlp_mc.onnx", "digits_mlp_small.pt", "digits_mlp_learned.onnx"):
        assert (tmp_path / name).exists(), name
