"""Weights saved as safetensors: a Hugging Face checkpoint folder (``save_pretrained``) and a bare
safetensors state_dict with ``--arch``. Built from tiny configs: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dropcli.backends import load_model
from dropcli.model import formats

from helpers import cli_err, cli_split

pytest.importorskip("transformers")
from zoo import build_bert, build_vit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    model = build_bert()
    model.save_pretrained(str(d / "bert"))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, (3, 8))
    mask = np.ones((3, 8), dtype=np.int64)
    mask[1, 5:] = 0
    np.savez(d / "x.npz", input_ids=ids, attention_mask=mask, y=np.array([0, 1, 2]))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    return d, ids, mask, ref


def test_checkpoint_folder_inject_writes_a_keyword_program(bert):
    d, ids, mask, ref = bert
    assert formats.detect(d / "bert") == formats.HUB
    assert formats.detect(d / "bert" / "model.safetensors") == formats.HUB  # its weights file names the folder
    out = d / "bert_mc.pt2"
    res = cli_split("inject", d / "bert", "-o", out)
    assert "(export)" in res.stderr + res.stdout
    prog = torch.export.load(str(out)).module()  # the stock loader; keywords in, as the model is called
    feeds = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    with torch.no_grad():
        got = prog(**feeds)
    logits = got.logits if hasattr(got, "logits") else got[0]
    np.testing.assert_allclose(logits.numpy(), ref, rtol=1e-5, atol=1e-5)  # batch 3: not the capture's 2
    res = cli_split("uncertainty", out, "--input", d / "x.npz", "-T", "6", "--json")
    assert len(json.loads(res.stdout)["examples"]) == 3


def test_vision_checkpoint_takes_its_example_from_the_config(tmp_path):
    build_vit().save_pretrained(str(tmp_path / "vit"))
    model = load_model(str(tmp_path / "vit"))
    assert model.format == formats.HUB and model.default_output_format() == formats.EXPORT
    (x,) = model.example_inputs
    assert tuple(x.shape[1:]) == (3, 16, 16) and x.dtype == torch.float32


def test_pickled_weights_need_trust_and_unknown_architectures_are_named(bert, tmp_path):
    d = bert[0]
    pkl = tmp_path / "pkl"
    pkl.mkdir()
    (pkl / "config.json").write_text((d / "bert" / "config.json").read_text())
    torch.save(build_bert().state_dict(), pkl / "pytorch_model.bin")
    cli_err("inspect", pkl, contains=("pickle", "--trust-pickle"))
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((d / "bert" / "config.json").read_text())
    cfg["architectures"] = ["NoSuchModelForAnything"]
    (odd / "config.json").write_text(json.dumps(cfg))
    (odd / "model.safetensors").write_bytes((d / "bert" / "model.safetensors").read_bytes())
    cli_err("inspect", odd, contains=("NoSuchModelForAnything",))


def test_bare_safetensors_state_dict_with_arch(tmp_path):
    from safetensors.torch import save_file

    import importlib.util

    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples" / "train_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    mlp = mod.MLP().eval()
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(path))
    assert formats.detect(path) == formats.SAFETENSORS
    cli_err("inspect", path, code=2, contains=("--arch",))
    arch = f"{ROOT / 'examples' / 'train_digits.py'}:MLP"
    model = load_model(str(path), arch=arch)
    x = torch.randn(5, 64)
    with torch.no_grad():
        np.testing.assert_allclose(model.gm(x).numpy(), mlp(x).numpy(), rtol=1e-6, atol=1e-6)
    out = tmp_path / "mlp_mc.pt"
    cli_split("inject", path, "--arch", arch, "--after", "relu", "--p", "0.2", "-o", out)
    assert formats.detect(out) == formats.TORCHSCRIPT


def test_a_file_of_the_checkpoint_is_never_overwritten(bert):
    d = bert[0]
    weights = d / "bert" / "model.safetensors"
    before = weights.read_bytes()
    cli_err("inject", d / "bert", "-o", weights, code=2, contains=("input model's folder",))
    assert weights.read_bytes() == before
