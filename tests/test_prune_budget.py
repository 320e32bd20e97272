"""`dropcli prune --max-drop`: the accuracy budget, the trade-off curve it walks, the refusals
(exit 4, nothing written) and the check of every written model with its stock loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dropcli.prune.core import Z_BUDGET, budget_drop, drop_se
from dropcli.prune.layers import LinearSVD
from helpers import cli, cli_err, cli_split
from models import MLP

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLP_PT = EXAMPLES / "digits_mlp.pt"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = np.load(EXAMPLES / "digits_test.npz")
    root = tmp_path_factory.mktemp("digits_budget")
    np.savez(root / "train.npz", x=d["x"][:280], y=d["y"][:280])
    np.savez(root / "val.npz", x=d["x"][280:], y=d["y"][280:])
    return root


def _val_accuracy(path: Path, digits: Path) -> float:
    d = np.load(digits / "val.npz")
    with torch.no_grad():
        y = torch.jit.load(str(path))(torch.from_numpy(d["x"]).float())
    return float((y.argmax(1).numpy() == d["y"]).mean())


def test_budget_drop_units():
    assert budget_drop({"accuracy": 0.95, "loss": 0.2}, {"accuracy": 0.935, "loss": 0.3}, "classification") == pytest.approx(1.5)
    # regression: the validation loss's rise, in percent of the dense model's
    assert budget_drop({"loss": 0.20}, {"loss": 0.23}, "regression") == pytest.approx(15.0)
    assert budget_drop({"loss": 0.20}, {"loss": 0.18}, "regression") == pytest.approx(-10.0)
    # the standard error of the drop, paired over examples: d = 100 * (dense - pruned) correct
    a, b = np.array([1.0, 1, 1, 1]), np.array([1.0, 0, 1, 1])  # d = [0, 100, 0, 0]: sd 50, se 50 / 2
    assert drop_se({"per_example": a}, {"per_example": b}, "classification") == pytest.approx(25.0)
    la, lb = np.array([0.1, 0.3]), np.array([0.2, 0.3])  # d = 100 * [0.1, 0] / 0.2 = [50, 0]: sd 35.36, se 25
    assert drop_se({"per_example": la}, {"per_example": lb}, "regression") == pytest.approx(25.0)


# a first round whose every cut breaks the budget, then a second one (half the KL weight) with cuts on
# both sides of it: 80 validation examples give a standard error of 2-3 points
WALK_KL, WALK_BUDGET = 1.0, 6.0


@pytest.fixture(scope="module")
def walked(digits, tmp_path_factory):
    """One budgeted run: the walk over the trained log alphas, retrained cuts, a written model."""
    tmp = tmp_path_factory.mktemp("walked")
    out = tmp / "small.pt"
    res = cli("-q", "prune", MLP_PT, "--data", digits / "train.npz", "--val", digits / "val.npz", "--epochs", 12,
              "--kl-weight", WALK_KL, "--max-drop", WALK_BUDGET, "--seed", 3, "-o", out, "--json", "--plot", tmp / "p.png")
    return json.loads(res.stdout), out, tmp


def test_budget_chooses_the_most_compressive_model_within_it(walked, digits):
    rep, out, tmp = walked
    s, curve = rep["summary"], rep["curve"]
    budget = WALK_BUDGET

    def over(m):  # the budget must hold at Z_BUDGET standard errors of the measured drop
        return m["drop"] + Z_BUDGET * m["drop_se"] > budget

    assert s["outcome"] == "written" and s["max_drop"] == budget
    assert s["budget_se"] == Z_BUDGET and s["distill"] == 0.5 and s["mixed_share"] == 0.5  # how it was read and trained
    assert s["threshold_chosen_by"].startswith("--max-drop")
    # the curve: per training round, one point per distinct cut, from the most compressive to the least
    assert sorted({p["round"] for p in curve}) == [1, 2] and s["rounds"] == 2
    for r in (1, 2):
        ts = [p["threshold"] for p in curve if p["round"] == r]
        assert ts == sorted(ts) and len(ts) >= 5
        comp = [p["compression"] for p in curve if p["round"] == r]
        assert all(a > b for a, b in zip(comp, comp[1:]))
    chosen = [p for p in curve if p["chosen"]]
    assert len(chosen) == 1 and chosen[0]["threshold"] == s["threshold"]
    c = chosen[0]
    assert s["chosen_retrained"] is c["chosen_retrained"]
    got = c["retrained"] if c["chosen_retrained"] else c  # the model written: the cut retrained, or as it is
    assert not over(got) and got["drop_se"] > 0
    assert s["val_drop"] == pytest.approx(got["drop"]) and s["val_drop_se"] == pytest.approx(got["drop_se"])
    assert s["weights_after"] <= got["weights_kept"]  # the shrink may fold more away
    # every model the walk scored that is more compressive breaks the budget: the cuts as they are
    # and the retrained ones
    retrained = [p["retrained"] for p in curve if isinstance(p["retrained"], dict) and p["retrained"].get("drop") is not None]
    assert retrained
    for m in [p for p in curve if p["drop"] is not None] + retrained:
        if m["compression"] > got["compression"]:
            assert over(m)
    # the case is not trivial: the walk saw cuts that break the budget
    assert any(p["drop"] is not None and over(p) for p in curve)
    # what the report says is what the written file does
    assert _val_accuracy(out, digits) == pytest.approx(s["val_accuracy_after"], abs=1e-12)
    assert s["val_drop"] == pytest.approx(100 * (s["val_accuracy_before"] - s["val_accuracy_after"]))
    assert s["size_after"] < s["size_before"] and s["params_after"] < s["params_before"]
    assert s["saved_check"] == "torch.jit.load" and s["max_abs_diff_saved"] <= 1e-4
    assert (tmp / "p.png").stat().st_size > 1000


def test_fixed_threshold_outside_the_budget_is_refused(walked, digits, tmp_path):
    """A cut the walk retrained, fixed with --threshold, under a budget it breaks: exit 4, one
    line, nothing written; --report still carries the curve and the reason."""
    rep, _, _ = walked
    p = next(p for p in rep["curve"] if p["round"] == 1 and isinstance(p["retrained"], dict) and (p["retrained"].get("drop") or 0) > 0)
    out = tmp_path / "no.pt"
    res = cli_split("-q", "prune", MLP_PT, "--data", digits / "train.npz", "--val", digits / "val.npz", "--epochs", 12,
                    "--kl-weight", WALK_KL, "--threshold", p["threshold"], "--max-drop", 0, "--seed", 3, "-o", out,
                    "--report", tmp_path / "r.json", code=4)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the pruned model loses"), res.stderr
    assert "--max-drop 0" in lines[0]
    # the same training and cut as in the walk, so the same loss, now refused
    assert f"loses {p['retrained']['drop']:.2f} points" in lines[0]
    assert not out.exists()
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["summary"]["outcome"] == "not_met" and r["curve"]
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_nothing_within_the_budget_is_exit_4(digits, tmp_path):
    out = tmp_path / "no.pt"
    res = cli_split("-q", "prune", MLP_PT, "--data", digits / "train.npz", "--val", digits / "val.npz", "--epochs", 3,
                    "--lr", 0.05, "--retrain-epochs", 0, "--max-drop", 0.5, "--seed", 1, "-o", out, "--json", code=4)
    assert "no pruned model stays within --max-drop 0.5" in res.stderr
    # a second training round at half the KL weight was tried before giving up
    assert "after 2 training rounds (--kl-weight 0.5 then 0.25)" in res.stderr
    rep = json.loads(res.stdout)
    assert rep["summary"]["outcome"] == "not_met"
    assert {(p["round"], p["kl_weight"]) for p in rep["curve"]} == {(1, 0.5), (2, 0.25)}
    # every cut loses more than the budget, so the refusal is right (this lr spoils the weights)
    assert all(p["drop"] is None or p["drop"] > 0.5 for p in rep["curve"])
    assert not out.exists()


def test_output_not_smaller_is_exit_4(digits, tmp_path):
    """No KL pressure: nothing is pruned, no unit goes, so the file would not shrink."""
    out = tmp_path / "same.pt"
    res = cli_split("-q", "prune", MLP_PT, "--data", digits / "train.npz", "--epochs", 1, "--kl-weight", 0,
                    "--retrain-epochs", 0, "-o", out, "--json", code=4)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "would not be smaller than the input" in lines[0], res.stderr
    s = json.loads(res.stdout)["summary"]
    assert s["outcome"] == "not_smaller" and s["params_after"] >= s["params_before"]
    assert not out.exists() and os.listdir(tmp_path) == []


def test_option_checks(tmp_path, digits):
    cli_err("prune", MLP_PT, "--data", digits / "train.npz", "--method", "sbp", "--threshold", 1, "-o", tmp_path / "o.pt",
            code=2, contains=("--threshold", "sbp"))
    cli_err("prune", MLP_PT, "--data", digits / "train.npz", "--max-drop", -1, "-o", tmp_path / "o.pt",
            code=2, contains=("--max-drop must be",))
    cli_err("prune", MLP_PT, "--max-drop", 1, "-o", tmp_path / "o.pt", code=2, contains=("--max-drop needs validation data",))
    assert os.listdir(tmp_path) == []


def _svd_pickle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    m = MLP(d_in=12, hidden=16, d_out=5).eval()
    m.fc1, m.fc2, m.fc3 = (LinearSVD.from_layer(l) for l in (m.fc1, m.fc2, m.fc3))
    with torch.no_grad():
        for l in (m.fc1, m.fc2, m.fc3):
            l.log_sigma2.copy_(torch.randn_like(l.log_sigma2) * 3 - 2)
        m.fc1.log_sigma2[3] = 20.0
    path = tmp_path / "svd.pkl"
    torch.save(m.eval(), path)
    return path


def test_pickle_output_is_reloaded_and_compared(tmp_path, monkeypatch):
    """A pickle output is re-loaded with torch.load and compared: a writer that stores something
    else is caught (exit 1, nothing written), and a good one is reported as checked."""
    import models as models_mod

    import dropcli.backends.torch.save as save_mod

    src = _svd_pickle(tmp_path)
    args = ("prune", src, "--trust-pickle", "--import", models_mod.__file__, "--input-shape", "2x12")
    rep = json.loads(cli("-q", *args, "-o", tmp_path / "ok.pkl", "--json").stdout)
    assert rep["summary"]["saved_check"] == "torch.load" and rep["summary"]["max_abs_diff_saved"] <= 1e-4

    real_save = torch.save

    def bad_save(obj, f, *a, **k):  # the pickle on disk differs from the pruned model
        import copy

        obj = copy.deepcopy(obj)
        with torch.no_grad():
            next(p for n, p in obj.named_parameters() if n.endswith("bias")).add_(0.5)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(save_mod.torch, "save", bad_save)
    cli_err(*args, "-o", tmp_path / "bad.pkl", contains=("differs from the",))
    assert not (tmp_path / "bad.pkl").exists()


def test_a_large_loss_without_a_budget_is_warned_about(digits, tmp_path):
    """No --max-drop: the model is written, but a validation loss over a point is not silent."""
    res = cli_split("prune", MLP_PT, "--data", digits / "train.npz", "--val", digits / "val.npz", "--epochs", 3,
                    "--lr", 0.05, "--retrain-epochs", 0, "--allow-larger", "-o", tmp_path / "w.pt", "--json")
    s = json.loads(res.stdout)["summary"]
    assert s["val_drop"] > 1.0 and s["max_drop"] is None
    assert any("bound it with --max-drop" in w for w in s["warnings"])
    assert f"warning: validation accuracy fell by {s['val_drop']:.2f} accuracy points" in " ".join(res.stderr.split())
    assert (tmp_path / "w.pt").exists()
