"""Statistical tests for standard (inverted) and vanilla dropout, in torch and ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import assert_close_mean, assert_same_distribution, binom_tol, onnx_site, ort_session, run_onnx, torch_site

N = 200_000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_standard_torch_drop_rate_and_moments(p):
    torch.manual_seed(0)
    q = 1 - p
    x = torch.full((N,), 2.0)
    y = torch_site("standard", p=p)(x)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) <= binom_tol(p, N)
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 2.0 / q))
    # E[y] = x, Var[y] = x^2 p/q
    assert_close_mean(y.double().mean().item(), 2.0, 2.0 * (p / q) ** 0.5, N, "mean")


def test_standard_eval_is_identity_and_p0_keeps_all():
    x = torch.randn(1000)
    assert torch.equal(torch_site("standard", mc=False, p=0.5)(x), x)
    assert torch.equal(torch_site("standard", p=0.0)(x), x)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_vanilla_torch(p):
    torch.manual_seed(1)
    q = 1 - p
    x = torch.full((N,), 3.0)
    y = torch_site("vanilla", p=p)(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 3.0}
    assert abs((y == 0).double().mean().item() - p) <= binom_tol(p, N)
    assert torch.allclose(torch_site("vanilla", mc=False, p=p)(x), x * q)


@pytest.mark.parametrize("name", ["standard", "vanilla"])
def test_onnx_matches_torch(name):
    p = 0.3
    x = np.random.default_rng(0).normal(size=(400, 500)).astype(np.float32)
    sess = ort_session(onnx_site(name, [None, 500], p=p))
    # inference mode: exactly the torch test rule
    det = run_onnx(sess, x, mc=False)
    ref = torch_site(name, mc=False, p=p)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(det, ref)
    # MC mode in a DEFAULT session: stochastic, same drop rate and distribution as torch
    a, b = run_onnx(sess, x), run_onnx(sess, x)
    assert not np.array_equal(a, b)
    assert abs((a == 0).mean() - p) <= binom_tol(p, a.size)
    torch.manual_seed(0)
    t = torch_site(name, p=p)(torch.from_numpy(x)).numpy()
    assert_same_distribution(a, t, f"{name} torch vs onnx")
