"""Small typed helpers for building ONNX subgraphs from stock ops.

Every variant's ONNX builder receives an :class:`OnnxBuilder` and a :class:`TensorInfo`
and returns ``(stochastic_output, inference_output)`` value names. The backend selects
between them with ``Where(dropcli_mc, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain (ai.onnx) opset version; 0 when it imports none."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


@dataclass
class TensorInfo:
    rank: int | None
    shape: list[int | None] | None  # None entries are dynamic
    elem_type: int = TensorProto.FLOAT

    @property
    def np_dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.elem_type)

    def static_dims(self, dims: Sequence[int], what: str) -> list[int]:
        from dropcli.errors import UsageError

        if self.shape is None or any(self.shape[d] is None for d in dims):
            raise UsageError(f"{what} needs static sizes for dimensions {list(dims)} in ONNX, but they are unknown or dynamic",
                             "export the model with fixed spatial sizes")
        return [int(self.shape[d]) for d in dims]


class OnnxBuilder:
    def __init__(self, opset: int, prefix: str, taken: set[str]):
        self.opset = opset
        self.prefix = prefix
        self.taken = taken
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._k = 0

    def fresh(self, hint: str) -> str:
        while True:
            name = f"{self.prefix}/{hint}_{self._k}"
            self._k += 1
            if name not in self.taken:
                self.taken.add(name)
                return name

    def op(self, op_type: str, *inputs: str, n_out: int = 1, outputs: Sequence[str] | None = None, **attrs: Any):
        outs = list(outputs) if outputs else [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def const(self, value: Any, dtype: Any) -> str:
        arr = np.asarray(value, dtype=dtype)
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def f(self, value: float, info: TensorInfo) -> str:
        """A scalar constant of the site's float type."""
        return self.const(value, info.np_dtype)

    def i64(self, values: Sequence[int] | int) -> str:
        return self.const(values, np.int64)

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        """Reduce* with the axes as an input from opset 18 (ReduceSum from 13), else as attribute."""
        axes_as_input = self.opset >= 18 or (op == "ReduceSum" and self.opset >= 13)
        if axes_as_input:
            return self.op(op, x, self.i64(list(axes)), keepdims=keepdims)
        return self.op(op, x, axes=list(axes), keepdims=keepdims)

    # -- common pieces ---------------------------------------------------------------
    def bernoulli_keep(self, like: str, q: float, info: TensorInfo) -> str:
        """A float mask, 1 with probability q (uniform < q), shaped like ``like``."""
        u = self.op("RandomUniformLike", like, dtype=info.elem_type)
        keep = self.op("Less", u, self.f(q, info))
        return self.op("Cast", keep, to=info.elem_type)

    def per_sample_shape(self, x: str, keep_dims: int, rank: int) -> str:
        """A tensor of shape x.shape[:keep_dims] + [1]*(rank-keep_dims), filled with zeros."""
        shp = self.op("Shape", x)
        head = self.op("Slice", shp, self.i64([0]), self.i64([keep_dims]))
        if rank > keep_dims:
            shp2 = self.op("Concat", head, self.i64([1] * (rank - keep_dims)), axis=0)
        else:
            shp2 = head
        return shp2

    def zeros_of_shape(self, shape: str, info: TensorInfo) -> str:
        value = helper.make_tensor("value", info.elem_type, [1], [0])
        return self.op("ConstantOfShape", shape, value=value)
