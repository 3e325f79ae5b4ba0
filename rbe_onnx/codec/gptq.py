"""Error-feedback (GPTQ/OBQ-style) encoding: rounding guided by the layer's input statistics.

Rounding each weight to its nearest level ignores that the error of one input row k can be cancelled by
nudging the rows not yet rounded, in proportion to how the inputs correlate (H = Σ xᵀx over calibration
activations). Rows are processed in the format's blocks: a block's seed (scale, θ, offset per column) is
fitted to the error-updated weights when the block starts, then its rows are rounded one by one and each
row's error is pushed onto the remaining rows through the inverse Hessian's Cholesky factor.
"""
from __future__ import annotations

import numpy as np

from . import outliers
from .decode import level_tables
from .encode import default_scale0, encode
from .packing import pack_codes
from .seed import UNIFORM_BITS, pack_seeds, scales_from_rho, unpack_seeds
from .weight import RBEWeight


def _inverse_cholesky(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of H⁻¹ (after dampening), as GPTQ uses it."""
    from scipy.linalg.lapack import dtrtri

    H = H.astype(np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0  # inputs that never fire: their rows cannot matter, keep H invertible
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    # With P the order-reversing permutation and P·H·P = L·Lᵀ, U = P·L⁻¹·P is upper triangular and
    # UᵀU = P·L⁻ᵀ·L⁻¹·P = H⁻¹: one Cholesky and one triangular inverse, where forming H⁻¹ and factoring it took
    # 8-20x as long (3072 x 3072: 4-12 s against 0.55 s).
    L = np.linalg.cholesky(H[::-1, ::-1])
    L_inv, info = dtrtri(np.asfortranarray(L), lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK info {info})")
    return np.ascontiguousarray(L_inv[::-1, ::-1])


def encode_gptq(W: np.ndarray, H: np.ndarray, bits: int = 4, block_size: int = 64,
                damp: float = 0.01, outlier_fraction: float = 0.0, U: np.ndarray | None = None) -> RBEWeight:
    """Encodes a K x N weight like `encode`, with rounding that minimises ‖X·(W − Ŵ)‖² for inputs X with
    XᵀX = H (K x K).

    outlier_fraction: keep about this fraction of the weights exactly (binary16, FORMAT.md §5.2), chosen per
    block row range as the farthest from their column block's bulk. They are left out of the block's range
    when its seed is fitted, and error feedback sees only their binary16 rounding.
    U: _inverse_cholesky(H, damp), when the caller encodes with the same H several times."""
    W = np.array(W, dtype=np.float64)
    K, N = W.shape
    if H.shape != (K, K):
        raise ValueError(f"Hessian must be {K} x {K}, got {list(H.shape)}")
    U = _inverse_cholesky(H, damp) if U is None else U
    nb = -(-K // block_size)
    tables = level_tables(bits).astype(np.float64)
    uniform = bits in UNIFORM_BITS  # one evenly spaced table: rounded directly, no table search
    first, step = tables[0, 0], tables[0, 1] - tables[0, 0]
    seeds = np.zeros((N, nb), dtype=np.int64)
    codes = np.zeros((N, nb * block_size), dtype=np.uint8)
    # One s0 for the node, with headroom: error feedback can shrink a later block's range below what the
    # original weights had.
    scale0 = 0.25 * default_scale0(W.astype(np.float32), bits, block_size)
    kept = []  # (block indices, rows in block, values) of the outliers, per row block
    for b in range(nb):
        k0, k1 = b * block_size, min(K, (b + 1) * block_size)
        # Seeds for this block from the weights as the earlier blocks' error feedback left them; outliers
        # stand in as their column's median so that they do not stretch the range.
        med = np.median(W[k0:k1], axis=0, keepdims=True) if outlier_fraction > 0 else None
        exact = outliers.select(W[k0:k1], outlier_fraction, median=med)
        fit = np.where(exact, med, W[k0:k1]) if exact.any() else W[k0:k1]
        block = encode(fit.astype(np.float32), bits=bits, block_size=block_size, scale0=scale0)
        f = unpack_seeds(block.seeds[:, 0])
        rho = f["rho"]
        d = scales_from_rho(rho, scale0).astype(np.float64)
        o = f["offset"].astype(np.float64)
        table = None if uniform else tables[f["theta"]]
        seeds[:, b] = pack_seeds(rho, f["theta"], f["offset"], bits)
        err_block = np.zeros((k1 - k0, N))
        exact_values = np.zeros((k1 - k0, N))
        for i, k in enumerate(range(k0, k1)):
            t = W[k] / d - o                                      # target in level units, per column
            if uniform:
                c = np.clip(np.rint((t - first) / step), 0, (1 << bits) - 1).astype(np.int64)
                q = d * (first + step * c + o)
            else:                                                  # nearest level of each column's table
                c = np.abs(table - t[:, None]).argmin(axis=1)
                q = d * (table[np.arange(N), c] + o)
            if exact[i].any():
                q = np.where(exact[i], W[k].astype(np.float16).astype(np.float64), q)
                exact_values[i] = q
            codes[:, k] = c
            err = (W[k] - q) / U[k, k]
            W[k + 1:k1] -= np.outer(U[k, k + 1:k1], err)
            err_block[i] = err
        W[k1:] -= U[k0:k1, k1:].T @ err_block
        if exact.any():
            rows, cols = np.nonzero(exact)
            kept.append((cols * nb + b, rows, exact_values[rows, cols]))
    packed = pack_codes(codes.reshape(N * nb, block_size), bits).reshape(-1)
    w = RBEWeight(K=K, N=N, bits=bits, block_size=block_size, scale0=float(scale0), seeds=seeds, codes=packed)
    return outliers.attach(w, *(np.concatenate(x) for x in zip(*kept))) if kept else w
