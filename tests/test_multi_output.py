"""Models with several outputs (issue 15): `prune` and `finetune` train on the first output and
keep the others, in the structure the model returned them, in every format.

The model: a body (fc0 -> relu -> fc1 -> relu = the features ``h``), a head on ``h`` (the logits,
the first output) and a side head ``aux`` on ``h`` that the logits do not read. fc0 has dead
units by construction (zero rows and zero fc1 columns), so the pruned model must shrink; fc1 has
one that only the other outputs read, which must stay; the
learning rate is tiny, so nothing else moves and the written model must give the original's
outputs: the logits and ``h`` (whose width prune must keep), and ``aux`` still computed by the
untouched side head from the pruned body.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dropcli
from dropcli.model import formats

HERE = str(Path(__file__).resolve())
DEAD = [1, 4, 7, 9]  # fc0's dead units
TORCH_FORMATS = ("pt2kw", "pt2", "ts", "pickle", "state_dict")


class Heads(nn.Module):
    def __init__(self, out: str = "tuple"):
        super().__init__()
        self.out = out
        self.fc0 = nn.Linear(6, 12)
        self.fc1 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)
        with torch.no_grad():
            for m in (self.fc0, self.fc1, self.head, self.aux):  # no weight near 0: only the dead units get cut
                m.weight.copy_(m.weight.sign() * m.weight.abs().clamp(min=0.1))
            self.fc0.weight[DEAD] = 0
            self.fc0.bias[DEAD] = 0
            self.fc1.weight[:, DEAD] = 0
            # fc1's unit 5 is constant 0 and the logits do not read it: dead for the first output,
            # but it is a column of the features output, so prune must keep it (and aux reads it)
            self.fc1.weight[5] = 0
            self.fc1.bias[5] = 0
            self.head.weight[:, 5] = 0

    def forward(self, x):
        h = torch.relu(self.fc1(torch.relu(self.fc0(x))))
        logits, aux = self.head(h), self.aux(h)
        if self.out == "dict":
            return {"logits": logits, "features": h, "aux": aux}
        if self.out == "model_output":
            return HeadsOutput(logits=logits, features=h, aux=aux)
        return logits, h, aux


try:  # a transformers ModelOutput, the structure HF models return
    from transformers.utils import ModelOutput

    @dataclass
    class HeadsOutput(ModelOutput):
        logits: torch.Tensor | None = None
        features: torch.Tensor | None = None
        aux: torch.Tensor | None = None
except ImportError:  # pragma: no cover
    HeadsOutput = None


def build_heads() -> nn.Module:
    """The state_dict cell's ``--arch`` factory."""
    torch.manual_seed(0)
    return Heads().eval()


def _save(model: nn.Module, fmt: str, path: Path) -> dict:
    """Write ``model`` as ``fmt``; the load options a user passes for it."""
    x = torch.randn(2, 6)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if fmt == "pt2kw":
        torch.export.save(torch.export.export(model, (), kwargs={"x": x}, dynamic_shapes={"x": {0: batch}}), str(path))
    elif fmt == "pt2":
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(path))
    elif fmt == "ts":
        torch.jit.save(torch.jit.trace(model, (x,), strict=False), str(path))
    elif fmt == "pickle":
        torch.save(model, str(path))
        return {"trust_pickle": True, "imports": [HERE]}
    elif fmt == "state_dict":
        torch.save(model.state_dict(), str(path))
        return {"arch": f"{HERE}:build_heads"}
    return {}


def _stock(path: Path, x: torch.Tensor):
    """The written model run by its format's stock loader, called as its users call it."""
    fmt = formats.detect(str(path))
    if fmt == formats.EXPORT:
        from dropcli.backends.torch.save import keyword_signature

        m = torch.export.load(str(path)).module()
        return m(**{keyword_signature(m)[0]: x}) if keyword_signature(m) else m(x)
    if fmt == formats.TORCHSCRIPT:
        return torch.jit.load(str(path))(x)
    return torch.load(str(path), weights_only=False)(x)


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi")
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = build_heads()(x)[0].argmax(-1)
    np.savez(d / "d.npz", x=x.numpy(), y=y.numpy())
    return d / "d.npz", x


def _check_kept(model: nn.Module, written: Path, x: torch.Tensor, structure: type, names=None) -> None:
    """Every output of the written file equals the original's (the tiny lr moves nothing; the dead
    units contributed nothing), and ``aux`` is the original side head applied to the written ``h``."""
    with torch.no_grad():
        want = _leaves(model(x))
        out = _stock(written, x)
    assert isinstance(out, structure), f"written model returns {type(out).__name__}, not {structure.__name__}"
    if names is not None:
        assert list(out.keys()) == names
    got = _leaves(out)
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(got[2], model.aux(got[1]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_prune_tuple_output_every_torch_format(tmp_path, data, fmt):
    path, x = data
    model = build_heads()
    src = tmp_path / f"heads_{fmt}{'.pt2' if fmt.startswith('pt2') else '.pt'}"
    opts = _save(model, fmt, src)
    out = tmp_path / f"pruned{src.suffix}"
    r = dropcli.prune(str(src), str(path), str(out), epochs=1, retrain_epochs=0, lr=1e-6, allow_larger=True, **opts)
    s = r["summary"]
    assert s["pruned_on"] == "output 0 `0` of 3"
    rows = {tuple(row["shape_before"]): row for row in r["layers"]}
    assert rows[(12, 6)]["units_removed"] == len(DEAD), r["layers"]  # fc0: its dead units go
    assert rows[(8, 12)]["units_removed"] == 0, r["layers"]  # fc1 feeds an output: its width stays
    assert s["params_after"] == s["params_before"] - len(DEAD) * (6 + 1 + 8)
    assert s["max_abs_diff_saved"] <= 1e-4
    # the side head is not a layer prune touched
    assert not any(row["shape_before"] == [2, 8] for row in r["layers"])
    _check_kept(model, out, x, (tuple, list))
    if fmt == "pt2kw":  # a keyword program stays one
        from dropcli.backends.torch.save import keyword_signature

        assert keyword_signature(torch.export.load(str(out)).module()) == ["x"]


@pytest.mark.parametrize("kind", ["dict", "model_output"])
def test_prune_keeps_dict_and_model_output(tmp_path, data, kind):
    if kind == "model_output" and HeadsOutput is None:
        pytest.skip("transformers is not installed")
    path, x = data
    model = build_heads()
    model.out = kind
    src = tmp_path / "heads.pt2"
    _save(model, "pt2", src)
    out = tmp_path / "pruned.pt2"
    r = dropcli.prune(str(src), str(path), str(out), epochs=1, retrain_epochs=0, lr=1e-6, allow_larger=True)
    assert r["summary"]["pruned_on"] == "output 0 `logits` of 3"
    _check_kept(model, out, x, dict if kind == "dict" else HeadsOutput, names=["logits", "features", "aux"])


def test_prune_onnx_keeps_outputs_and_their_names(tmp_path, data):
    """ONNX outputs are named: the pruned file has the input's names, in order, and every value."""
    import onnxruntime as ort

    path, x = data
    model = build_heads()
    src = tmp_path / "heads.onnx"
    names = ["logits", "features", "aux"]
    torch.onnx.export(model, (x[:2],), str(src), dynamo=False, opset_version=17, input_names=["x"], output_names=names,
                      dynamic_axes={k: {0: "batch"} for k in ["x", *names]})
    out = tmp_path / "pruned.onnx"
    r = dropcli.prune(str(src), str(path), str(out), epochs=1, retrain_epochs=0, lr=1e-6, allow_larger=True)
    assert r["summary"]["pruned_on"] == "output 0 `logits` of 3"
    assert r["summary"]["params_after"] == r["summary"]["params_before"] - len(DEAD) * (6 + 1 + 8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == names
    got = [torch.from_numpy(a) for a in sess.run(None, {"x": x.numpy()})]
    with torch.no_grad():
        want = list(model(x))
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_prune_multi_output_cli_says_which_output(tmp_path, data):
    from tests.helpers import cli

    path, _ = data
    src = tmp_path / "heads.pt2"
    _save(build_heads(), "pt2", src)
    res = cli("prune", src, "--data", path, "--epochs", "1", "--retrain-epochs", "0", "--lr", "1e-6", "--allow-larger", "-o", tmp_path / "p.pt2")
    assert "pruned on output 0 `0` of 3" in res.output


@pytest.mark.parametrize("fmt", ["pt2kw", "ts"])
def test_finetune_keeps_other_outputs(tmp_path, data, fmt):
    """finetune learns rates on the first output (sites after the body's ReLUs) and writes every output."""
    path, x = data
    model = build_heads()
    src = tmp_path / f"heads_{fmt}{'.pt2' if fmt.startswith('pt2') else '.pt'}"
    _save(model, fmt, src)
    out = tmp_path / f"ft{src.suffix}"
    r = dropcli.finetune(str(src), str(path), str(out), variant="concrete", after=["relu"], epochs=1, samples=4)
    s = r["summary"]
    assert s["trained_on"] == "output 0 `0` of 3"
    assert s["max_abs_diff_saved"] <= 1e-4
    assert len(r["sites"]) >= 1
    # inference mode: the sites pass values through, so every output is the original's
    _check_kept(model, out, x, (tuple, list))
