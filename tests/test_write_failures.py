"""A write that fails part-way (a full disk, a quota, a file-size limit) is one line, exit 1, and
leaves no temporary file and no partial output; the input and an earlier output stay as they were.

The failure is real, not mocked: the command runs in a subprocess whose file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored) makes the operating system refuse writes past a few KB,
the way a full disk refuses them. torch's own file writers used to abort the whole process
(SIGABRT, a C++ stack dump) on such an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dropcli.errors import DropcliError
from dropcli.io.files import atomic_path

resource = pytest.importorskip("resource")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LIMIT = 8000  # bytes: every model and report below is larger


def _limited():
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def run_limited(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dropcli.cli.main", *args], cwd=cwd, preexec_fn=_limited,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_failure(r: subprocess.CompletedProcess, target: Path) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot write {target}" in errors[0] and "File too large" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "frame #" not in r.stderr, r.stderr


@pytest.mark.parametrize("src,name", [("digits_mlp.pt", "out.pt"), ("digits_cnn.pt2", "out.pt2"),
                                      ("digits_mlp.onnx", "out.onnx")])
def test_model_write_fails_cleanly(tmp_path, src, name):
    model = tmp_path / src
    shutil.copy(EXAMPLES / src, model)
    before = model.read_bytes()
    out = tmp_path / "out" / name
    out.parent.mkdir()
    r = run_limited("inject", str(model), "--p", "0.2", "-o", str(out), cwd=tmp_path)
    assert_one_line_failure(r, out)
    assert os.listdir(out.parent) == []  # no temporary file, no partial model
    assert model.read_bytes() == before


def test_report_write_keeps_the_earlier_output(tmp_path):
    out = tmp_path / "records.jsonl"
    out.write_text("an earlier run\n")
    r = run_limited("uncertainty", str(EXAMPLES / "digits_mlp.pt"), "--input", str(EXAMPLES / "digits_test.npz"),
                    "-T", "5", "--output", str(out), cwd=tmp_path)
    assert_one_line_failure(r, out)
    assert out.read_text() == "an earlier run\n"
    assert sorted(os.listdir(tmp_path)) == ["records.jsonl"]


def test_atomic_path_names_the_output_not_its_temporary_file(tmp_path):
    """Nested atomic writes (prune and finetune check a model in its temporary file before it
    lands) name the user's output, and an OSError from the writer becomes a DropcliError."""
    target = tmp_path / "model.pt"
    with pytest.raises(DropcliError) as e:
        with atomic_path(target) as outer:
            with atomic_path(outer) as inner:
                inner.write_bytes(b"partial")
                raise OSError(28, "No space left on device")
    assert str(target) in e.value.one_line() and "No space left on device" in e.value.one_line()
    assert ".tmp" not in e.value.one_line().split(":")[0]
    assert os.listdir(tmp_path) == []
