"""`--report -` on prune and finetune: stdout carries only the JSON report; the human tables go
to stderr (as with `-o -`); with --json both would write the report to stdout: a usage error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dropcli.cli.main import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def run(*args, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"exit {res.exit_code} (want {code}): {res.stderr}{res.exception!r}"
    assert "Traceback" not in res.stderr
    return res


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    z = np.load(EXAMPLES / "digits_test.npz")
    np.savez(d / "train.npz", x=z["x"][:200], y=z["y"][:200])
    return d / "train.npz"


VERBS = {
    "prune": ("--epochs", 1, "--retrain-epochs", 0, "--allow-larger"),
    "finetune": ("--variant", "concrete", "--epochs", 1, "--samples", 2),
}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_report_dash_keeps_stdout_json_only(verb, train, tmp_path):
    res = run(verb, EXAMPLES / "digits_mlp.pt", "--data", train, "-o", tmp_path / "o.pt", *VERBS[verb], "--report", "-")
    rep = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert "summary" in rep
    assert "┏" in res.stderr or "━" in res.stderr, res.stderr  # the tables, on stderr


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_report_dash_with_json_is_a_usage_error(verb, train, tmp_path):
    res = run("--quiet", verb, EXAMPLES / "digits_mlp.pt", "--data", train, "-o", tmp_path / "o.pt", *VERBS[verb],
              "--report", "-", "--json", code=2)
    assert res.stdout == "" and "--report - and --json" in res.stderr
    assert not (tmp_path / "o.pt").exists()
