"""Locates the compiled ONNX Runtime custom-op library that ships inside the package."""
from __future__ import annotations

import sys
from pathlib import Path

_NAMES = {"linux": "librbe_ops.so", "darwin": "librbe_ops.dylib", "win32": "rbe_ops.dll"}


def get_library_path() -> str:
    """Path of the op library, for `SessionOptions.register_custom_ops_library` (as onnxruntime-extensions)."""
    name = _NAMES.get(sys.platform, "librbe_ops.so")
    path = Path(__file__).resolve().parent / name
    if not path.is_file():
        raise FileNotFoundError(
            f"RBE op library {name} not found next to {Path(__file__).parent}: the package was not built; "
            "install it with `pip install .` from the repository root")
    return str(path)
