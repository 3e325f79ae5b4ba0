"""ONNX Runtime sessions that can run RBE models."""
from __future__ import annotations

import os
from pathlib import Path


def make_session(model: str | os.PathLike, *, threads: int | None = None):
    """CPU InferenceSession with the RBE op library registered; `model` is a .onnx file or its folder."""
    import onnxruntime as ort

    from ..api import session_options

    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    return ort.InferenceSession(str(path), sess_options=session_options(threads or None),
                                providers=["CPUExecutionProvider"])
