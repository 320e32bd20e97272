"""The recurrent family (rnndrop, recurrent, variational) and the cell-level LSTM/GRU loops.

- the loop reproduces the fused nn.LSTM/nn.GRU to 1e-5 (all layers, bidirectional,
  batch_first, projections, given/zero initial states); inference mode is the fused op, bitwise;
- each variant's masks sit where docs/variants.md puts them: checked against an independent
  step-by-step reference fed the same masks;
- masks are per sequence where they should be, per step where asked; drop rates and moments on
  large tensors with fixed seeds, tolerances of Z = 6 standard errors from the formulas;
- ONNX (Scan): inference mode is the original node; with p = 0 the Scan equals the fused op;
  MC mode matches torch in distribution in a default onnxruntime session, and dropcli's two
  MC engines draw identical samples for the same seed;
- fx replacement of nn.LSTM/GRU modules and aten.lstm/gru calls in every torch format, and
  saving the result to TorchScript, .pt2 and ONNX.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dropcli.backends import load_model
from dropcli.backends.onnx.model import MC_INPUT, OnnxModel
from dropcli.errors import DropcliError, UsageError
from dropcli.engines.onnx_mc import OnnxRunner
from dropcli.engines.torch_mc import TorchMC
from dropcli.backends.torch.rnn import RecurrentLoop, StepMasks
from dropcli.variants.base import set_mc
from dropcli.variants.recurrent import fx_rnn_mode, replace_in_fx, replace_onnx_rnn, spec_by_name
from helpers import Z, binom_tol, ort_session, tol
from models import GRUNet, LSTMNet, save_as

warnings.filterwarnings("ignore", message=".*LSTM with projections.*")

CASES = [("rnndrop", {}), ("recurrent", {"mask_per": "step"}), ("recurrent", {"mask_per": "sequence"}),
         ("variational", {"tie": "tied"}), ("variational", {"tie": "untied"})]
# every (variant, options, layer type) that applies: rnndrop is LSTM only (its GRU refusal is tested)
CASES_MODE = [(n, e, m) for n, e in CASES for m in ("lstm", "gru") if not (n == "rnndrop" and m == "gru")]


def _site(name, layer, p=0.3, mc=True, **extra):
    spec = spec_by_name(name)
    return spec.torch_module(rnn=layer, **spec.resolve_params({"p": p, **extra})).set_mc(mc)


def _flat(out):
    y, s = out
    return [y] + (list(s) if isinstance(s, tuple) else [s])


# ------------------------------------------------------------------------ the loop


@pytest.mark.parametrize("mode,layers,bi,bf,bias,proj,given", [
    c for c in itertools.product(["lstm", "gru"], [1, 2], [False, True], [False, True], [True, False], [0, 5], [False, True])
    if not (c[0] == "gru" and c[5])
])
def test_loop_reproduces_fused(mode, layers, bi, bf, bias, proj, given):
    torch.manual_seed(0)
    cls = nn.LSTM if mode == "lstm" else nn.GRU
    m = cls(6, 8, num_layers=layers, bidirectional=bi, batch_first=bf, bias=bias, **({"proj_size": proj} if proj else {})).eval()
    B, S, D = 3, 7, 2 if bi else 1
    x = torch.randn((B, S, 6) if bf else (S, B, 6))
    hx = None
    if given:
        h0 = torch.randn(layers * D, B, proj or 8)
        hx = (h0, torch.randn(layers * D, B, 8)) if mode == "lstm" else h0
    loop = RecurrentLoop.from_module(m)
    with torch.no_grad():
        ref, got, fused = _flat(m(x, hx)), _flat(loop(x, hx)), _flat(loop.fused(x, hx))
        scripted = _flat(RecurrentLoop.from_module(m, use_script=True)(x, hx))
    for r, g, f, s in zip(ref, got, fused, scripted):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
        torch.testing.assert_close(s, r, rtol=0, atol=1e-5)
        assert torch.equal(f, r)  # the fused op on the very same weight tensors


def test_loop_from_flat_weights_and_bad_counts():
    m = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, proj_size=3).eval()
    loop = RecurrentLoop.from_flat("lstm", m._flat_weights, has_biases=True, num_layers=2, bidirectional=True, batch_first=True)
    assert loop.proj_size == 3 and loop.hidden_size == 6
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(loop(x)[0], m(x)[0], rtol=0, atol=1e-5)
    with pytest.raises(DropcliError, match="weight tensors"):
        RecurrentLoop("lstm", m._flat_weights[:-1], hidden_size=6, num_layers=2, bidirectional=True, proj_size=3)


@pytest.mark.parametrize("name,extra,mode", CASES_MODE)
def test_inference_mode_is_the_fused_layer_and_p0_is_exact(name, extra, mode):
    torch.manual_seed(1)
    cls = nn.LSTM if mode == "lstm" else nn.GRU
    m = cls(5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = torch.randn(4, 6, 5)
    with torch.no_grad():
        ref = _flat(m(x))
        for a, r in zip(_flat(_site(name, m, mc=False, **extra)(x)), ref):
            assert torch.equal(a, r)
        for a, r in zip(_flat(_site(name, m, p=0.0, mc=True, **extra)(x)), ref):  # masks of ones: the loop itself
            torch.testing.assert_close(a, r, rtol=0, atol=1e-5)
        s1, s2 = _site(name, m, mc=True, **extra)(x)[0], _site(name, m, mc=True, **extra)(x)[0]
    assert not torch.equal(s1, s2) and not torch.allclose(s1, ref[0], atol=1e-3)


def test_rnndrop_refuses_gru_and_bad_options():
    with pytest.raises(UsageError, match="no cell state"):
        _site("rnndrop", nn.GRU(3, 4, batch_first=True))
    with pytest.raises(UsageError, match="step"):
        spec_by_name("recurrent").resolve_params({"mask_per": "token"})
    with pytest.raises(UsageError, match="tied"):
        spec_by_name("variational").resolve_params({"tie": "both"})
    with pytest.raises(UsageError, match="p_input|p-input"):
        spec_by_name("variational").resolve_params({"p_input": 1.0})


# ------------------------------------------------------------------------ formulas vs a reference


def _reference(mode, m, x, masks: StepMasks):
    """Single-layer, forward, batch_first; the rules of docs/variants.md, written out gate by gate
    in torch's gate order (LSTM i, f, g, o; GRU r, z, n)."""
    G = 4 if mode == "lstm" else 3
    H = m.hidden_size
    W, U, b, c_ = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0
    Wk, Uk = W.reshape(G, H, -1), U.reshape(G, H, -1)
    bk, ck = b.reshape(G, H), c_.reshape(G, H)
    B, S, _ = x.shape
    h = torch.zeros(B, H)
    c = torch.zeros(B, H)
    outs = []

    def gate_mask(mk, k):
        if mk is None:
            return 1.0
        return mk[k] if mk.dim() == 3 else mk

    for t in range(S):
        xt = x[:, t]
        a = [(xt * gate_mask(masks.x, k)) @ Wk[k].T + bk[k] for k in range(G)]  # bias never masked
        r = [(h * gate_mask(masks.h, k)) @ Uk[k].T + ck[k] for k in range(G)]
        gm = 1.0 if masks.g is None else (masks.g[t] if masks.g.dim() == 3 else masks.g)
        if mode == "lstm":
            i, f, g, o = (torch.sigmoid(a[0] + r[0]), torch.sigmoid(a[1] + r[1]), torch.tanh(a[2] + r[2]),
                          torch.sigmoid(a[3] + r[3]))
            c = f * c + i * (g * gm)  # Semeniuta: the candidate only
            if masks.c is not None:
                c = masks.c * c  # Moon: the cell state c (not h), no rescaling
            h = o * torch.tanh(c)
        else:
            rr, z = torch.sigmoid(a[0] + r[0]), torch.sigmoid(a[1] + r[1])
            n = torch.tanh(a[2] + rr * r[2]) * gm
            h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("name,extra,mode", CASES_MODE)
def test_masks_sit_where_the_catalogue_says(name, extra, mode):
    torch.manual_seed(2)
    cls = nn.LSTM if mode == "lstm" else nn.GRU
    m = cls(5, 6, batch_first=True).eval()
    site = _site(name, m, p=0.4, **extra)
    x = torch.randn(16, 9, 5)
    with torch.no_grad():
        torch.manual_seed(7)
        masks = site.masks(x)
        torch.manual_seed(7)  # the site draws the same masks again
        y = site(x)[0]
        ref = _reference(mode, m, x, masks[0])
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    q = 0.6
    inv = torch.tensor(1 / q).item()  # 1/q in float32
    mk = masks[0]
    if name == "rnndrop":
        assert mk.c.shape == (16, 6) and set(mk.c.unique().tolist()) <= {0.0, 1.0}  # one per sequence, unscaled
    elif name == "recurrent":
        shape = (9, 16, 6) if extra["mask_per"] == "step" else (16, 6)
        assert mk.g.shape == shape and set(mk.g.unique().tolist()) <= {0.0, inv}
    else:
        G = 4 if mode == "lstm" else 3
        assert mk.x.shape == ((G, 16, 5) if extra["tie"] == "untied" else (16, 5))
        assert mk.h.shape == ((G, 16, 6) if extra["tie"] == "untied" else (16, 6))
        for t in (mk.x, mk.h):
            assert set(t.unique().tolist()) <= {0.0, inv}


def test_rnndrop_zeroes_the_same_units_at_every_step():
    """c_t = m*(...) with one m per sequence: a dropped unit has c = 0, hence h = 0, at every step."""
    torch.manual_seed(3)
    m = nn.LSTM(4, 32, batch_first=True).eval()
    p = 0.3
    x = torch.randn(400, 6, 4)
    with torch.no_grad():
        y = _site("rnndrop", m, p=p)(x)[0]
    zero = y == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero)), "the dropped units change between steps"
    rate = zero[:, 0].float().mean().item()
    n = zero[:, 0].numel()
    assert abs(rate - p) <= binom_tol(p, n), f"drop rate {rate} vs {p}"


@pytest.mark.parametrize("name,extra,scaled", [
    ("rnndrop", {}, False), ("recurrent", {"mask_per": "step"}, True), ("recurrent", {"mask_per": "sequence"}, True),
    ("variational", {"tie": "tied"}, True), ("variational", {"tie": "untied"}, True),
])
def test_mask_rates_and_moments(name, extra, scaled):
    """Drop rate p, mean and variance of the masks (inverted: mean 1, var p/q; rnndrop: mean q,
    var pq) on large tensors; per-step masks change between steps at the rate 2pq."""
    torch.manual_seed(4)
    p = 0.35
    q = 1 - p
    m = nn.LSTM(16, 32, batch_first=True).eval()
    site = _site(name, m, p=p, **extra)
    x = torch.zeros(3000, 5, 16)
    masks = site.masks(x)[0]
    tensors = [t for t in (masks.x, masks.h, masks.c, masks.g) if t is not None]
    for t in tensors:
        v = t.flatten().double()
        n = v.numel()
        drop = (v == 0).double().mean().item()
        assert abs(drop - p) <= binom_tol(p, n), f"drop rate {drop} vs {p}"
        mean_e, var_e = (1.0, p / q) if scaled else (q, p * q)
        assert abs(v.mean().item() - mean_e) <= tol(math.sqrt(var_e), n)
        # SE of a sample variance: sqrt((m4 - var^2)/n), m4 from the two-point law
        hi = 1 / q if scaled else 1.0
        m4 = q * (hi - mean_e) ** 4 + p * mean_e ** 4
        assert abs(v.var().item() - var_e) <= Z * math.sqrt((m4 - var_e ** 2) / n)
    if name == "recurrent" and extra["mask_per"] == "step":
        g = masks.g  # [S, B, H]
        change = (g[1:] != g[:-1]).double().mean().item()
        assert abs(change - 2 * p * q) <= binom_tol(2 * p * q, g[1:].numel())


@pytest.mark.parametrize("name,extra,unbiased", [
    ("rnndrop", {}, False), ("recurrent", {"mask_per": "step"}, True), ("recurrent", {"mask_per": "sequence"}, True),
])
def test_cell_state_moments_one_step(name, extra, unbiased):
    """One step from zero states: c_1 = i*g. Semeniuta's inverted candidate mask keeps the mean,
    E[c_1] = i*g, Var = (i*g)^2 p/q; RNNDrop does not rescale: E[c_1] = q*i*g, Var = (i*g)^2 pq."""
    torch.manual_seed(5)
    p = 0.25
    q = 1 - p
    m = nn.LSTM(6, 16, batch_first=True).eval()
    x1 = torch.randn(1, 1, 6)
    with torch.no_grad():
        c_det = m(x1)[1][1][0, 0].double()  # [H]
        n = 20000
        c = _site(name, m, p=p, **extra)(x1.expand(n, 1, 6).contiguous())[1][1][0].double()  # [n, H]
    mean_e = c_det if unbiased else q * c_det
    var_e = c_det ** 2 * (p / q if unbiased else p * q)
    # c_1 = c_det * m with m two-valued, so Var-hat / Var has SE sqrt((kurt - 1)/n), kurt = m4 / var^2 of m
    hi = 1 / q if unbiased else 1.0
    mm = q * hi
    var_m = q * (hi - mm) ** 2 + p * mm ** 2
    kurt = (q * (hi - mm) ** 4 + p * mm ** 4) / var_m ** 2
    for j in range(16):
        assert abs(c[:, j].mean().item() - mean_e[j].item()) <= tol(math.sqrt(var_e[j].item()), n) + 1e-7
        rel = c[:, j].var().item() / var_e[j].item()
        assert abs(rel - 1) <= Z * math.sqrt((kurt - 1) / n), f"unit {j}: variance ratio {rel}"


# ------------------------------------------------------------------------ ONNX


class _Seq(nn.Module):
    def __init__(self, cls, layers=2, bi=True):
        super().__init__()
        self.rnn = cls(6, 8, num_layers=layers, bidirectional=bi, batch_first=True)

    def forward(self, x):
        y, _ = self.rnn(x)
        return y


def _onnx_rewrite(path, name, params):
    om = OnnxModel.load(path)
    spec = spec_by_name(name)
    idx = [i for i, n in enumerate(om.model.graph.node) if n.op_type in ("LSTM", "GRU")]
    assert idx
    for i in reversed(idx):
        replace_onnx_rnn(om, i, spec, spec.resolve_params(params))
    om.finalize()
    return om


@pytest.mark.parametrize("name,extra,mode", CASES_MODE)
def test_onnx_inference_exact_p0_scan_exact_and_mc_distribution(name, extra, mode, tmp_path):
    torch.manual_seed(6)
    net = _Seq(nn.LSTM if mode == "lstm" else nn.GRU).eval()
    x = torch.randn(3, 5, 6)
    path = save_as(net, x, tmp_path / "m.onnx", "onnx")
    xin = x.numpy()
    orig = ort_session(onnx.load(str(path))).run(None, {"x": xin})[0]
    om = _onnx_rewrite(path, name, {"p": 0.3, **extra})
    sess = ort_session(om.model)  # a DEFAULT session, as users run it
    np.testing.assert_array_equal(sess.run(None, {"x": xin})[0], orig)
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(orig, ref, rtol=0, atol=1e-5)
    # p = 0: the Scan branch alone must equal the fused op
    om0 = _onnx_rewrite(path, name, {"p": 0.0, **extra})
    np.testing.assert_allclose(ort_session(om0.model).run(None, {"x": xin, MC_INPUT: np.array(True)})[0], orig, rtol=0, atol=1e-5)
    # MC: torch site vs onnxruntime, per output mean and variance over T passes
    T = 300
    site = _site(name, net.rnn, p=0.3, **extra)
    torch.manual_seed(8)
    with torch.no_grad():
        ts = np.stack([site(x)[0].numpy() for _ in range(T)])
    os_ = np.stack([sess.run(None, {"x": xin, MC_INPUT: np.array(True)})[0] for _ in range(T)])
    assert ts.std(0).max() > 0 and os_.std(0).max() > 0
    se = np.sqrt(ts.var(0) / T + os_.var(0) / T)
    z = np.abs(ts.mean(0) - os_.mean(0)) / np.maximum(se, 1e-9)
    assert z.max() <= Z, f"torch and ONNX MC means differ: max z = {z.max():.2f}"

    def var_se(a):
        c = a - a.mean(0)
        return np.sqrt(np.maximum((c ** 4).mean(0) - c.var(0) ** 2, 0) / T)

    zv = np.abs(ts.var(0) - os_.var(0)) / np.maximum(np.sqrt(var_se(ts) ** 2 + var_se(os_) ** 2), 1e-12)
    assert zv.max() <= Z, f"torch and ONNX MC variances differ: max z = {zv.max():.2f}"


def test_onnx_refuses_rnndrop_on_gru(tmp_path):
    path = save_as(_Seq(nn.GRU).eval(), torch.randn(2, 4, 6), tmp_path / "g.onnx", "onnx")
    with pytest.raises(UsageError, match="no cell state"):
        _onnx_rewrite(path, "rnndrop", {"p": 0.3})


@pytest.mark.parametrize("name,extra", CASES)
def test_both_mc_engines_draw_the_same_samples(name, extra, tmp_path):
    """TorchMC and OnnxRunner key the noise by (seed, call, example): the torch site and the ONNX
    Scan rewrite draw the same masks in the same order, so their samples agree, and each
    example's samples do not depend on its batch."""
    torch.manual_seed(9)
    net = LSTMNet().eval()
    x = torch.randn(40, 5, 8)
    pe = save_as(net, x, tmp_path / "m.pt2", "export")
    po = save_as(net, x, tmp_path / "m.onnx", "onnx")
    spec = spec_by_name(name)
    prm = spec.resolve_params({"p": 0.3, **extra})
    tm = load_model(str(pe))
    for n in [n for n in tm.gm.graph.nodes if fx_rnn_mode(tm.gm, n)]:
        replace_in_fx(tm.gm, n, spec, prm, "dropcli_site_0")
    tm._recompile()
    runner = OnnxRunner(_onnx_rewrite(po, name, {"p": 0.3, **extra}))
    assert runner.batch_invariant, "some mask is drawn by in-graph RNG"
    a = TorchMC(tm.gm).run([x], list(range(40)), seed=3, T=8).numpy()
    b = runner.run([x.numpy()], list(range(40)), seed=3, T=8)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    c = runner.run([x.numpy()[5:9]], [5, 6, 7, 8], seed=3, T=8)
    np.testing.assert_array_equal(b[5:9], c)
    assert a.std(1).mean() > 1e-4


# ------------------------------------------------------------------------ torch formats


@pytest.fixture(scope="module")
def rnn_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("rnn")
    torch.manual_seed(10)
    out = {}
    for key, model in (("lstm", LSTMNet().eval()), ("gru", GRUNet().eval())):
        ex = torch.randn(4, 5, 8)
        out[key] = {"model": model, "x": torch.randn(6, 5, 8),
                    **{fmt: save_as(model, ex, d / f"{key}.{fmt}", fmt) for fmt in ("export", "torchscript", "pickle")}}
    return out


def _replaced(m, fmt, name, extra):
    opts = {"trust_pickle": True, "imports": ["tests/models.py"]} if fmt == "pickle" else {"input_shape": "4x5x8"}
    tm = load_model(str(m[fmt]), **opts)
    tm.example_inputs = (torch.randn(4, 5, 8),)
    spec = spec_by_name(name)
    nodes = [n for n in tm.gm.graph.nodes if fx_rnn_mode(tm.gm, n)]
    assert len(nodes) == 1
    replace_in_fx(tm.gm, nodes[0], spec, spec.resolve_params({"p": 0.3, **extra}), "dropcli_site_0")
    tm._recompile()
    return tm


@pytest.mark.parametrize("fmt", ["export", "torchscript", "pickle"])
@pytest.mark.parametrize("key,name,extra", [("lstm", "rnndrop", {}), ("gru", "recurrent", {"mask_per": "step"}),
                                            ("lstm", "variational", {"tie": "untied"})])
def test_fx_replacement_in_every_torch_format(rnn_models, fmt, key, name, extra):
    """nn.LSTM/nn.GRU modules (pickle) and aten.lstm/aten.gru calls (.pt2, TorchScript via TS2EP)."""
    m = rnn_models[key]
    x = m["x"]
    with torch.no_grad():
        ref = m["model"](x)
    tm = _replaced(m, fmt, name, extra)
    with torch.no_grad():
        assert torch.equal(tm.gm(x), ref)
        set_mc(tm.gm, True)
        a, b = tm.gm(x), tm.gm(x)
    assert a.shape == ref.shape and not torch.equal(a, b)


@pytest.mark.parametrize("key,name,extra,ofmt", [
    ("lstm", "recurrent", {"mask_per": "step"}, "torchscript"), ("lstm", "variational", {"tie": "tied"}, "export"),
    ("lstm", "rnndrop", {}, "onnx"), ("gru", "variational", {"tie": "untied"}, "torchscript"),
])
def test_saving_the_rewrite(rnn_models, key, name, extra, ofmt, tmp_path):
    m = rnn_models[key]
    x = m["x"]
    with torch.no_grad():
        ref = m["model"](x)
    tm = _replaced(m, "export", name, extra)
    out = tmp_path / f"out.{ofmt}"
    tm.save(out, ofmt)
    if ofmt == "onnx":
        sess = ort_session(onnx.load(str(out)))
        name_in = sess.get_inputs()[0].name
        np.testing.assert_allclose(sess.run(None, {name_in: x.numpy()})[0], ref.numpy(), rtol=0, atol=1e-5)
        a = sess.run(None, {name_in: x.numpy(), MC_INPUT: np.array(True)})[0]
        b = sess.run(None, {name_in: x.numpy(), MC_INPUT: np.array(True)})[0]
        assert not np.array_equal(a, b)
        return
    lm = torch.export.load(str(out)).module() if ofmt == "export" else torch.jit.load(str(out))
    with torch.no_grad():
        assert torch.equal(lm(x), ref), f"{ofmt}: inference output changed"
        assert set_mc(lm, True) == 1
        assert not torch.equal(lm(x), lm(x))
    if ofmt == "torchscript":
        # the traced loop is a TorchScript function: other sequence lengths run the full loop,
        # and the per-step masks follow the length
        x9 = torch.randn(3, 9, 8)
        with torch.no_grad():
            set_mc(lm, False)
            assert torch.equal(lm(x9), m["model"](x9))
            set_mc(lm, True)
            assert lm(x9).shape == (3, 3)
    else:
        with pytest.raises(Exception, match="5"):  # the exported program guards the unrolled length
            lm(torch.randn(3, 9, 8))


def test_time_major_layer_is_refused():
    class TM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5)

        def forward(self, x):
            return self.lstm(x.transpose(0, 1))[0]

    gm = torch.fx.symbolic_trace(TM())
    n = next(n for n in gm.graph.nodes if fx_rnn_mode(gm, n))
    with pytest.raises(UsageError, match="batch_first"):
        replace_in_fx(gm, n, spec_by_name("recurrent"), spec_by_name("recurrent").resolve_params({}), "dropcli_site_0")


@pytest.mark.parametrize("op,direction,layout", [("LSTM", "reverse", 0), ("GRU", "forward", 0), ("GRU", "bidirectional", 0),
                                                 ("LSTM", "forward", 1)])
def test_onnx_hand_built_node_without_initial_states(op, direction, layout):
    """A stock ONNX node with no initial states (zeros made from the batch size) and a
    reverse-only direction; layout=1 (which onnxruntime does not run) is refused clearly."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    G = 4 if op == "LSTM" else 3
    D = 2 if direction == "bidirectional" else 1
    H, I, S = 5, 3, 6
    W = numpy_helper.from_array(rng.normal(size=(D, G * H, I)).astype(np.float32), "W")
    R = numpy_helper.from_array(rng.normal(size=(D, G * H, H)).astype(np.float32) * 0.5, "R")
    Bb = numpy_helper.from_array(rng.normal(size=(D, 2 * G * H)).astype(np.float32) * 0.1, "B")
    attrs = {"hidden_size": H, "direction": direction}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    if layout:
        attrs["layout"] = 1
    xshape = ["N", S, I] if layout else [S, "N", I]
    node = helper.make_node(op, ["x", "W", "R", "B"], ["Y", "Y_h"], name="rnn", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["a", "b", "c", "d"]),
                           helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, ["e", "f", "g"])], initializer=[W, R, Bb])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    name = "rnndrop" if op == "LSTM" else "recurrent"
    if layout:
        with pytest.raises(UsageError, match="layout=1"):
            replace_onnx_rnn(OnnxModel(model), 0, spec_by_name(name), spec_by_name(name).resolve_params({}))
        return
    x = rng.normal(size=(S, 4, I)).astype(np.float32)
    orig = ort_session(model).run(None, {"x": x})
    for p, mc in ((0.3, False), (0.0, True)):
        om = OnnxModel(onnx.ModelProto.FromString(model.SerializeToString()))
        replace_onnx_rnn(om, 0, spec_by_name(name), spec_by_name(name).resolve_params({"p": p}))
        om.finalize()
        got = ort_session(om.model).run(None, {"x": x, MC_INPUT: np.array(mc)})
        for a, b in zip(got, orig):
            assert a.shape == b.shape
            if mc:
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
            else:
                np.testing.assert_array_equal(a, b)
