"""Output kinds of `dropcli uncertainty` (issue 14 item 6): [N, S, V] logits classified per
position, feature vectors (embeddings) not soft-maxed, and the checks that run before the MC
run (labels, --fail-above) for these kinds."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import Z, cli_err
from helpers import cli_split as cli
from models import save_as

from dropcli.analysis import stats
from dropcli.analysis.task import IGNORE_INDEX, output_kind, token_labels
from dropcli.errors import DropcliError, UsageError

N, S, V, VOCAB = 12, 5, 7, 20


class TokenLM(nn.Module):
    """Per-token logits [N, S, V] from token ids, with a dropout layer before the head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, V)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.fc(self.emb(x)))))


class Embedder(nn.Module):
    """A sentence-embedding shape: L2-normalised features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 8)

    def forward(self, x):
        return nn.functional.normalize(self.out(self.drop(torch.relu(self.fc(x)))), dim=-1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    lm = TokenLM().eval()
    emb = Embedder().eval()
    save_as(lm, torch.randint(0, VOCAB, (2, S)), d / "tok.pt2", "export")
    save_as(emb, torch.randn(2, 6), d / "emb.pt2", "export")
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (N, S))
    y = rng.integers(0, V, (N, S))
    y[:, :2] = IGNORE_INDEX  # a prompt that is not scored
    np.savez(d / "tok.npz", x=x, y=y)
    bad = y.copy()
    bad[3, 4] = V  # out of range
    np.save(d / "bad_y.npy", bad)
    np.savez(d / "emb.npz", x=rng.standard_normal((N, 6)).astype(np.float32))
    return {"dir": d, "lm": lm, "x": x, "y": y}


# ------------------------------------------------------------------------------ the rule


def test_output_kind_rule():
    assert output_kind("auto", None, (S, V)).task == "token-classification"
    assert output_kind("auto", np.zeros((3, S), int), (S, V)).task == "token-classification"
    assert output_kind("auto", None, (10,)).task == "classification"
    assert output_kind("auto", None, (1,)).task == "regression"
    assert output_kind("auto", None, (3, 4, 4)).warning  # feature maps: regression, said so
    # a feature vector: by its values (unit rows) or by the layer that makes it
    unit = np.random.default_rng(0).standard_normal((4, 8))
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    k = output_kind("auto", None, (8,), values=unit)
    assert (k.task, k.kind) == ("regression", "embedding") and "--task classification" in k.warning
    assert output_kind("auto", None, (S, 16), final_op="layer_norm").task == "regression"
    # probabilities are unit-sum, not unit-norm: still a classification
    probs = np.full((4, 8), 1 / 8)
    assert output_kind("auto", None, (8,), values=probs).task == "classification"
    # overrides
    assert output_kind("classification", None, (8,), values=unit).task == "classification"
    assert output_kind("regression", None, (S, V)).task == "regression"
    with pytest.raises(UsageError, match="needs an output of shape"):
        output_kind("token-classification", None, (10,))


def test_token_labels_checks():
    lab = np.array([[IGNORE_INDEX, 1, 2], [0, IGNORE_INDEX, 6]])
    assert token_labels(lab, 3, 7).tolist() == lab.tolist()
    assert token_labels(lab[..., None].astype(float), 3, 7).dtype == np.int64
    with pytest.raises(DropcliError, match="range over"):
        token_labels(np.array([[0, 7, 1]]), 3, 7)
    with pytest.raises(DropcliError, match="shape"):
        token_labels(np.zeros((2, 4), int), 3, 7)
    with pytest.raises(DropcliError, match="integers"):
        token_labels(np.full((2, 3), 0.5), 3, 7)
    with pytest.raises(DropcliError, match="nothing to score"):
        token_labels(np.full((2, 3), IGNORE_INDEX), 3, 7)


def test_per_position_statistics_are_per_position():
    """Each position's statistics are those of a softmax over its own V logits (not over S*V)."""
    rng = np.random.default_rng(1)
    T = 9
    samples = rng.standard_normal((T, 4, S * V)).astype(np.float32)
    per = stats.per_example(samples, "token-classification", shape=(S, V))
    assert per["entropy"].shape == (4, S) and per["mean"].shape == (4, S, V)
    np.testing.assert_allclose(per["mean"].sum(-1), 1.0, atol=1e-12)
    for i, s in ((0, 0), (3, S - 1), (2, 2)):
        one = stats.per_example(samples[:, i:i + 1, s * V:(s + 1) * V], "classification")
        for k in ("entropy", "mutual_info", "variation_ratio", "confidence", "pred"):
            assert per[k][i, s] == one[k][0], k
    assert per["entropy"].max() <= math.log(V) + 1e-12  # one softmax over V classes, not over S*V
    # per-sequence means over the scored positions only
    scored = np.ones((4, S), bool)
    scored[:, :2] = False
    seq = stats.sequence_means(per, scored)
    np.testing.assert_allclose(seq["mean_entropy"], per["entropy"][:, 2:].mean(1), rtol=1e-12)
    np.testing.assert_allclose(seq["max_mutual_info"], per["mutual_info"][:, 2:].max(1))


# ------------------------------------------------------------------------------ end to end


def test_language_model_per_token_matches_a_reference_mc_loop(files):
    """MC mean probabilities per position agree with a hand-written MC loop (nn.Dropout in
    train mode) within Z standard errors of the two independent estimates."""
    from dropcli.api.uncertainty import uncertainty

    T = 200
    r = uncertainty(str(files["dir"] / "tok.pt2"), str(files["dir"] / "tok.npz"), T=T, seed=0)
    assert r.task == "token-classification"
    assert r.summary["output"]["kind"] == "per-position classification"
    lm = files["lm"]
    lm.train()
    torch.manual_seed(123)
    with torch.no_grad():
        ref = torch.stack([torch.softmax(lm(torch.as_tensor(files["x"])), -1) for _ in range(T)]).numpy()
    lm.eval()
    ours = r.mean  # [N, S, V]
    assert ours.shape == (N, S, V)
    se = np.sqrt(ref.var(0) / T + r.var / T)
    gap = np.abs(ours - ref.mean(0))
    assert np.all(gap <= Z * se + 1e-6), float((gap / (se + 1e-12)).max())
    # labels with -100: scored positions only, counted by sequence and by position
    y = files["y"]
    scored = y != IGNORE_INDEX
    assert r.summary["n_positions"] == int(scored.sum()) and r.summary["n"] == N
    acc = float((r.pred[scored] == y[scored]).mean())
    assert r.summary["mc"]["accuracy"] == pytest.approx(acc)
    p_true = np.take_along_axis(ours, np.where(scored, y, 0)[..., None], -1)[..., 0][scored]
    assert r.summary["mc"]["nll"] == pytest.approx(float(-np.mean(np.log(p_true))))


def test_per_token_files(files):
    d = files["dir"]
    res = cli("uncertainty", d / "tok.pt2", "--input", d / "tok.npz", "-T", 8, "--format", "jsonl", "-o", "-")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == N
    r0 = rows[0]
    assert len(r0["pred"]) == S and len(r0["entropy"]) == S and r0["label"][:2] == [IGNORE_INDEX] * 2
    assert r0["correct"][:2] == [-1, -1]  # ignored positions
    assert r0["mean_entropy"] == pytest.approx(np.mean(r0["entropy"][2:]))
    assert "per-position classification" in res.stderr
    csv = cli("uncertainty", d / "tok.pt2", "--input", d / "tok.npz", "-T", 8, "--format", "csv", "-o", "-").stdout
    lines = csv.strip().splitlines()
    assert lines[0].startswith("index,position,") and len(lines) == 1 + N * S  # one row per position
    out = d / "tok_report.npz"
    cli("uncertainty", d / "tok.pt2", "--input", d / "tok.npz", "-T", 8, "-o", out)
    with np.load(out) as z:
        assert z["entropy"].shape == (N, S) and z["mean_entropy"].shape == (N,)
        # the same seed gives the same per-position values in every format
        np.testing.assert_allclose(z["entropy"][0], r0["entropy"], rtol=1e-12)


def test_embedding_is_not_softmaxed(files):
    d = files["dir"]
    res = cli("uncertainty", d / "emb.pt2", "--input", d / "emb.npz", "-T", 8, "--json")
    rep = json.loads(res.stdout)
    assert rep["summary"]["task"] == "regression" and rep["summary"]["output"]["kind"] == "embedding"
    assert "feature vector" in res.stderr and "not soft-maxed" in res.stderr
    assert "entropy" not in rep["examples"][0] and "mean_7" in rep["examples"][0]
    forced = json.loads(cli("uncertainty", d / "emb.pt2", "--input", d / "emb.npz", "-T", 8, "--json",
                            "--task", "classification").stdout)
    assert forced["summary"]["task"] == "classification"


@contextlib.contextmanager
def _must_not_run(what, total):
    raise AssertionError(f"the {what} run started before the check")
    yield  # pragma: no cover


def test_checks_come_before_the_run(files):
    from dropcli.api.analyze import analyze
    from dropcli.api.uncertainty import uncertainty

    d = files["dir"]
    with pytest.raises(DropcliError, match="range over"):
        uncertainty(str(d / "tok.pt2"), str(d / "tok.npz"), labels=str(d / "bad_y.npy"), T=8, progress=_must_not_run)
    with pytest.raises(UsageError, match="does not apply to a regression task"):
        uncertainty(str(d / "emb.pt2"), str(d / "emb.npz"), T=8, fail_above="entropy=1", progress=_must_not_run)
    cli_err("uncertainty", d / "emb.pt2", "--input", d / "emb.npz", "--fail-above", "mutual_info=1", code=2,
            contains=("does not apply",))
    # analyze: regression labels with the wrong number of columns, before the MC run
    x = np.load(d / "emb.npz")["x"]
    with pytest.raises(DropcliError, match="columns"):
        analyze(str(d / "emb.pt2"), x, labels=np.zeros((N, 3)), T=4, progress=_must_not_run)


# ------------------------------------------------------------------------------ the zoo's models


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    pytest.importorskip("transformers")
    import zoo

    d = tmp_path_factory.mktemp("zoo_kinds")
    out = {}
    for name, fmt in (("gpt2", "onnx18"), ("minilm", "onnx17")):
        entry = zoo.ZOO[name]
        out[name] = (zoo.save(entry, fmt, d), zoo.save_inputs(entry, 3, d / f"{name}.npz"), entry)
    return out


def test_zoo_gpt2_is_classified_per_token(zoo_files):
    """GPT-2's [N, 8, 100] logits (the dynamo ONNX export): a softmax per position, not over 800."""
    from dropcli.api.uncertainty import uncertainty

    import zoo

    model, data, entry = zoo_files["gpt2"]
    r = uncertainty(str(model), str(data), T=6, inject="standard", p=0.1)
    assert r.task == "token-classification" and r.summary["output"]["shape"] == [zoo.SEQ, zoo.VOCAB]
    assert r.entropy.shape == (3, zoo.SEQ) and r.mean.shape == (3, zoo.SEQ, zoo.VOCAB)
    assert np.all(r.entropy <= math.log(zoo.VOCAB) + 1e-9)
    ref = zoo.reference(entry, 3).numpy()  # the original model's logits: the eval pass agrees
    np.testing.assert_allclose(r.eval.reshape(ref.shape), ref, atol=1e-4)


def test_zoo_sentence_embedding_is_not_softmaxed(zoo_files):
    from dropcli.api.uncertainty import uncertainty

    model, data, _ = zoo_files["minilm"]
    lines = []
    r = uncertainty(str(model), str(data), T=6, inject="standard", p=0.1, after="linear", log=lines.append)
    assert r.task == "regression" and r.summary["output"]["kind"] == "embedding"
    assert any("feature vector" in ln for ln in lines)


def test_fail_above_on_per_token_output(files):
    """--fail-above on per-position classification: the gate is the mean over every position
    (a name clash once made this crash: the summary module and the sequence length were both S)."""
    d = files["dir"]
    res = cli("uncertainty", d / "tok.pt2", "--input", d / "tok.npz", "-T", 8, "--json", "--seed", 0)
    assert "gate" not in json.loads(res.stdout)["summary"]
    low = cli("uncertainty", d / "tok.pt2", "--input", d / "tok.npz", "-T", 8, "--json", "--seed", 0,
              "--fail-above", "entropy=0", code=3)
    gate = json.loads(low.stdout)["summary"]["gate"]
    assert gate["metric"] == "entropy" and gate["tripped"] and gate["mean"] > 0
    high = cli("uncertainty", d / "tok.pt2", "--input", d / "tok.npz", "-T", 8, "--json", "--seed", 0,
               "--fail-above", f"entropy={math.log(V) + 1}")
    g2 = json.loads(high.stdout)["summary"]["gate"]
    assert not g2["tripped"] and g2["mean"] == pytest.approx(gate["mean"], rel=1e-12)
