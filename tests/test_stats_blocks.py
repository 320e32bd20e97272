"""The local engine computes the per-example statistics over blocks of examples (for speed: the
temporaries stay in cache); the numbers must be those of one pass over all examples, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from dropcli.analysis import stats
from dropcli.engines import local


@pytest.mark.parametrize("kind", ["logits", "probs", "regression", "mixed"])
def test_blocks_are_one_pass_bit_for_bit(kind, monkeypatch):
    rng = np.random.default_rng(0)
    T, N, K = 7, 41, 5
    s = (rng.standard_normal((T, N, K)) * 3).astype(np.float32)
    task = "regression" if kind == "regression" else "classification"
    if kind in ("probs", "mixed"):
        s = stats.to_probs(s).astype(np.float32)
    if kind == "mixed":  # probabilities in the first blocks, logits in a later one: not probabilities
        s[:, 30:] = rng.standard_normal((T, N - 30, K)).astype(np.float32)
    monkeypatch.setattr(local, "STATS_BYTES", 8 * T * K * 4)  # blocks of 4 examples, the last one of 1
    got = local.per_example_blocks(s, task, 2.0 if task == "regression" else None, None, (K,))
    want = stats.per_example(s, task, 2.0 if task == "regression" else None)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
