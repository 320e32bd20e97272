"""Errors: the right exit code (1 error, 2 usage, 130 interrupted), ONE line on stderr, no traceback
unless --debug, and nothing written (no output, no temporary file left in the output folder).

What counts as 'unsupported' for ONNX: a default-domain opset below 13 (dropcli's builders use the
opset-13 signatures). Ops of custom domains are passed through (see test_formats.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from dropcli.io import files as fsutil
from dropcli.cli.main import app
from models import MLP, save_as

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    m, ex = MLP(), torch.randn(2, 64)
    return {fmt: save_as(m, ex, d / f"mlp{ext}", fmt)
            for fmt, ext in (("export", ".pt2"), ("torchscript", ".pt"), ("onnx", ".onnx"), ("pickle", ".pkl"),
                             ("state_dict", ".sd"))}


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def run_err(args, code: int, out_dir: Path | None = None, *contains: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code}: {res.stderr}{res.exception!r}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    for c in contains:
        assert c.lower() in res.stderr.lower(), res.stderr
    if out_dir is not None:
        assert list(out_dir.iterdir()) == [], "something was written"
    return res


def test_missing_model(out_dir):
    run_err(["inject", out_dir.parent / "nope.pt2", "-o", out_dir / "o.pt2"], 1, out_dir, "does not exist")


@pytest.mark.parametrize("fmt", ["export", "torchscript", "onnx"])
def test_truncated_model(fmt, good, out_dir, tmp_path):
    data = good[fmt].read_bytes()
    bad = tmp_path / f"cut{good[fmt].suffix}"
    bad.write_bytes(data[: len(data) // 2])
    run_err(["inject", bad, "-o", out_dir / f"o{good[fmt].suffix}"], 1, out_dir, "truncated" if fmt != "onnx" else "complete")
    run_err(["inspect", bad], 1)


def test_corrupt_bytes(out_dir, tmp_path):
    bad = tmp_path / "junk.onnx"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    run_err(["inject", bad, "-o", out_dir / "o.onnx"], 1, out_dir, "not a model dropcli can read")
    zipbad = tmp_path / "junk.pt"  # a zip header followed by garbage
    zipbad.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    run_err(["inject", zipbad, "-o", out_dir / "o.pt"], 1, out_dir)


def test_empty_file(out_dir, tmp_path):
    (tmp_path / "e.onnx").write_bytes(b"")
    run_err(["inject", tmp_path / "e.onnx", "-o", out_dir / "o.onnx"], 1, out_dir, "empty")


def test_old_onnx_opset_is_unsupported(out_dir, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 7
    onnx.save(m, str(tmp_path / "op11.onnx"))
    run_err(["inject", tmp_path / "op11.onnx", "-o", out_dir / "o.onnx"], 1, out_dir, "opset 11", "13")


def test_data_dependent_control_flow_is_unsupported(out_dir, tmp_path):
    """A scripted `if` on tensor values can't become a graph dropcli rewrites."""
    src = tmp_path / "ctl.py"
    src.write_text(textwrap.dedent("""
        import torch
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
            def forward(self, x):
                h = torch.relu(self.a(x))
                if bool(h.sum() > 0):
                    h = h * 2
                return self.b(h)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import ctl  # noqa: F401

        torch.jit.save(torch.jit.script(ctl.M()), str(tmp_path / "ctl.pt"))
        torch.save(ctl.M(), str(tmp_path / "ctl.pkl"))
    finally:
        sys.path.remove(str(tmp_path))
    # TS2EP turns the `if` into torch.cond, which jit.trace can't write back as TorchScript
    run_err(["inject", tmp_path / "ctl.pt", "-o", out_dir / "o.pt", "--input-shape", "2x4"], 1, out_dir,
            "cannot write TorchScript", "--format")
    run_err(["inject", tmp_path / "ctl.pkl", "-o", out_dir / "o.pkl", "--trust-pickle", "--import", src], 1, out_dir,
            "cannot trace")


@pytest.mark.parametrize("p", ["1.0", "-0.1", "nan"])
def test_bad_p(p, good, out_dir):
    run_err(["inject", good["onnx"], "-o", out_dir / "o.onnx", "--p", p], 2, out_dir, "[0, 1)")


def test_non_numeric_p_is_a_usage_error(good, out_dir):
    res = runner.invoke(app, ["inject", str(good["onnx"]), "-o", str(out_dir / "o.onnx"), "--p", "abc"])
    assert res.exit_code == 2 and "--p" in res.stderr and "Traceback" not in res.stderr
    assert list(out_dir.iterdir()) == []


def test_unknown_variant(good, out_dir):
    run_err(["inject", good["export"], "-o", out_dir / "o.pt2", "--variant", "nosuch"], 2, out_dir,
            "unknown variant 'nosuch'", "standard")


def test_unknown_format(good, out_dir):
    run_err(["inject", good["export"], "-o", out_dir / "o.x", "--format", "keras"], 2, out_dir, "torchscript")


@pytest.mark.parametrize("fmt", ["export", "onnx"])
def test_selection_matching_nothing_lists_what_exists(fmt, good, out_dir):
    o = out_dir / "o"
    res = run_err(["inject", good[fmt], "-o", o, "--after", "conv"], 2, out_dir, "matches no", "kinds present", "linear")
    assert "fc1" in res.stderr
    res = run_err(["inject", good[fmt], "-o", o, "--layers", "nothing*"], 2, out_dir, "--layers nothing*", "fc1")
    run_err(["inject", good[fmt], "-o", o, "--after", "relu", "--exclude", "*"], 2, out_dir, "matches no")


def test_replace_without_dropout(good, out_dir):
    run_err(["inject", good["export"], "-o", out_dir / "o.pt2", "--replace"], 2, out_dir, "no dropout")


def test_output_is_input(good, tmp_path):
    src = tmp_path / "m.pt2"
    src.write_bytes(good["export"].read_bytes())
    before = src.read_bytes()
    run_err(["inject", src, "-o", src], 2, None, "is the input model", "--force")
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    # the same file through another spelling of the path
    run_err(["inject", src, "-o", tmp_path / "." / "m.pt2"], 2, None, "is the input model")
    # with --force it works, and atomically: a new file replaces the old one (new inode), no temp left
    ino = src.stat().st_ino
    res = runner.invoke(app, ["inject", str(src), "-o", str(src), "--force"])
    assert res.exit_code == 0, res.stderr
    assert src.read_bytes() != before and src.stat().st_ino != ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    ep = torch.export.load(str(src)).module()
    assert sum(k.endswith("dropcli_mc") for k, _ in ep.named_buffers()) == 2


def _unwritable_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    probe = d / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return d
    probe.unlink()  # root ignores the mode bits
    return d


def test_output_folder_not_writable(good, tmp_path):
    d = _unwritable_dir(tmp_path)
    try:
        if os.access(d, os.W_OK):  # running as root: chmod does not block writes
            pytest.skip("root can write to a 0555 folder; covered by the missing-folder and file-as-folder cases")
        run_err(["inject", good["onnx"], "-o", d / "o.onnx"], 1, None, "not writable")
        assert list(d.iterdir()) == []
    finally:
        d.chmod(0o755)


def test_output_folder_missing_or_a_file(good, tmp_path):
    run_err(["inject", good["onnx"], "-o", tmp_path / "no" / "such" / "o.onnx"], 1, None, "does not exist")
    assert not (tmp_path / "no").exists()
    f = tmp_path / "afile"
    f.write_text("x")
    run_err(["inject", good["onnx"], "-o", f / "o.onnx"], 1, None, "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and f.read_text() == "x"


def test_output_is_a_folder(good, tmp_path):
    (tmp_path / "d.onnx").mkdir()
    run_err(["inject", good["onnx"], "-o", tmp_path / "d.onnx"], 1, None, "is a folder")
    assert list((tmp_path / "d.onnx").iterdir()) == []


def test_pickle_needs_trust(good, out_dir):
    run_err(["inject", good["pickle"], "-o", out_dir / "o.pkl"], 1, out_dir, "--trust-pickle", "arbitrary code")
    run_err(["inspect", good["pickle"]], 1, None, "--trust-pickle")


def test_pickle_class_not_found(tmp_path, out_dir):
    mod = tmp_path / "ghostmod.py"
    mod.write_text("import torch\nclass Ghost(torch.nn.Module):\n"
                   "    def __init__(self):\n        super().__init__()\n        self.l = torch.nn.Linear(3, 3)\n"
                   "    def forward(self, x):\n        return self.l(x)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import ghostmod

        torch.save(ghostmod.Ghost(), str(tmp_path / "ghost.pkl"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ghostmod", None)
    # the module can't be imported at all
    run_err(["inject", tmp_path / "ghost.pkl", "-o", out_dir / "o.pkl", "--trust-pickle"], 1, out_dir,
            "ghostmod", "--import")
    # the module is there, but without the class
    other = tmp_path / "other"
    other.mkdir()
    (other / "ghostmod.py").write_text("X = 1\n")
    try:
        run_err(["inject", tmp_path / "ghost.pkl", "-o", out_dir / "o.pkl", "--trust-pickle", "--import",
                 other / "ghostmod.py"], 1, out_dir, "ghostmod.Ghost")
    finally:
        sys.modules.pop("ghostmod", None)


def test_state_dict_without_arch(good, out_dir):
    run_err(["inject", good["state_dict"], "-o", out_dir / "o.pt"], 2, out_dir, "state_dict", "--arch")
    run_err(["inject", good["state_dict"], "-o", out_dir / "o.pt", "--arch", "nocolon"], 2, out_dir, "--arch")


def test_debug_shows_traceback(good, out_dir):
    res = runner.invoke(app, ["--debug", "inject", str(good["onnx"]), "-o", str(out_dir / "o.onnx"), "--p", "1.0"])
    assert res.exit_code == 2
    assert "Traceback" in res.stderr and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert list(out_dir.iterdir()) == []


def test_subprocess_error_is_one_line(tmp_path):
    """The installed entry point: one line on stderr, exit code 1, no traceback."""
    r = subprocess.run(["dropcli", "inject", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_atomic_path_leaves_target_untouched(exc, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"original")
    with pytest.raises(type(exc)):
        with fsutil.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_bytes(b"half-written")
            raise exc
    assert target.read_bytes() == b"original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # and a new target is not created at all
    new = tmp_path / "new.pt2"
    with pytest.raises(type(exc)):
        with fsutil.atomic_path(new, ".pt2") as tmp:
            tmp.write_bytes(b"x")
            raise exc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("fmt,saver", [("export", "torch.export.save"), ("onnx", "onnx.save"),
                                       ("torchscript", "torch.jit.save")])
def test_ctrl_c_while_saving(fmt, saver, good, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: exit 130, 'nothing was written', no output and no temp file."""
    import importlib

    mod_name, fn = saver.rsplit(".", 1)
    mod = importlib.import_module(mod_name)
    real = getattr(mod, fn)

    def interrupted(obj, f, *a, **k):
        real(obj, f, *a, **k)  # the temp file is complete...
        raise KeyboardInterrupt  # ...when the user hits Ctrl-C, before the rename

    monkeypatch.setattr(mod, fn, interrupted)
    out = tmp_path / "out"
    out.mkdir()
    o = out / f"o{good[fmt].suffix}"
    run_err(["inject", good[fmt], "-o", o], 130, out, "interrupted", "nothing was written")
    assert not o.exists()


def test_ctrl_c_keeps_existing_output(good, tmp_path, monkeypatch):
    o = tmp_path / "o.onnx"
    o.write_bytes(b"previous result")
    real = onnx.save

    def interrupted(m, f, *a, **k):
        real(m, f, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", interrupted)
    run_err(["inject", good["onnx"], "-o", o], 130, None, "interrupted")
    assert o.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_labels_naming_no_file(good, tmp_path):
    """``--labels y`` (an array name, not a file) says what --labels takes."""
    x = tmp_path / "x.npz"
    np.savez(x, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    res = runner.invoke(app, ["uncertainty", str(good["onnx"]), "--input", str(x), "--labels", "y", "-T", "2",
                              "--inject", "standard"])
    assert res.exit_code == 1 and "Traceback" not in res.stderr and res.stdout == ""
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: labels file y does not exist") and "read without --labels" in last, res.stderr
