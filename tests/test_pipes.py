"""Models through shell pipes: `-` as the model path reads stdin, `-o -` writes stdout.

A real pipe (two processes) for the headline case; in-process runs for the rest. The model that
comes out of a pipe equals the one written to a file, byte for byte where the writer is
deterministic and in output otherwise; the bad combinations get a one-line error, exit 2, and
leave stdout empty."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from dropcli.cli.main import app
from helpers import cli
from models import MLP, save_as

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DROPCLI = [sys.executable, "-m", "dropcli.cli.main"]


def _pipe(args: list, data: bytes) -> "CliRunner.invoke":
    return CliRunner().invoke(app, [str(a) for a in args], input=data)


def test_shell_pipeline_inject_into_uncertainty(tmp_path):
    """`dropcli inject model.onnx ... -o - | dropcli uncertainty - ...`, two real processes,
    gives what the same steps through a file give."""
    x = EXAMPLES / "digits_test.npz"
    inject = subprocess.Popen([*DROPCLI, "inject", str(EXAMPLES / "digits_mlp.onnx"), "--variant", "gaussian",
                               "--after", "relu", "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    unc = subprocess.run([*DROPCLI, "uncertainty", "-", "--input", str(x), "-T", "8", "--seed", "3", "--json"],
                         stdin=inject.stdout, capture_output=True, timeout=300)
    inject.stdout.close()
    assert inject.wait(timeout=300) == 0, inject.stderr.read().decode()
    assert unc.returncode == 0, unc.stderr.decode()
    assert b"inject: 2 site(s)" in inject.stderr.read()  # the table went to stderr
    piped = json.loads(unc.stdout)
    f = tmp_path / "mc.onnx"
    cli("inject", EXAMPLES / "digits_mlp.onnx", "--variant", "gaussian", "--after", "relu", "-o", f)
    direct = json.loads(cli("uncertainty", f, "--input", x, "-T", 8, "--seed", 3, "--json").stdout)
    assert piped["examples"] == direct["examples"]
    assert piped["summary"]["sites"] == 2 and piped["summary"]["model"] == "-"


@pytest.mark.parametrize("fmt,ext", [("onnx", "onnx"), ("torchscript", "pt"), ("export", "pt2")])
def test_stdin_to_stdout_equals_file_to_file(tmp_path, fmt, ext):
    torch.manual_seed(0)
    m = MLP(d_in=6, hidden=8, d_out=3, p=0.0).eval()
    src = save_as(m, torch.zeros(2, 6), tmp_path / f"m.{ext}", fmt)
    args = ["--variant", "standard", "--after", "relu", "--p", "0.25"]
    res = _pipe(["inject", "-", *args, "-o", "-"], src.read_bytes())
    assert res.exit_code == 0, res.output
    piped = tmp_path / f"piped.{ext}"
    piped.write_bytes(res.stdout_bytes)
    direct = tmp_path / f"direct.{ext}"
    cli("inject", src, *args, "-o", direct)
    x = np.random.default_rng(0).random((4, 6), dtype=np.float32)
    if fmt == "onnx":
        assert piped.read_bytes() == direct.read_bytes()
        y = ort.InferenceSession(str(piped)).run(None, {"x": x})[0]
    else:
        load = torch.jit.load if fmt == "torchscript" else (lambda p: torch.export.load(p).module())
        with torch.no_grad():
            y = load(str(piped))(torch.from_numpy(x)).numpy()
            np.testing.assert_array_equal(y, load(str(direct))(torch.from_numpy(x)).numpy())
    with torch.no_grad():
        np.testing.assert_allclose(y, m(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)  # inference mode
    rows = json.loads(cli("inspect", piped, "--json").stdout)["layers"]
    assert [r["dropout"]["p"] for r in rows if r["dropout"]] == [0.25, 0.25]


def test_bad_pipes_are_one_line_errors(tmp_path):
    onnx_bytes = (EXAMPLES / "digits_mlp.onnx").read_bytes()
    cases = [
        (["inject", "-", "--after", "relu", "-o", "-"], b"", 1, "no model on stdin"),
        (["inject", "-", "--after", "relu", "-o", "-", "--json"], onnx_bytes, 2, "--json would both write to stdout"),
        (["uncertainty", "-", "--input", "-", "--inject", "standard"], onnx_bytes, 2, "stdin already carries the model"),
        (["finetune", "-", "--data", "-", "--variant", "concrete", "-o", tmp_path / "o.onnx"], onnx_bytes, 2,
         "stdin already carries the model"),
        (["finetune", EXAMPLES / "digits_mlp.onnx", "--data", EXAMPLES / "digits_test.npz", "--variant", "concrete",
          "-o", "-", "--report", "-"], b"", 2, "--report - would both write to stdout"),
        (["inject", "-", "--after", "nothing_matches", "-o", "-"], onnx_bytes, 2, ""),  # fails after reading: stdout empty
    ]
    for args, data, code, msg in cases:
        res = _pipe(args, data)
        assert res.exit_code == code, (args, res.output)
        assert msg in res.stderr and "Traceback" not in res.output, (args, res.stderr)
        assert res.stdout_bytes == b"", args  # nothing half-written to stdout
    assert not (tmp_path / "o.onnx").exists()


def test_training_commands_write_to_stdout(tmp_path):
    """finetune and prune with -o -: the model on stdout, the report table on stderr."""
    res = _pipe(["finetune", "-", "--data", EXAMPLES / "digits_test.npz", "--variant", "concrete", "--epochs", 1,
                 "--samples", 4, "-o", "-"], (EXAMPLES / "digits_mlp.pt").read_bytes())
    assert res.exit_code == 0, res.output
    assert "learned p" in res.stderr
    out = tmp_path / "ft.pt"
    out.write_bytes(res.stdout_bytes)
    rows = json.loads(cli("inspect", out, "--json").stdout)["layers"]
    assert sum(1 for r in rows if r["dropout"]) == 2
    res = _pipe(["prune", "-", "--data", EXAMPLES / "digits_test.npz", "--epochs", 1, "--retrain-epochs", 0, "--allow-larger", "-o", "-"],
                (EXAMPLES / "digits_mlp.onnx").read_bytes())
    assert res.exit_code == 0, res.output
    pruned = tmp_path / "pruned.onnx"
    pruned.write_bytes(res.stdout_bytes)
    x = np.load(EXAMPLES / "digits_test.npz")["x"][:5].astype(np.float32)
    assert ort.InferenceSession(str(pruned)).run(None, {"x": x})[0].shape == (5, 10)
