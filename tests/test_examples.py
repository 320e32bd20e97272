"""The README's quick start, run for real on the bundled examples.

* The main-job line of README.md is read from the README itself (so the two cannot drift),
  its `pip install` parts are dropped, and each `dropcli` command runs in a subprocess in a
  temporary folder holding a copy of examples/.
* Every injected model must equal its original in inference mode (bit for bit) and vary
  once MC mode is on (`*.dropcli_mc` buffers in torch, the `dropcli_mc` input in ONNX).
* The saved example models (examples/train_digits.py) reach >= 90% test accuracy.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
MAIN_JOB_PREFIX = "pip install torch==2.13.0 && pip install -e . &&"


def _data() -> dict[str, np.ndarray]:
    with np.load(EXAMPLES / "digits_test.npz") as d:
        return {k: d[k] for k in d.files}


def _input_for(model_path: str, data: dict[str, np.ndarray]) -> np.ndarray:
    return data["x_img"] if "cnn" in Path(model_path).name else data["x"]


def _readme_main_job() -> list[list[str]]:
    lines = [l.strip() for l in README.read_text().splitlines() if l.strip().startswith(MAIN_JOB_PREFIX)]
    assert len(lines) == 1, f"README.md must hold exactly one main-job line starting with {MAIN_JOB_PREFIX!r}"
    cmds = [shlex.split(part) for part in lines[0].split(" && ")]
    cmds = [c for c in cmds if c[0] != "pip"]
    assert cmds and all(c[0] == "dropcli" for c in cmds), cmds
    return cmds


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # `python -m dropcli.cli.main` is the `dropcli` console script, with this interpreter.
    return subprocess.run(
        [sys.executable, "-m", "dropcli.cli.main", *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=300,
    )


def _torch_load(path: Path):
    try:
        return torch.jit.load(str(path))
    except Exception:  # noqa: BLE001  (not TorchScript: a torch.export program)
        return torch.export.load(str(path)).module()


def _set_mc(model, on: bool) -> int:
    n = 0
    for name, buf in model.named_buffers():
        if name.endswith("dropcli_mc"):
            buf.fill_(on)
            n += 1
    return n


def test_readme_quick_start(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "examples", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    data = _data()
    injected = []
    for argv in _readme_main_job():
        r = _run(argv, tmp_path)
        assert r.returncode == 0, f"{shlex.join(argv)} exited {r.returncode}:\n{r.stderr}"
        if argv[1] == "inject":
            src = next(a for a in argv[2:] if not a.startswith("-") and a.startswith("examples/"))
            dst = argv[argv.index("-o") + 1]
            assert (tmp_path / dst).is_file(), f"{dst} was not written"
            injected.append((tmp_path / src, tmp_path / dst))

    kinds = set()
    for src, dst in injected:
        x = _input_for(str(src), data)
        if dst.suffix == ".onnx":
            kinds.add("onnx")
            ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
            sess = ort.InferenceSession(str(dst))
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], ref)
            np.testing.assert_array_equal(sess.run(None, {"x": x, "dropcli_mc": np.array(False)})[0], ref)
            mc1 = sess.run(None, {"x": x, "dropcli_mc": np.array(True)})[0]
            mc2 = sess.run(None, {"x": x, "dropcli_mc": np.array(True)})[0]
            assert mc1.shape == ref.shape
            assert not np.array_equal(mc1, ref) and not np.array_equal(mc1, mc2), "ONNX MC mode does not sample"
        else:
            kinds.add("torch")
            xt = torch.from_numpy(x)
            orig, new = _torch_load(src), _torch_load(dst)
            with torch.no_grad():
                ref = orig(xt)
                assert torch.equal(new(xt), ref), f"{dst.name} differs from {src.name} in inference mode"
                assert _set_mc(new, True) >= 1, f"{dst.name} has no dropcli_mc buffers"
                torch.manual_seed(0)
                mc1 = new(xt)
                torch.manual_seed(1)
                mc2 = new(xt)
                assert not torch.equal(mc1, ref) and not torch.equal(mc1, mc2), "torch MC mode does not sample"
                _set_mc(new, False)
                assert torch.equal(new(xt), ref), "switching MC mode off does not restore inference"
    assert kinds == {"torch", "onnx"}, f"the README main job should inject a torch and an ONNX model, got {kinds}"


@pytest.mark.parametrize("name", ["digits_mlp.pt", "digits_mlp.onnx", "digits_cnn.pt2", "digits_cnn.onnx"])
def test_example_models_accuracy(name: str) -> None:
    data = _data()
    x, y = _input_for(name, data), data["y"]
    assert x.dtype == np.float32 and y.dtype == np.int64 and len(x) == len(y)
    path = EXAMPLES / name
    if path.suffix == ".onnx":
        logits = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    else:
        with torch.no_grad():
            logits = _torch_load(path)(torch.from_numpy(x)).numpy()
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.90, f"{name}: test accuracy {acc:.3f} < 0.90"


def test_readme_test_command_matches_ci() -> None:
    """README's test command and .ci/run must stay the same command."""
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q tests'
    assert test_cmd in README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for part in re.split(r" && ", test_cmd):
        assert part in ci, f".ci/run lacks {part!r}"


def test_readme_variant_table_lists_every_variant() -> None:
    """The README's variant table is generated from the registry; a new variant must be added."""
    from dropcli.variants import load_all

    REGISTRY = load_all()
    text = README.read_text()
    table = text[text.index("| name | train rule |"):text.index("## MC-dropout uncertainty")]
    listed = set(re.findall(r"^\| `([a-z0-9-]+)`", table, flags=re.M))
    assert listed == set(REGISTRY), (sorted(set(REGISTRY) - listed), sorted(listed - set(REGISTRY)))


def test_inspect_torchscript_input_shape_keeps_feature_dim() -> None:
    """TS2EP marks every dim of a TorchScript input dynamic; inspect shows only the batch as N."""
    import json as _json

    r = _run(["dropcli", "inspect", str(EXAMPLES / "digits_mlp.pt"), "--json"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    layers = _json.loads(r.stdout)["layers"]
    assert layers[0]["kind"] == "input" and layers[0]["shape"] == [None, 64], layers[0]
