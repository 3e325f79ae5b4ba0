"""The numpy decoder: the executable form of docs/FORMAT.md."""
from __future__ import annotations

import numpy as np

from .codebook import levels
from .outliers import positions
from .packing import unpack_codes
from .rice import RiceTable, rice_decode
from .seed import THETA_STEPS, UNIFORM_BITS, UNIFORM_THETA, scales_from_rho
from .weight import RBEWeight


def level_tables(bits: int) -> np.ndarray:
    """int16 [16, 2^bits]: row t is L_theta for theta index t (5-, 6- and 8-bit codes have one table, §5)."""
    return np.stack([levels(bits, UNIFORM_THETA if bits in UNIFORM_BITS else t) for t in range(THETA_STEPS)])


def decode(w: RBEWeight | RiceTable) -> np.ndarray:
    """The float32 K x N matrix the weight stands for, Y = A · decode(w) (§5: w = d · (L[c] + o), or an
    outlier's value, §5.2; + α · c_k with a center, §5.1; times Q with an input rotation, §5.3; a Rice-coded
    table's entries, §5.4)."""
    if isinstance(w, RiceTable):
        return rice_decode(w)
    f = {k: v.reshape(-1) for k, v in w.validate().items()}
    d = scales_from_rho(f["rho"], w.scale0)
    codes = unpack_codes(w.codes.reshape(-1, w.block_bytes), w.bits).astype(np.intp)  # [N·nb, bs]
    L = level_tables(w.bits)[f["theta"]]
    vals = np.take_along_axis(L, codes, axis=1).astype(np.float32) + f["offset"][:, None].astype(np.float32)
    cols = d[:, None] * vals
    if w.outliers is not None:  # §5.2: an outlier's value replaces d·(L[c] + o)
        blocks, rows, values = positions(f["outliers"], w.outliers, w.K, w.block_size)
        cols[blocks, rows] = values
    if w.center is not None:
        c = np.zeros(w.blocks_per_column * w.block_size, np.float32)
        c[: w.K] = w.center
        cols = cols + f["alpha"][:, None] * np.tile(c.reshape(-1, w.block_size), (w.N, 1))
    cols = cols.reshape(w.N, -1)[:, : w.K]
    stored = np.ascontiguousarray(cols.T)
    return stored if not w.rotation else np.ascontiguousarray(w.input_rotation.unrotate(stored), np.float32)
