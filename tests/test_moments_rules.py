"""dropcli.engines.moments: the moment-rule tables (MODULE_RULES, ATEN_RULES, FUNCTION_RULES,
METHOD_RULES), and each kind of rule on small fx graphs (symbolically traced, so modules, Tensor
methods and Python functions; the aten rules are covered by test_variants_fast's exported models).

The random value is made by an ``nn.Dropout`` on the input (inverted dropout: mean x, variance
(p/q) x^2, independent units); every expected mean and variance below is computed here from
the layer's weights, not by the propagator.
"""

from __future__ import annotations

import operator
import types

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from dropcli.backends.torch.layers import Activation, activation_of_call, activation_of_module
from dropcli.engines.moments import (ATEN_RULES, FUNCTION_RULES, METHOD_RULES, MODULE_BASE_RULES, MODULE_RULES, Gauss,
                                     MomentPropagator, probs_from_logits)
from dropcli.errors import UsageError
from dropcli.variants.fast import gauss_moments

P = 0.25
Q = 1 - P


class Net(nn.Module):
    def __init__(self, fn, **mods):
        super().__init__()
        self.fn = fn
        self.drop = nn.Dropout(P)
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x):
        return self.fn(self, self.drop(x))


def _propagate(fn, x, **mods):
    prop = MomentPropagator(types.SimpleNamespace(gm=fx.symbolic_trace(Net(fn, **mods).eval())))
    return prop.run([x]), prop.step_records()


def _src(x):  # the moments of the dropout site's output
    return x, (P / Q) * x * x


def _close(g: Gauss, mean, var):
    assert isinstance(g, Gauss)
    torch.testing.assert_close(g.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.var, var, rtol=1e-5, atol=1e-6)


def test_every_table_entry_is_a_rule_method_and_activations_are_left_to_the_classifiers():
    rules = {f for t in (MODULE_RULES, MODULE_BASE_RULES, ATEN_RULES, FUNCTION_RULES, METHOD_RULES) for f in t.values()}
    assert rules and all(callable(f) and getattr(MomentPropagator, f.__name__) is f for f in rules)
    # the activation classifiers never claim an op a table has (so the lookup order can't matter)
    for name in ATEN_RULES:
        packet = getattr(torch.ops.aten, name, None)
        for ov in (packet.overloads() if packet is not None else []):
            assert activation_of_call(getattr(packet, ov), {}) is None, name
    for f in FUNCTION_RULES:
        assert activation_of_call(f, {}) is None, f
    for cls in MODULE_RULES:
        assert activation_of_module(object.__new__(cls)) is None, cls
    assert not set(METHOD_RULES) & {"exp", "log", "mul", "add"}  # no silent rules for nonlinear/random-random ops


def test_module_rules():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    m, v = _src(x)
    lin = nn.Linear(6, 3)
    g, steps = _propagate(lambda s, h: s.lin(h), x, lin=lin)
    _close(g, lin(m), v @ (lin.weight * lin.weight).T)
    assert [s["exact"] for s in steps] == [True, True] and not g.indep
    # conv, then BatchNorm (inference statistics), then Flatten
    x4 = torch.randn(2, 3, 5, 5)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    g, _ = _propagate(lambda s, h: s.flat(s.bn(s.conv(h))), x4, conv=conv, bn=bn, flat=nn.Flatten())
    m4, v4 = _src(x4)
    vc = F.conv2d(v4, conv.weight * conv.weight, None, padding=1)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(1, -1, 1, 1)
    _close(g, bn(conv(m4)).flatten(1), (vc * scale * scale).flatten(1))
    # an activation module: the closed-form relu moments
    g, steps = _propagate(lambda s, h: s.act(h), x, act=nn.ReLU())
    _close(g, *gauss_moments(Activation("relu"), m, v)[:2])
    # softmax module: mean-field probabilities
    g, steps = _propagate(lambda s, h: s.sm(h), x, sm=nn.Softmax(dim=1))
    _close(g, *probs_from_logits(m, v, 1))
    assert g.probs and steps[-1]["exact"] is False


def test_method_and_function_rules():
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    m, v = _src(x)
    c = torch.rand(6) + 0.5
    w = torch.randn(6, 2)
    cases = {
        "view": (lambda s, h: h.view(2, 12), (m.view(2, 12), v.view(2, 12))),
        "getitem": (lambda s, h: h[:, 1:3], (m[:, 1:3], v[:, 1:3])),
        "size": (lambda s, h: h.reshape(h.size(0), 3, 2), (m.reshape(4, 3, 2), v.reshape(4, 3, 2))),
        "mul": (lambda s, h: h * c, (m * c, v * c * c)),
        "rmul": (lambda s, h: 2.0 * h, (2 * m, 4 * v)),
        "div": (lambda s, h: h / c, (m / c, v / (c * c))),
        "sub-alpha": (lambda s, h: torch.sub(c, h, alpha=0.5), (c - 0.5 * m, 0.25 * v)),
        "matmul": (lambda s, h: h @ w, (m @ w, v @ (w * w))),
        "linear": (lambda s, h: F.linear(h, w.T, c[:2]), (F.linear(m, w.T, c[:2]), v @ (w * w))),
        "dropout": (lambda s, h: F.dropout(h, 0.5), (m, v / 0.5 + m * m)),
        "relu-method": (lambda s, h: h.relu(), gauss_moments(Activation("relu"), m, v)[:2]),
        "leaky-arg": (lambda s, h: F.leaky_relu(h, 0.2),
                      gauss_moments(Activation("leakyrelu", (("negative_slope", 0.2),)), m, v)[:2]),
        "softmax-method": (lambda s, h: h.softmax(dim=1), probs_from_logits(m, v, 1)),
    }
    for name, (fn, (em, ev)) in cases.items():
        g, _ = _propagate(fn, x)
        try:
            _close(g, em, ev)
        except AssertionError as e:  # pragma: no cover
            raise AssertionError(f"{name}: {e}") from None
    # the sum of two random values: independent, flagged as approximate
    g, steps = _propagate(lambda s, h: operator.add(h, s.drop(h)), x)
    assert steps[-1]["rule"].startswith("sum of random values") and steps[-1]["exact"] is False


@pytest.mark.parametrize("fn, mods, what", [
    (lambda s, h: s.m(h), {"m": nn.LayerNorm(6)}, "LayerNorm m"),
    (lambda s, h: s.m(h.reshape(2, 3, 2, 2)), {"m": nn.Conv2d(3, 1, 1, padding_mode="reflect")}, "Conv2d m"),
    (lambda s, h: s.m(h), {"m": nn.BatchNorm1d(6, track_running_stats=False).eval()}, "BatchNorm1d m"),
    (lambda s, h: h * s.drop(h), {}, "the op mul"),
    (lambda s, h: 1.0 / h, {}, "the op truediv"),
    (lambda s, h: h.exp(), {}, "Tensor.exp"),
    (lambda s, h: torch.exp(h), {}, "the op exp"),
    (lambda s, h: h.softmax(1).softmax(1), {}, "Tensor.softmax of probabilities"),
    (lambda s, h: F.linear(h, s.drop(h.t())), {}, "the op linear"),
])
def test_ops_without_a_rule_are_refused_in_one_line(fn, mods, what):
    with pytest.raises(UsageError) as info:
        _propagate(fn, torch.randn(4, 6), **mods)
    assert info.value.message.startswith(f"--method moments has no moment rule for {what} (node ")
    assert "--method mc" in info.value.hint and "\n" not in info.value.one_line()
