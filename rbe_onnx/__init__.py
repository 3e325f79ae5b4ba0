"""rbe-onnx: compress GPT-2/BERT ONNX graphs into RBEFusedGemm custom ops and run them in ONNX Runtime."""
from __future__ import annotations

__version__ = "0.1.0"

from .library import get_library_path  # noqa: E402

__all__ = ["get_library_path", "__version__"]
