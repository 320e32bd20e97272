"""`dropcli uncertainty`: what can be known before the MC run is checked before it (labels
against the model's K outputs, sites that cannot vary), and the honest messages around it
(T = 1, ambiguous .npz inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import cli_err
from helpers import cli_split as cli
from models import MLP, save_as

N = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("chk_models")
    torch.manual_seed(0)
    plain = save_as(MLP(), torch.randn(2, 64), d / "mlp.pt2", "export")
    reg_plain = save_as(MLP(d_out=1), torch.randn(2, 64), d / "reg.pt2", "export")
    out = {"plain": plain}
    for name, src, p in (("mlp", plain, 0.3), ("mlp_p0", plain, 0.0), ("reg", reg_plain, 0.2)):
        dst = d / f"{name}_mc.pt2"
        cli("--quiet", "inject", src, "--p", p, "--after", "relu", "-o", dst)
        out[name] = dst
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chk_data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 64)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d, x


@pytest.fixture
def no_mc_run(monkeypatch):
    """Any MC run over the whole input fails the test: the error must come before it."""
    from dropcli.engines import local

    def started(*a, **k):
        raise AssertionError("the MC run started")

    monkeypatch.setattr(local, "run_source", started)
    monkeypatch.setattr(local, "stream_blocks", started)  # --format jsonl/csv: records streamed


def _save(d, name, arr):
    np.save(d / name, arr)
    return d / name


@pytest.mark.parametrize("labels,task,contains", [
    (np.arange(N) % 12, "auto", ("range", "10 classes")),  # classes 10, 11 for a 10-class model
    (np.full(N, -1), "auto", ("range",)),
    (np.linspace(0, 1, N), "classification", ("integers",)),
    (np.arange(N - 2) % 10, "auto", ("rows", "one label per example")),
])
def test_bad_labels_are_refused_before_the_run(models, data, no_mc_run, labels, task, contains):
    d, _ = data
    y = _save(d, "bad_y.npy", labels)
    cli_err("uncertainty", models["mlp"], "--input", d / "x.npy", "--labels", y, "--task", task, "-T", 5,
            contains=contains)


def test_regression_label_columns_are_checked_before_the_run(models, data, no_mc_run):
    d, _ = data
    y = _save(d, "reg_y.npy", np.zeros((N, 3), np.float32))
    cli_err("uncertainty", models["reg"], "--input", d / "x.npy", "--labels", y, "-T", 5,
            contains=("3 columns", "1 outputs"))


def test_labels_in_an_npz_are_checked_before_the_run(models, data, no_mc_run):
    d, x = data
    np.savez(d / "xy_bad.npz", x=x, y=np.arange(N) + 5)
    cli_err("uncertainty", models["mlp"], "--input", d / "xy_bad.npz", "-T", 5, contains=("range",))


def test_inject_p0_is_refused_before_the_run(models, data, no_mc_run):
    d, _ = data
    cli_err("uncertainty", models["plain"], "--input", d / "x.npy", "--inject", "standard", "--p", 0, "--after", "relu",
            "-T", 5, contains=("degenerate", "--p 0"))


def test_sites_that_cannot_vary_are_refused_before_the_run(models, data, no_mc_run):
    d, _ = data
    cli_err("uncertainty", models["mlp_p0"], "--input", d / "x.npy", "-T", 5, contains=("degenerate",))


def test_good_labels_still_run(models, data):
    d, _ = data
    y = _save(d, "good_y.npy", np.arange(N) % 10)
    rep = json.loads(cli("--quiet", "uncertainty", models["mlp"], "--input", d / "x.npy", "--labels", y, "-T", 5,
                         "--json").stdout)
    assert rep["summary"]["task"] == "classification" and "mc" in rep["summary"]


def test_t1_warns_that_there_is_no_spread(models, data):
    d, _ = data
    res = cli("uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 1, "--json")
    warns = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warns) == 1 and "-T 1" in warns[0] and "spread" in warns[0], res.stderr
    assert json.loads(res.stdout)["summary"]["samples"] == 1
    res = cli("uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 2, "--json")
    assert "warning:" not in res.stderr
    res = cli("--quiet", "uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 1, "--json")
    assert res.stderr == ""


def test_ambiguous_npz_is_refused_with_its_array_names(models, data):
    d, x = data
    np.savez(d / "two.npz", feat=x, other=x[:, :8], y=np.arange(N) % 10)
    res = cli_err("uncertainty", models["mlp"], "--input", d / "two.npz", "-T", 2, contains=("feat", "other", "ambiguous"))
    assert "feat fits" in res.stderr and "x=d['feat']" in res.stderr, res.stderr
    # also as a shard folder
    (d / "shards").mkdir(exist_ok=True)
    np.savez(d / "shards" / "part-0.npz", feat=x, other=x)
    cli_err("uncertainty", models["mlp"], "--input", d / "shards", "-T", 2, contains=("feat", "other", "'x'"))


def test_npz_x_that_does_not_fit_names_the_array_that_does(models, data):
    d, x = data
    np.savez(d / "ximg.npz", x=x[:, :8].reshape(N, 1, 2, 4), x_flat=x, y=np.arange(N) % 10)
    cli_err("uncertainty", models["mlp"], "--input", d / "ximg.npz", "-T", 2, contains=("x_flat fits", "x=d['x_flat']"))


def test_npz_accepted_cases_still_work(models, data):
    d, x = data
    y = np.arange(N) % 10
    ref = json.loads(cli("--quiet", "uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 3, "--json").stdout)
    for name, arrays in (("one.npz", {"features": x}), ("lab.npz", {"features": x, "labels": y}),
                         ("xy.npz", {"x": x, "y": y}), ("conv.npz", {"x": x, "x_img": x.reshape(N, 1, 8, 8), "y": y})):
        np.savez(d / name, **arrays)
        got = json.loads(cli("--quiet", "uncertainty", models["mlp"], "--input", d / name, "-T", 3, "--json").stdout)
        for k in ("pred", "mutual_info", "entropy"):
            assert [e[k] for e in got["examples"]] == [e[k] for e in ref["examples"]], name


def test_readme_digits_example_still_binds_x():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = cli("--quiet", "uncertainty", root / "examples" / "digits_mlp.pt", "--input", root / "examples" / "digits_test.npz",
              "-T", 2, "--json")
    rep = json.loads(res.stdout)
    assert len(rep["examples"]) == 360 and "mc" in rep["summary"]  # y bound as the labels


def test_plain_progress_lines_off_a_terminal(models, data, monkeypatch):
    from dropcli.cli import render

    assert render.PLAIN_INTERVAL == 10.0
    monkeypatch.setattr(render, "PLAIN_INTERVAL", 0.0)
    d, _ = data
    res = cli("uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 3, "--batch-size", 4, "--json")
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("MC dropout: ")]
    assert [ln.split(",")[0] for ln in lines] == ["MC dropout: 4/12 (33%)", "MC dropout: 8/12 (66%)"], res.stderr
    assert all("/s, ETA " in ln for ln in lines), lines
    json.loads(res.stdout)  # stdout untouched
    res = cli("--quiet", "uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 3, "--batch-size", 4, "--json")
    assert res.stderr == ""
    monkeypatch.setattr(render, "PLAIN_INTERVAL", 10.0)
    res = cli("uncertainty", models["mlp"], "--input", d / "x.npy", "-T", 3, "--batch-size", 4, "--json")
    assert "MC dropout: " not in res.stderr  # a short run: no line


def test_plain_line_format():
    from dropcli.cli.render import plain_line

    assert plain_line("MC dropout", 1200, 5000, 4.0) == "MC dropout: 1200/5000 (24%), 300/s, ETA 0:00:13"
    assert plain_line("finetune", 0, 10, 0.0, "loss 0.5") == "finetune: 0/10 (0%), 0/s, ETA ?, loss 0.5"
    assert plain_line("x", 1, 7201, 1.0).endswith("ETA 2:00:00")


@pytest.fixture
def no_analysis_run(monkeypatch):
    """`analyze`'s MC run over the whole input fails the test."""
    from dropcli.analysis import ensemble_torch

    def started(*a, **k):
        raise AssertionError("the analysis run started")

    monkeypatch.setattr(ensemble_torch, "analyze_torch", started)


@pytest.mark.parametrize("labels,contains", [
    (np.arange(N) % 12, ("range", "10 classes")),
    (np.zeros((N, 3), np.float32) + 0.5, ("3 columns", "10 outputs")),
])
def test_analyze_checks_labels_before_the_run(models, data, no_analysis_run, labels, contains):
    d, _ = data
    y = _save(d, "an_y.npy", labels)
    cli_err("analyze", models["mlp"], "--input", d / "x.npy", "--labels", y, "-T", 5, contains=contains)


def test_analyze_refuses_sites_that_cannot_vary_before_the_run(models, data, no_analysis_run):
    d, _ = data
    cli_err("analyze", models["mlp_p0"], "--input", d / "x.npy", "-T", 5, contains=("degenerate",))


def test_streamed_output_checks_come_first(models, data, no_mc_run, tmp_path):
    d, _ = data
    y = _save(d, "bad_y2.npy", np.arange(N) % 12)
    cli_err("uncertainty", models["mlp"], "--input", d / "x.npy", "--labels", y, "-T", 5, "-o", tmp_path / "r.jsonl",
            contains=("range",))
    assert not (tmp_path / "r.jsonl").exists()
