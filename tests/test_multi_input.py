"""prune and finetune on a model with several inputs (token ids and an attention mask, the way a
BERT classifier is called): the data holds one array per input, named after it; every input
reaches the model in training, scoring and the stock-loader check of the written file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import cli_err, cli_split as cli

VOCAB, S, N, C = 20, 6, 240, 3


class MaskedBag(nn.Module):
    """Mean of the embeddings of the unmasked tokens, then an MLP: the mask changes the answer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, C)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.fc2(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("multi_in")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, (N, S))
    mask = (rng.random((N, S)) < 0.7).astype(np.int64)
    mask[:, 0] = 1
    y = (ids * mask).sum(1) % C  # depends on the masked tokens: the mask matters
    torch.manual_seed(0)
    model = MaskedBag()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    X, M, Y = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X, M), Y).backward()
        opt.step()
    model.eval()
    ex = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
    ep = torch.export.export(model, ex, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    torch.export.save(ep, str(d / "m.pt2"))
    dyn = {"input_ids": {0: "N", 1: "S"}, "attention_mask": {0: "N", 1: "S"}, "logits": {0: "N"}}
    torch.onnx.export(model, ex, str(d / "m.onnx"), dynamo=False, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes=dyn, opset_version=17)
    np.savez(d / "train.npz", input_ids=ids[:160], attention_mask=mask[:160], y=y[:160])
    np.savez(d / "val.npz", input_ids=ids[160:], attention_mask=mask[160:], y=y[160:])
    np.savez(d / "one.npz", input_ids=ids[:160], y=y[:160])
    return d, model, ids, mask


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_finetune_and_prune_feed_every_input(files, fmt, tmp_path):
    d, model, ids, mask = files
    out = tmp_path / f"ft.{fmt}"
    rep = json.loads(cli("finetune", d / f"m.{fmt}", "--data", d / "train.npz", "--val", d / "val.npz", "--variant", "concrete",
                         "--after", "relu", "--epochs", 2, "--samples", 4, "-o", out, "--json").stdout)
    assert out.exists() and rep["summary"]["max_abs_diff_saved"] <= 1e-4
    # the validation metrics are the model's on both inputs: the eval pass scores as the original does
    with torch.no_grad():
        logits = model(torch.from_numpy(ids[160:]), torch.from_numpy(mask[160:]))
    pruned = tmp_path / f"pruned.{fmt}"
    rep = json.loads(cli("prune", d / f"m.{fmt}", "--data", d / "train.npz", "--val", d / "val.npz", "--epochs", 1,
                         "--retrain-epochs", 0, "--threshold", 3, "--allow-larger", "-o", pruned, "--json").stdout)
    s = rep["summary"]
    y = np.load(d / "val.npz")["y"]
    acc = float((logits.argmax(-1).numpy() == y).mean())
    assert s["val_accuracy_before"] == pytest.approx(acc)  # scored with the mask, not on ids alone
    assert pruned.exists() and s["max_abs_diff_saved"] <= 1e-4
    assert s["mixed_share"] == 0.0  # token ids and a mask are not mixed (only a single float input is)


def test_a_missing_input_array_is_named(files, tmp_path):
    d, *_ = files
    cli_err("prune", d / "m.pt2", "--data", d / "one.npz", "--epochs", 1, "-o", tmp_path / "x.pt2",
            contains=("attention_mask",))
