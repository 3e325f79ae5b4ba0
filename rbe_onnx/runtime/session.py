"""ONNX Runtime sessions that can run RBE models."""
from __future__ import annotations

import os
from pathlib import Path


def make_session(model: str | os.PathLike, *, threads: int | None = None):
    """CPU InferenceSession with the RBE op library registered; `model` is a .onnx file or its folder."""
    import onnxruntime as ort

    from ..library import get_library_path

    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
