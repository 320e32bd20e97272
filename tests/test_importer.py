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
    "LSTMNet": (lambda: LSTMNet(), (5, 8)),  # the LSTM stays as it is; its Linear layers become modules
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

    if name == "LSTMNet" and fmt == "onnx":
        # ONNX LSTM is not among the importer's ops: a one-line error that names it
        with pytest.raises(DropcliError, match="LSTM"):
            to_modules(load_model(path))
        return
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
    model = LSTMNet().eval()
    path = save_as(model, torch.randn(2, 5, 8), tmp_path / "lstm.onnx", "onnx")
    with pytest.raises(DropcliError, match=r"ONNX ops .*LSTM.* not supported"):
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
    nodes = []
    if op == "Constant":  # a Constant feeding an Add
        nodes.append(helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(f(4), "k"), name="/k/Constant"))
        nodes.append(helper.make_node("Add", ["x", "k"], ["y"], name="/add/Add"))
    else:
        nodes.append(helper.make_node(op, ins, ["y"], name=f"/layer/{op}", **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, (x4 if shape_in == [2, 3, 4, 4] else f(*shape_in))


def test_every_onnx_op_in_the_table_has_a_handler_that_matches_onnxruntime():
    from dropcli.backends.torch.importer import ONNX_HANDLERS, ONNX_OPS

    assert ONNX_OPS == tuple(ONNX_HANDLERS) and len(set(ONNX_OPS)) == len(ONNX_OPS)
    for op in ONNX_OPS:
        assert callable(ONNX_HANDLERS[op]), op
        model, x = _one_op_model(op)
        _check_against_ort(model, x)  # the handler is reached (no "not supported") and computes the op


def test_onnx_unsupported_op_error_lists_the_table():
    from dropcli.backends.torch.importer import ONNX_OPS

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    for node in (helper.make_node("Abs", ["x"], ["y"], name="abs"),
                 helper.make_node("Relu", ["x"], ["y"], name="custom", domain="com.acme")):
        model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
        with pytest.raises(DropcliError) as info:
            from_onnx(model)
        assert info.value.message == f"ONNX op {node.op_type} is not supported by dropcli's ONNX importer"
        assert info.value.hint == f"supported ops: {', '.join(ONNX_OPS)}; or pass the torch model instead"
        assert "\n" not in info.value.one_line()
