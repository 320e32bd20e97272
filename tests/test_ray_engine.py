"""`dropcli uncertainty --engine ray`: identity with the local engine, sharded inputs,
shard outputs, worker faults and one-line errors.

Ray runs on this machine with 2 CPUs, started ONCE for the module (the CLI, run in-process,
uses that instance and leaves it running). The tests that need Ray skip when the `ray`
extra is not installed; the tests of the shared pieces (statistics on parts of the data,
the no-Ray message, shard listing) run everywhere.

Identity is checked on the bytes of what the CLI writes: `--json` (the summary and every
example), JSONL, the NPZ with the raw samples; nothing is compared with a tolerance.
"""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dropcli.analysis import stats
from dropcli.cli.main import app
import helpers
from helpers import cli
from models import MLP, save_as

runner = CliRunner()
EXAMPLE_MODEL = Path(__file__).resolve().parent.parent / "examples" / "digits_mlp.pt"
N = 150
CUTS = [0, 37, 38, 90, 91, 150]  # uneven shards, two of them a single row


def cli_err(*args, code: int = 1, contains: tuple[str, ...] = ()):
    return helpers.cli_err(*args, code=code, contains=contains, ignore=("RAY_BACKEND_LOG_LEVEL",))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    import logging

    old = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
    else:
        os.environ["RAY_BACKEND_LOG_LEVEL"] = old


class Mixed(nn.Module):
    """Softmax probabilities times x[:, 0]: rows with x0 = 1 give probabilities, others do not,
    so whether the outputs "look like probabilities" is decided over all examples."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return torch.softmax(self.fc2(self.act(self.fc1(x))), -1) * x[:, :1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_models")
    torch.manual_seed(0)
    mlp = MLP()
    plain = save_as(mlp, torch.randn(2, 64), d / "mlp.pt2", "export")
    cli("--quiet", "inject", plain, "--p", 0.3, "--after", "relu", "-o", d / "mlp_mc.pt2")
    onnx_plain = save_as(mlp, torch.randn(2, 64), d / "mlp.onnx", "onnx")
    cli("--quiet", "inject", onnx_plain, "--p", 0.3, "--after", "relu", "-o", d / "mlp_mc.onnx")
    reg = save_as(MLP(d_out=1), torch.randn(2, 64), d / "reg.pt2", "export")
    cli("--quiet", "inject", reg, "--p", 0.2, "--after", "relu", "-o", d / "reg_mc.pt2")
    mixed = save_as(Mixed(), torch.randn(2, 8), d / "mixed.pt2", "export")
    cli("--quiet", "inject", mixed, "--p", 0.3, "--after", "relu", "-o", d / "mixed_mc.pt2")
    return {"mlp": d / "mlp_mc.pt2", "onnx": d / "mlp_mc.onnx", "reg": d / "reg_mc.pt2", "mixed": d / "mixed_mc.pt2",
            "plain": d / "mlp.pt2", "onnx_plain": d / "mlp.onnx"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 64)).astype(np.float32)
    y = rng.integers(0, 10, N)
    ood = (3 * rng.standard_normal((40, 64))).astype(np.float32)
    np.savez(d / "all.npz", x=x, y=y)
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    np.save(d / "ood.npy", ood)
    (d / "npz").mkdir()
    (d / "npy").mkdir()
    (d / "pq").mkdir()
    try:
        import pyarrow  # noqa: F401

        has_pa = True
    except ImportError:
        has_pa = False
    for i, (a, b) in enumerate(zip(CUTS, CUTS[1:])):
        # names sort as numbers: part-2 must come before part-10
        name = f"part-{[0, 2, 10, 11, 100][i]}"
        np.savez(d / "npz" / f"{name}.npz", x=x[a:b], y=y[a:b])
        np.save(d / "npy" / f"{name}.npy", x[a:b])
        if has_pa:
            import pyarrow as pa
            import pyarrow.parquet as pq

            tbl = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x[a:b].ravel()), 64), "y": pa.array(y[a:b])})
            pq.write_table(tbl, d / "pq" / f"{name}.parquet", row_group_size=16)
    return {"dir": d, "x": x, "y": y, "all": d / "all.npz", "npy": d / "x.npy", "labels": d / "y.npy", "ood": d / "ood.npy"}


def local_json(model, inp, *extra) -> bytes:
    return cli("--quiet", "uncertainty", model, "--input", inp, "-T", 20, "--json", *extra).stdout_bytes


def ray_json(model, inp, *extra) -> bytes:
    return cli("--quiet", "uncertainty", model, "--input", inp, "-T", 20, "--json", "--engine", "ray", *extra).stdout_bytes


# ----------------------------------------------------------------------------- no Ray needed


def test_per_example_statistics_do_not_depend_on_the_split():
    """The engines compute statistics on parts of the data and concatenate them: every
    part, including single examples, must give the full computation's bits."""
    rng = np.random.default_rng(1)
    for K, T in ((1, 50), (2, 33), (10, 100), (3, 1)):
        s = rng.standard_normal((T, 41, K)).astype(np.float32)
        for task in ("classification", "regression") if K > 1 else ("regression",):
            full = stats.per_example(s, task, 2.0)
            for a, b in ((0, 1), (1, 2), (40, 41), (0, 2), (3, 30), (17, 41)):
                part = stats.per_example(s[:, a:b], task, 2.0, as_probs=stats.looks_like_probs(s.astype(np.float64)))
                for k in full:
                    assert np.array_equal(full[k][a:b], part[k]), (K, T, task, k, a, b)


def test_no_ray_is_a_one_line_error_with_the_install_command(monkeypatch, tmp_path):
    real = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    res = cli_err("uncertainty", EXAMPLE_MODEL, "--input", tmp_path / "x.npy", "--engine", "ray",
                  contains=('pip install "dropcli[ray]"', "--engine ray"))
    assert "ray" in res.stderr


def test_engine_usage_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    m = EXAMPLE_MODEL
    cli_err("uncertainty", m, "--input", tmp_path / "x.npy", "--workers", 2, code=2, contains=("--engine ray",))
    cli_err("uncertainty", m, "--input", tmp_path / "x.npy", "--engine", "spark", code=2, contains=("--engine",))
    cli_err("uncertainty", m, "--input", tmp_path / "x.npy", "--format", "parquet", "--output", "-", code=2, contains=("parquet",))


def test_sharded_input_order_and_missing_shards(data, models, tmp_path):
    """Shards sort by name with numbers as numbers; the local engine reads them too."""
    from dropcli.io.shards import list_shards

    names = [Path(p).name for p in list_shards(str(data["dir"] / "npz"))]
    assert names == ["part-0.npz", "part-2.npz", "part-10.npz", "part-11.npz", "part-100.npz"]
    base = local_json(models["mlp"], data["all"])
    assert local_json(models["mlp"], data["dir"] / "npz") == base
    assert local_json(models["mlp"], str(data["dir"] / "npz" / "part-*.npz")) == base
    assert local_json(models["mlp"], data["dir"] / "npy", "--labels", data["labels"]) == local_json(
        models["mlp"], data["npy"], "--labels", data["labels"])
    # a missing shard in a list, a glob with no match, a broken link in a folder: one line naming it
    lst = f"{data['dir'] / 'npz' / 'part-0.npz'},{tmp_path / 'part-7.npz'}"
    cli_err("uncertainty", models["mlp"], "--input", lst, contains=("part-7.npz", "does not exist"))
    cli_err("uncertainty", models["mlp"], "--input", str(tmp_path / "nothing-*.npz"), contains=("nothing-*.npz",))
    d = tmp_path / "broken"
    d.mkdir()
    np.save(d / "a.npy", data["x"][:3])
    os.symlink(tmp_path / "gone.npy", d / "b.npy")
    cli_err("uncertainty", models["mlp"], "--input", d, contains=("b.npy", "does not exist"))
    (d / "b.npy").unlink()
    (d / "b.npy").write_bytes(b"\x93NUMPY garbage")
    cli_err("uncertainty", models["mlp"], "--input", d, contains=("b.npy", "cannot read"))


# ----------------------------------------------------------------------------- with Ray


def test_identity_with_local_one_and_two_workers(ray_local, models, data):
    """Multi-shard input (uneven, single-row shards), labels from the shards, OOD input:
    the whole --json report (summary and every example) is byte-identical to the local
    engine on one file, with 1 and with 2 workers and another --batch-size."""
    base = local_json(models["mlp"], data["all"], "--ood", data["ood"])
    one = ray_json(models["mlp"], data["dir"] / "npz", "--ood", data["ood"], "--workers", 1)
    two = ray_json(models["mlp"], str(data["dir"] / "npz" / "part-*.npz"), "--ood", data["ood"], "--workers", 2,
                   "--batch-size", 16, "--max-memory", "64M")
    assert one == base
    assert two == base
    rep = json.loads(base)
    assert rep["summary"]["n"] == N and "error_auroc" in rep["summary"] and "ood" in rep["summary"]
    assert [e["index"] for e in rep["examples"]] == list(range(N))


def test_onnx_parquet_shards_to_jsonl_and_parquet_folders(ray_local, models, data, tmp_path):
    """ONNX runner; Parquet shards in; a folder of JSONL shards out whose concatenation is
    the local engine's JSONL file, summary.json equal to the local summary; Parquet out."""
    local_file = tmp_path / "local.jsonl"
    cli("--quiet", "uncertainty", models["onnx"], "--input", data["all"], "-T", 20, "--output", local_file)
    local_summary = json.loads(local_json(models["onnx"], data["all"]))["summary"]
    out = tmp_path / "out"
    res = cli("--quiet", "uncertainty", models["onnx"], "--input", data["dir"] / "pq", "-T", 20, "--engine", "ray",
              "--workers", 2, "--output", out, "--format", "jsonl", "--json")
    parts = sorted(out.glob("part-*.jsonl"))
    assert [p.name for p in parts] == [f"part-{k:05d}.jsonl" for k in range(5)]
    assert b"".join(p.read_bytes() for p in parts) == local_file.read_bytes()
    assert [len(p.read_text().splitlines()) for p in parts] == list(np.diff(CUTS))
    assert json.loads((out / "summary.json").read_text()) == local_summary
    assert json.loads(res.stdout)["summary"] == local_summary
    # parquet out, and a second run refuses to write into the non-empty folder
    import pyarrow.parquet as pq

    out2 = tmp_path / "out2"
    cli("--quiet", "uncertainty", models["onnx"], "--input", data["dir"] / "pq", "-T", 20, "--engine", "ray",
        "--workers", 2, "--output", out2, "--format", "parquet")
    import pyarrow as pa

    tbl = pa.concat_tables([pq.read_table(p) for p in sorted(out2.glob("part-*.parquet"))])
    recs = [json.loads(line) for line in local_file.read_text().splitlines()]
    assert tbl.column("index").to_pylist() == list(range(N))
    for k in ("pred", "confidence", "mutual_info", "mean_3", "std_9", "eval_pred"):
        assert tbl.column(k).to_pylist() == [r[k] for r in recs], k
    cli_err("uncertainty", models["onnx"], "--input", data["dir"] / "pq", "--engine", "ray", "--output", out2,
            code=2, contains=("not empty",))


def test_regression_keep_samples_npz_identical(ray_local, models, data, tmp_path):
    """Regression, the raw [T, N, K] samples and every column in an NPZ: the same bytes."""
    a, b = tmp_path / "local.npz", tmp_path / "ray.npz"
    common = ("-T", 40, "--task", "regression", "--tau", 2.0, "--keep-samples")
    cli("--quiet", "uncertainty", models["reg"], "--input", data["npy"], *common, "--output", a)
    cli("--quiet", "uncertainty", models["reg"], "--input", data["dir"] / "npy", *common, "--output", b,
        "--engine", "ray", "--workers", 2, "--batch-size", 8)
    assert a.read_bytes() == b.read_bytes()
    with np.load(a) as z:
        assert z["samples"].shape == (40, N, 1)


def test_probability_decision_is_over_all_examples(ray_local, models, tmp_path):
    """Some shards' outputs look like probabilities and others do not; the local engine
    decides over all samples (softmax), so the Ray engine must redo the shards that
    decided alone; the reports are identical."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    x[:, 0] = 1.0
    x[30:, 0] = 3.0  # rows 30.. are probabilities times 3
    d = tmp_path / "mixed"
    d.mkdir()
    np.save(tmp_path / "all.npy", x)
    for i, (a, b) in enumerate(((0, 30), (30, 60))):
        np.save(d / f"s{i}.npy", x[a:b])
    base = local_json(models["mixed"], tmp_path / "all.npy")
    assert ray_json(models["mixed"], d, "--workers", 2) == base


def crash_once_at(row: int, marker: str):
    """A unit hook (dropcli.engines.ray.UNIT_HOOKS) that kills the actor process holding ``row``
    of the input, the first time only (the marker file, written before it dies, says so). A
    closure, so Ray pickles it by value: the actors need not import this test module."""

    def hook(src: int, start: int, stop: int) -> None:
        if src == 0 and start <= row < stop and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(17)  # the worker dies mid-run; the next attempt finds the marker

    return hook


def test_worker_killed_mid_run_is_retried(ray_local, models, data, tmp_path, monkeypatch):
    """An actor exits (os._exit) while it holds the unit with row 95; Ray restarts it and
    re-runs the unit; each example is reported once and the report equals the local one.
    The fault comes from the test: a hook registered in dropcli.engines.ray.UNIT_HOOKS."""
    from dropcli.engines import ray as ray_engine

    marker = tmp_path / "crashed"
    monkeypatch.setattr(ray_engine, "UNIT_HOOKS", [crash_once_at(95, str(marker))])
    local_file = tmp_path / "local.jsonl"
    cli("--quiet", "uncertainty", models["mlp"], "--input", data["all"], "-T", 20, "--output", local_file)
    out = tmp_path / "out"
    cli("--quiet", "uncertainty", models["mlp"], "--input", data["dir"] / "npz", "-T", 20, "--engine", "ray",
        "--workers", 2, "--batch-size", 8, "--output", out)
    assert marker.exists(), "the test hook did not fire"
    text = b"".join(p.read_bytes() for p in sorted(out.glob("part-*.jsonl")))
    idx = [json.loads(line)["index"] for line in text.decode().splitlines()]
    assert sorted(idx) == idx == list(range(N))
    assert text == local_file.read_bytes()


# each format once and each --quiet once (a Ray Data run costs ~10 s here; the four-way product
# ran no code these two do not: the format acts on the actors' loading, --quiet on stderr)
@pytest.mark.parametrize("which,quiet", [("plain", True), ("onnx_plain", False)])
def test_inject_on_the_fly_in_the_actors(ray_local, models, data, which, quiet):
    """--inject with --engine ray: every actor injects the same sites into its copy of the
    model (it used to fail with UnboundLocalError in each actor); the report is the local
    engine's, byte for byte, with and without --quiet."""
    inj = ("--inject", "standard", "--p", 0.25, "--after", "relu")
    q = ("--quiet",) if quiet else ()
    base = cli(*q, "uncertainty", models[which], "--input", data["all"], "-T", 20, "--json", *inj).stdout_bytes
    got = cli(*q, "uncertainty", models[which], "--input", data["dir"] / "npz", "-T", 20, "--json", "--engine", "ray",
              "--workers", 2, *inj).stdout_bytes
    assert got == base
    assert json.loads(got)["summary"]["sites"] == 2


def test_unreadable_shard_in_a_worker_is_one_line(ray_local, models, data, tmp_path):
    """A shard whose header is fine but whose data is cut short fails in the worker that
    reads it; the error comes back as one line naming the shard."""
    d = tmp_path / "cut"
    d.mkdir()
    np.save(d / "a.npy", data["x"][:20])
    np.save(d / "b.npy", data["x"][20:60])
    raw = (d / "b.npy").read_bytes()
    (d / "b.npy").write_bytes(raw[: len(raw) - 1000])
    cli_err("uncertainty", models["mlp"], "--input", d, "--engine", "ray", contains=("b.npy",))
    # NaN in a shard: the value check runs in the worker, the message names the shard
    bad = data["x"][20:60].copy()
    bad[5, 3] = np.nan
    np.save(d / "b.npy", bad)
    cli_err("uncertainty", models["mlp"], "--input", d, "--engine", "ray", contains=("b.npy", "NaN"))


def test_unreachable_address_is_one_line(ray_local, models, data):
    cli_err("uncertainty", models["mlp"], "--input", data["npy"], "--engine", "ray", "--address", "127.0.0.1:1",
            contains=("127.0.0.1:1", "cannot reach"))
    cli_err("uncertainty", models["mlp"], "--input", data["npy"], "--engine", "ray", "--address", "no-such-host.invalid:6379",
            contains=("no-such-host.invalid:6379",))
    cli_err("uncertainty", models["mlp"], "--input", data["npy"], "--engine", "ray", "--address", "nonsense",
            contains=("nonsense",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_device_cuda_runs_on_the_pool(ray_local, models, data):
    """--device cuda: each actor asks Ray for a GPU; the report matches the local engine's
    on the same GPU (GPU kernels are not bitwise across batch shapes: compared to 1e-5)."""
    loc = json.loads(local_json(models["mlp"], data["all"], "--device", "cuda"))
    ray = json.loads(ray_json(models["mlp"], data["dir"] / "npz", "--device", "cuda"))
    assert [e["index"] for e in ray["examples"]] == list(range(N))
    for a, b in zip(loc["examples"], ray["examples"]):
        for k, v in a.items():
            assert b[k] == pytest.approx(v, abs=1e-5), k


def test_model_from_stdin(ray_local, models, data):
    """`... -o - | dropcli uncertainty - --engine ray`: the workers get the bytes read from stdin;
    the report equals the local engine's on the file (apart from the model's name)."""
    base = json.loads(local_json(models["onnx"], data["all"]))
    res = runner.invoke(app, ["--quiet", "uncertainty", "-", "--input", str(data["all"]), "-T", 20, "--engine", "ray",
                              "--workers", 1, "--json"], input=models["onnx"].read_bytes())
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["summary"].pop("model") == "-"
    base["summary"].pop("model")
    assert got == base
