"""Model backends: torch (fx graphs) and ONNX (node graphs), behind one small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import formats


def load_model(path: str | Path, **opts: Any):
    """Load any supported model file; the format is detected from the content. ``-``: stdin."""
    if str(path) == "-":
        from ..fsutil import stdin_to_file

        path = stdin_to_file("model")
    fmt = formats.detect(path)
    if fmt == formats.ONNX:
        from .onnx_backend import OnnxModel

        return OnnxModel.load(path)
    from .torch_backend import TorchModel

    return TorchModel.load(path, fmt, **opts)
