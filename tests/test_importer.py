"""dropcli.backends.torch.importer: every loader's output (and ONNX) becomes a GraphModule of real modules
with the same function."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from dropcli.backends import load_model
from dropcli.errors import DropcliError
from dropcli.backends.torch.importer import from_onnx, to_modules
from models import CNN, MLP, LSTMNet, ResBlock, randomise_bn, save_as

MODELS = {
    "MLP": (lambda: MLP(), (64,)),
    "CNN": (lambda: randomise_bn(CNN()), (1, 8, 8)),
    "ResBlock": (lambda: randomise_bn(ResBlock()), (1, 8, 8)),
    "LSTMNet": (lambda: LSTMNet(), (5, 8)),  # the LSTM stays an nn.LSTM (ONNX's LSTM node becomes one); its Linear layers become modules
}
FORMATS = {"torchscript": ".pt", "export": ".pt2", "pickle": ".pkl", "state_dict": ".sd", "onnx": ".onnx"}
FACTORY = {"MLP": "MLP", "CNN": "CNN", "ResBlock": "ResBlock", "LSTMNet": "LSTMNet"}
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
FUNCTIONAL = {"linear", "conv", "convolution", "addmm", "batch_norm", "_native_batch_norm"}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_format_becomes_real_modules(tmp_path, name, fmt):
    torch.manual_seed(0)
    make, feat = MODELS[name]
    model = make().eval()
    x = torch.randn(5, *feat)
    path = save_as(model, torch.randn(2, *feat), tmp_path / f"m{FORMATS[fmt]}", fmt)
    import models as models_mod

    loaded = load_model(path, trust_pickle=True, imports=[models_mod.__file__], arch=f"{models_mod.__file__}:{FACTORY[name]}",
                        input_shape="x".join(map(str, (2,) + feat)))
    gm = to_modules(loaded)
    with torch.no_grad():
        want = model(x)
        got = gm(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    n_layers = sum(isinstance(m, PRUNABLE) for m in model.modules())
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, PRUNABLE) for m in mods) == n_layers
    if fmt == "onnx":  # ONNX's LSTM node is imported as the nn.LSTM it was exported from
        assert sum(isinstance(m, nn.LSTM) for m in mods) == sum(isinstance(m, nn.LSTM) for m in model.modules())
    if fmt != "onnx":  # the ONNX exporter folds BatchNorm into the convolutions
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == n_bn
    left = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"
            and any(f in str(n.target).split(".")[-2 if "aten" in str(n.target) else -1] for f in FUNCTIONAL)]
    assert not left, left
    # the modules hold the trained weights as trainable parameters
    assert all(isinstance(m.weight, nn.Parameter) for m in mods if isinstance(m, PRUNABLE))


def _check_against_ort(model: onnx.ModelProto, x: np.ndarray) -> None:
    onnx.checker.check_model(model)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    gm = from_onnx(model)
    got = gm(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_onnx_matmul_add_gemm_variants_and_pools():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        numpy_helper.from_array(f(1, 3, 3, 3), "cw"), numpy_helper.from_array(f(1), "cb"),
        numpy_helper.from_array(f(1), "bns"), numpy_helper.from_array(f(1), "bnb"),
        numpy_helper.from_array(f(1) * 0.1, "bnm"), numpy_helper.from_array(np.abs(f(1)) + 0.5, "bnv"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
        numpy_helper.from_array(f(16, 6), "mw"), numpy_helper.from_array(f(6), "mb"),
        numpy_helper.from_array(f(6, 5), "gw"), numpy_helper.from_array(f(5), "gb"),
        numpy_helper.from_array(f(4, 5), "gw2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
        helper.make_node("BatchNormalization", ["c", "bns", "bnb", "bnm", "bnv"], ["bn"], epsilon=1e-3),
        helper.make_node("LeakyRelu", ["bn"], ["r"], alpha=0.2),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "mw"], ["mm"]),
        helper.make_node("Add", ["mm", "mb"], ["lin"]),
        helper.make_node("Tanh", ["lin"], ["t"]),
        helper.make_node("Dropout", ["t"], ["d"]),
        helper.make_node("Gemm", ["d", "gw", "gb"], ["g"], alpha=0.5, beta=2.0),
        helper.make_node("Sigmoid", ["g"], ["s"]),
        helper.make_node("Gemm", ["s", "gw2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _check_against_ort(model, f(3, 3, 8, 8))
    gm = from_onnx(model)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds.count("Linear") == 3 and "Conv2d" in kinds and "BatchNorm2d" in kinds
    # MatMul + Add became one Linear with a bias
    lin = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
           and isinstance(gm.get_submodule(n.target), nn.Linear)][0]
    assert lin.bias is not None


def test_onnx_unsupported_op_is_named(tmp_path):
    class Det(nn.Module):  # torch.linalg.det exports as ONNX Det, which the importer lacks
        def forward(self, x):
            return torch.linalg.det(x).unsqueeze(-1) * torch.relu(x).sum(dim=(-1, -2)).unsqueeze(-1)

    path = save_as(Det().eval(), torch.randn(2, 3, 3), tmp_path / "det.onnx", "onnx")
    with pytest.raises(DropcliError, match=r"ONNX op Det is not supported"):
        to_modules(load_model(path))


# ------------------------------------------------------------------ the op table (ONNX_HANDLERS)

def _one_op_model(op: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """A model whose only real work is one ``op`` node (plus what it needs), and an input for it."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x4 = f(2, 3, 4, 4)
    inits: list = []
    shape_in, shape_out = [2, 3, 4, 4], [2, 3, 4, 4]
    attrs: dict = {}
    ins = ["x"]
    if op == "Gemm":
        inits, ins, attrs, shape_in, shape_out = [numpy_helper.from_array(f(5, 6), "w"), numpy_helper.from_array(f(5), "b")], \
            ["x", "w", "b"], {"transB": 1}, [2, 6], [2, 5]
    elif op == "MatMul":
        inits, ins, shape_in, shape_out = [numpy_helper.from_array(f(6, 5), "w")], ["x", "w"], [2, 6], [2, 5]
    elif op in ("Add", "Sub", "Mul", "Div"):
        inits, ins = [numpy_helper.from_array(np.abs(f(4)) + 0.5, "c")], ["x", "c"]
    elif op == "Conv":
        inits, ins, attrs, shape_out = [numpy_helper.from_array(f(2, 3, 3, 3), "w")], ["x", "w"], {"pads": [1, 1, 1, 1]}, [2, 2, 4, 4]
    elif op == "BatchNormalization":
        inits = [numpy_helper.from_array(f(3), "s"), numpy_helper.from_array(f(3), "b"),
                 numpy_helper.from_array(f(3), "m"), numpy_helper.from_array(np.abs(f(3)) + 0.5, "v")]
        ins = ["x", "s", "b", "m", "v"]
    elif op in ("Softmax", "LogSoftmax"):
        attrs = {"axis": 1}
    elif op == "LeakyRelu":
        attrs = {"alpha": 0.2}
    elif op == "Clip":
        inits, ins = [numpy_helper.from_array(np.float32(-0.5), "lo"), numpy_helper.from_array(np.float32(0.5), "hi")], ["x", "lo", "hi"]
    elif op in ("MaxPool", "AveragePool"):
        attrs, shape_out = {"kernel_shape": [2, 2], "strides": [2, 2]}, [2, 3, 2, 2]
    elif op == "GlobalAveragePool":
        shape_out = [2, 3, 1, 1]
    elif op == "Flatten":
        shape_out = [2, 48]
    elif op == "Reshape":
        inits, ins, shape_out = [numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape")], ["x", "shape"], [2, 48]
    elif op == "LayerNormalization":
        inits, ins, attrs = [numpy_helper.from_array(f(4), "s"), numpy_helper.from_array(f(4), "b")], ["x", "s", "b"], {"epsilon": 1e-5}
    elif op in ("Sqrt", "Log"):
        x4 = np.abs(x4) + 0.1
    elif op == "Reciprocal":
        x4 = np.sign(x4) * (np.abs(x4) + 0.5)
    elif op == "Pow":
        inits, ins = [numpy_helper.from_array(np.float32(3.0), "e")], ["x", "e"]
    elif op == "ReduceMean":  # the dynamo exporter's global pooling (axes as an input since opset 18)
        inits, ins, attrs, shape_out = [numpy_helper.from_array(np.array([-1, -2], dtype=np.int64), "axes")], ["x", "axes"], \
            {"keepdims": 0}, [2, 3]
    elif op == "Squeeze":
        shape_in, shape_out = [2, 3, 1, 4], [2, 3, 4]
        inits, ins = [numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")], ["x", "axes"]
    elif op == "Unsqueeze":
        inits, ins, shape_out = [numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "axes")], ["x", "axes"], [2, 1, 3, 4, 4, 1]
    elif op == "Transpose":
        attrs, shape_out = {"perm": [0, 2, 3, 1]}, [2, 4, 4, 3]
    elif op == "Concat":
        inits, ins, attrs, shape_out = [numpy_helper.from_array(f(2, 1, 4, 4), "c")], ["x", "c"], {"axis": 1}, [2, 4, 4, 4]
    elif op == "Slice":
        inits = [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in
                 (("st", [1, 0]), ("en", [3, 2 ** 63 - 1]), ("ax", [1, -1]), ("sp", [1, 2]))]
        ins, shape_out = ["x", "st", "en", "ax", "sp"], [2, 2, 4, 2]
    elif op == "Cast":
        attrs = {"to": TensorProto.DOUBLE}
    elif op == "Pad":  # a TF-style asymmetric 'same' pad of the spatial axes
        inits = [numpy_helper.from_array(np.array([0, 0, 0, 1, 0, 0, 1, 2], dtype=np.int64), "pads"),
                 numpy_helper.from_array(np.float32(0.5), "v")]
        ins, shape_out = ["x", "pads", "v"], [2, 3, 5, 7]
    nodes = []
    if op == "Constant":  # a Constant feeding an Add
        nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(f(4), "k"), name="/k/Constant"))
        nodes.append(helper.make_node("Add", ["x", "k"], ["y"], name="/add/Add"))
    else:
        nodes.append(helper.make_node(op, ins, ["y"], name=f"/layer/{op}", **attrs))
    out_type = TensorProto.DOUBLE if op == "Cast" else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("y", out_type, shape_out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model, (x4 if shape_in == [2, 3, 4, 4] else f(*shape_in))


def test_every_onnx_op_in_the_table_has_a_handler_that_matches_onnxruntime():
    from dropcli.backends.torch.importer import ONNX_HANDLERS, ONNX_OPS

    from tests.test_import_ops import CASES  # the transformer / recurrent ops: tested there, several per graph

    assert ONNX_OPS == tuple(ONNX_HANDLERS) and len(set(ONNX_OPS)) == len(ONNX_OPS)
    for op in ONNX_OPS:
        if op in CASES:
            continue
        assert callable(ONNX_HANDLERS[op]), op
        model, x = _one_op_model(op)
        _check_against_ort(model, x)  # the handler is reached (no "not supported") and computes the op


def test_onnx_unsupported_op_error_lists_the_table():
    from dropcli.backends.torch.importer import ONNX_OPS

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    for node in (helper.make_node("Hardmax", ["x"], ["y"], name="hardmax"),
                 helper.make_node("Relu", ["x"], ["y"], name="custom", domain="com.acme")):
        model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
        with pytest.raises(DropcliError) as info:
            from_onnx(model)
        assert info.value.message == f"ONNX op {node.op_type} is not supported by dropcli's ONNX importer"
        assert info.value.hint == f"supported ops: {', '.join(ONNX_OPS)}; or pass the torch model instead"
        assert "\n" not in info.value.one_line()


def test_onnx_exported_in_training_mode_imports_and_finetunes(tmp_path):
    """Dropout nodes with training_mode=True (an export in training mode): the import is compared
    with the model in inference mode, not with a sampled run, and finetune/prune go on."""
    from dropcli.training.loop import check_import, reference_output
    from tests.helpers import cli

    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f(6, 16), "w1"), numpy_helper.from_array(f(16), "b1"),
             numpy_helper.from_array(f(16, 3), "w2"), numpy_helper.from_array(np.float32(0.3), "ratio"),
             numpy_helper.from_array(np.array(True), "training")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="/fc1/MatMul"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="/fc1/Add"),
             helper.make_node("Relu", ["h1"], ["h2"], name="/act/Relu"),
             helper.make_node("Dropout", ["h2", "ratio", "training"], ["h3"], name="/drop/Dropout"),
             helper.make_node("MatMul", ["h3", "w2"], ["y"], name="/fc2/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "train_mode.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    x = torch.from_numpy(f(40, 6))
    a, b = reference_output(loaded, x), reference_output(loaded, x)
    np.testing.assert_array_equal(a, b)  # deterministic: the Dropout runs in inference mode
    h = np.maximum(x.numpy() @ inits_value(inits, "w1") + inits_value(inits, "b1"), 0)
    np.testing.assert_allclose(a[0], h @ inits_value(inits, "w2"), rtol=1e-5, atol=1e-5)  # the one output
    check_import(loaded, from_onnx(loaded.model, keep_dropout=True), x)
    check_import(loaded, from_onnx(loaded.model), x)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=np.arange(40) % 3)
    cli("finetune", path, "--data", data, "--variant", "concrete", "--epochs", "1", "--samples", "4", "-q", "-o", tmp_path / "ft.onnx")


def inits_value(inits, name):
    return next(numpy_helper.to_array(t) for t in inits if t.name == name)


class _TiedLM(nn.Module):
    """A language-model head that shares the embedding's weight (GPT-2's lm_head), beside a
    module that already holds the name the new Linear would take."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.body(self.wte(ids))))


def test_tied_weights_become_modules(tmp_path):
    torch.manual_seed(0)
    model = _TiedLM().eval()
    path = save_as(model, torch.randint(0, 11, (2, 4)), tmp_path / "tied.pt2", "export")
    gm = to_modules(load_model(path))
    ids = torch.randint(0, 11, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids), atol=1e-6, rtol=0)
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, nn.Linear) for m in mods) == 2


def test_torchscript_batchnorm1d_keeps_its_rank(tmp_path):
    """A TorchScript graph read directly records no shapes; a functional batch norm on a 3-d map
    must still become BatchNorm1d (it became BatchNorm2d: 'expected 4D input (got 3D input)')."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv1d(1, 4, 5), nn.BatchNorm1d(4), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
                                       nn.Flatten(), nn.Linear(4, 3))).eval()
    path = save_as(model, torch.randn(2, 1, 32), tmp_path / "a.pt", "torchscript")
    gm = to_modules(load_model(path, input_shape="2x1x32"))
    x = torch.randn(3, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)
    assert any(isinstance(m, nn.BatchNorm1d) for m in gm.modules())
