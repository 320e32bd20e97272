"""Model backends: torch (fx graphs) and ONNX (node graphs), behind one small interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dropcli.model import formats


def load_model(path: str | Path, **opts: Any):
    """Load any supported model file; the format is detected from the content. ``-``: stdin."""
    if str(path) == "-":
        from dropcli.io.files import stdin_to_file

        path = stdin_to_file("model")
    fmt = formats.detect(path)
    if fmt == formats.ONNX:
        from dropcli.backends.onnx.model import OnnxModel

        return OnnxModel.load(path)
    from dropcli.backends.torch.model import TorchModel

    return TorchModel.load(path, fmt, **opts)
