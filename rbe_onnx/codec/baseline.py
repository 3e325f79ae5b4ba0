"""The anchor the codec must beat: ORT MatMulNBits-style blockwise uniform RTN (asymmetric, fp32 scale,
`bits`-bit zero point, blocks of K-values of one column), as MLAS quantizes for MatMulNBits."""
from __future__ import annotations

import numpy as np


def matmulnbits_rtn(W: np.ndarray, bits: int = 4, block_size: int = 32) -> tuple[np.ndarray, float]:
    """Returns (dequantised K x N weight, bits/weight with scales and zero points counted)."""
    W = np.asarray(W, dtype=np.float32)
    K, N = W.shape
    nb = -(-K // block_size)
    cols = np.zeros((N, nb * block_size), dtype=np.float32)
    cols[:, :K] = W.T
    X = cols.reshape(N * nb, block_size)
    qmax = (1 << bits) - 1
    vmin = np.minimum(X.min(axis=1), 0.0)  # MLAS keeps 0 inside the range so it is exact
    vmax = np.maximum(X.max(axis=1), 0.0)
    scale = (vmax - vmin) / qmax
    safe = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.rint(-vmin / safe), 0, qmax)
    q = np.clip(np.rint(X / safe[:, None]) + zp[:, None], 0, qmax)
    deq = ((q - zp[:, None]) * scale[:, None]).reshape(N, -1)[:, :K].T
    bpw = bits + (32 + bits) / block_size
    return np.ascontiguousarray(deq, dtype=np.float32), bpw
