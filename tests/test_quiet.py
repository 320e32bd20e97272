"""Library warnings that are known and harmless stay off the user's terminal, and come back
under --debug (dropcli.model.quiet.KNOWN_WARNINGS)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from dropcli.model.quiet import KNOWN_WARNINGS, known_warnings_silenced

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_known_warnings_are_hidden_unless_shown():
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use something else"
    for show, expected in ((False, 0), (True, 1)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with known_warnings_silenced(show=show):
                warnings.warn(message, FutureWarning)
                warnings.warn("some other FutureWarning", FutureWarning)  # never hidden
        texts = [str(w.message) for w in seen]
        assert texts.count(message) == expected and "some other FutureWarning" in texts
    assert all(issubclass(c, Warning) for c, _ in KNOWN_WARNINGS)


def test_finetune_of_a_torchscript_model_prints_no_library_warning(tmp_path):
    """torch 2.13 warns (FutureWarning, LeafSpec) on every deepcopy of the model in finetune/prune."""
    d = np.load(EXAMPLES / "digits_test.npz")
    np.savez(tmp_path / "d.npz", x=d["x"], y=d["y"])
    args = [sys.executable, "-m", "dropcli.cli.main", "-q", "finetune",
            str(EXAMPLES / "digits_mlp.pt"), "--data", str(tmp_path / "d.npz"), "--variant", "concrete",
            "--epochs", "1", "-o", str(tmp_path / "out.pt")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr
