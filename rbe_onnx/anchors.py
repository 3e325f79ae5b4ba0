"""The comparison anchor the benchmarks measure against: ORT's own MatMulNBits 4-bit RTN model."""
from __future__ import annotations

from pathlib import Path


def matmulnbits_model(src: Path, out: Path, block_size: int = 32) -> float:
    """Writes `out` (once: an existing file is reused) as ORT's MatMulNBits int4 RTN quantization of `src`,
    accuracy_level 4, with Gemm converted to MatMul+Add first so it covers every layer; returns its bits per
    weight over the quantized weights (codes + fp32 scale + 4-bit zero point per block)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .compressor import copy_sidecar_files
    from .onnx_io import save_model
    from .passes.gemm_to_matmul import gemm_to_matmul

    if not out.exists():
        m = onnx.load(str(src))
        gemm_to_matmul(m)
        q = MatMulNBitsQuantizer(m, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=4)
        q.process()
        save_model(q.model.model, out)
        copy_sidecar_files(src.parent, out.parent)
    return 4 + (32 + 4) / block_size
