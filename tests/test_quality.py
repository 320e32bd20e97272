"""Issue 18 (uncertainty that beats the alternatives): the --ood noise stream, post-hoc
temperature calibration stored in the model, the validation-source check of `dropcli finetune`,
the held-out rate scan, and variational rates that land on a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dropcli

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"
MLP_PT = EX / "digits_mlp.pt"
DATA = EX / "digits_test.npz"


@pytest.fixture(scope="module")
def digits():
    with np.load(DATA) as d:
        return {k: d[k] for k in d.files}


# ----------------------------------------------------------------------------- --ood stream


def test_ood_input_draws_its_own_noise_stream(digits):
    """OOD row i used to reuse input row i's masks (noise keyed by example index, same seed).
    With the OOD input equal to the input, the two sets of statistics now differ; the OOD stream
    is exactly the run at seed stream_seed(seed, 1), so it stays reproducible from --seed."""
    from dropcli.engines.noise import stream_seed

    x = digits["x"][:24]
    r = dropcli.uncertainty(MLP_PT, x, ood=x, T=8, seed=3)
    assert not np.array_equal(r.per["mean"], r.ood["mean"])  # same inputs, other masks
    again = dropcli.uncertainty(MLP_PT, x, ood=x, T=8, seed=3)
    assert np.array_equal(again.ood["mean"], r.ood["mean"]) and np.array_equal(again.per["mean"], r.per["mean"])
    alone = dropcli.uncertainty(MLP_PT, x, T=8, seed=stream_seed(3, 1))
    assert np.array_equal(alone.per["mean"], r.ood["mean"])
    assert stream_seed(3, 0) == 3  # the main input's stream is unchanged
