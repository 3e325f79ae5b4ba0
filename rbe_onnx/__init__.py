"""rbe-onnx: compress GPT-2/BERT ONNX graphs into RBEFusedGemm custom ops and run them in ONNX Runtime."""
from __future__ import annotations

from .library import get_library_path

__version__ = "0.1.0"

# Heavier entry points load on first use, so `get_library_path()` costs no onnx/numpy import.
_LAZY = {"rewrite": "compressor", "read_report": "compressor", "session_options": "api",
         "Generator": "runtime.generator"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rbe_onnx' has no attribute {name!r}")


__all__ = ["get_library_path", "rewrite", "read_report", "session_options", "Generator", "__version__"]
