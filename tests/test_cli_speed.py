"""A quick CLI: `dropcli --help`, `dropcli VERB --help` and `dropcli --version` import no torch,
onnx, onnxruntime or numpy (the options are declared without them; the commands import what
they need when they run), and the global -q/--quiet and --debug work after the verb as well
as before it.

Asserted on the modules loaded, not on timings (the machine may be busy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dropcli.cli.main import app
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
MLP_PT = ROOT / "examples" / "digits_mlp.pt"
VERBS = ("inspect", "inject", "uncertainty", "prune", "finetune", "analyze", "convert", "variants")
HEAVY = ("torch", "onnx", "onnxruntime", "numpy", "ray", "matplotlib")

# runs the CLI in this interpreter the way the console script does, then reports the heavy modules loaded
PROBE = """
import json, sys
from dropcli.cli.main import app
try:
    app(args=sys.argv[1:], prog_name="dropcli")
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def probe(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [("--help",), ("--version",), *((v, "--help") for v in VERBS)],
                         ids=lambda a: " ".join(a))
def test_help_and_version_import_nothing_heavy(args):
    res = probe(*args)
    assert res["code"] == 0
    assert res["heavy"] == [], f"dropcli {' '.join(args)} imported {res['heavy']}"


def test_importtime_of_the_entry_point():
    """`python -X importtime -m dropcli.cli.main --help`: the import log names no heavy package."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dropcli.cli.main", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout
    loaded = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert loaded, r.stderr[:500]
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]
    assert "dropcli.cli.uncertainty" in loaded  # every verb registered, only light modules


def test_every_verb_lists_the_global_options():
    for v in VERBS:
        text = cli(v, "--help").stdout
        assert "--quiet" in text and "-q" in text and "--debug" in text, v


def test_quiet_after_the_verb(tmp_path):
    """-q before or after the verb: the log lines on stderr go; the report stays."""
    loud = cli("inject", MLP_PT, "--p", 0.1, "--after", "relu", "-o", tmp_path / "a.pt")
    assert "MC mode" in loud.stderr
    for args in (("-q", "inject", MLP_PT, "--p", 0.1, "--after", "relu", "-o", tmp_path / "b.pt"),
                 ("inject", MLP_PT, "--p", 0.1, "--after", "relu", "-o", tmp_path / "c.pt", "-q"),
                 ("inject", MLP_PT, "--quiet", "--p", 0.1, "--after", "relu", "-o", tmp_path / "d.pt")):
        res = cli(*args)
        assert res.stderr == "", args
        assert "site(s)" in res.stdout
    # the table is the same whatever -q does
    assert cli("inspect", MLP_PT, "-q").stdout == cli("-q", "inspect", MLP_PT).stdout == cli("inspect", MLP_PT).stdout
    # and -q does not stick to the next run
    assert "MC mode" in cli("inject", MLP_PT, "--p", 0.1, "--after", "relu", "-o", tmp_path / "e.pt").stderr


def test_debug_after_the_verb(tmp_path):
    """--debug after the verb shows the traceback, as before it; without it, one line."""
    runner = CliRunner()
    missing = str(tmp_path / "missing.pt")
    plain = runner.invoke(app, ["inspect", missing])
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr and len(plain.stderr.strip().splitlines()) == 1
    for args in (["--debug", "inspect", missing], ["inspect", missing, "--debug"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, args
        assert "Traceback" in res.stderr and "error:" in res.stderr, args
    again = runner.invoke(app, ["inspect", missing])
    assert "Traceback" not in again.stderr
