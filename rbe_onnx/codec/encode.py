"""Round-to-nearest RBE encoder: per block, search the codebook shape θ and a range shrink for least error.

The search is vectorised over all blocks; each candidate (θ, shrink) costs one pass over the weight.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .codebook import levels, theta_candidates
from .packing import GROUP, pack_codes
from .seed import RHO_PER_LOG_SCALE, UNIFORM_THETA, check_layout, pack_seeds
from .weight import RBEWeight

# Fractions of the block's half range the outermost level is put at; < 1 clips the extremes, which pays
# at low widths where the grid is coarse.
SHRINKS = {2: (1.0, 0.9, 0.8, 0.7, 0.6), 3: (1.0, 0.9, 0.8, 0.7), 4: (1.0, 0.92, 0.85), 5: (1.0, 0.95, 0.9),
           6: (1.0, 0.95), 8: (1.0,)}
REFITS = 2
MAX_WORKERS = 4
PARALLEL_SIZE = 1 << 18  # weights below this encode on one thread (thread start-up would dominate)
MIN_COLUMNS_PER_WORKER = 64


def _blocks(W: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Column blocks [N·nb, block_size] (tail zero-padded) and the valid-position mask [block_size·nb]."""
    K, N = W.shape
    nb = -(-K // block_size)
    cols = np.zeros((N, nb * block_size), dtype=np.float32)
    cols[:, :K] = W.T
    valid = np.zeros(nb * block_size, dtype=bool)
    valid[:K] = True
    return cols.reshape(N * nb, block_size), np.tile(valid.reshape(nb, block_size), (N, 1))


def _quantise_scale(d: np.ndarray, scale0: float) -> tuple[np.ndarray, np.ndarray]:
    rho = np.clip(np.rint(RHO_PER_LOG_SCALE * np.log(np.maximum(d, 1e-38) / scale0)), 0, 0xFFFF)
    return rho.astype(np.int64), (scale0 * np.exp(rho / RHO_PER_LOG_SCALE)).astype(np.float32)


def _nearest(t: np.ndarray, table: np.ndarray) -> np.ndarray:
    order = np.argsort(table, kind="stable")
    sorted_levels = table[order].astype(np.float32)
    mids = (sorted_levels[1:] + sorted_levels[:-1]) * 0.5
    return order[np.searchsorted(mids, t)].astype(np.uint8)


def _refit(X, valid, bits, scale0, best, best_codes, best_err) -> None:
    """Least-squares scale and offset for the chosen codes, then re-rounding; kept where it lowers the error.

    The search above fixes d and o from the block's range; given the codes, the best (d, d·o) is a linear fit
    of the weights on their levels.
    """
    for theta in np.unique(best["theta"]):
        rows = np.nonzero(best["theta"] == theta)[0]
        table = levels(bits, int(theta))
        x, m = X[rows], valid[rows]
        L = np.where(m, table[best_codes[rows]], 0).astype(np.float64)
        n = m.sum(axis=1)
        mean_l, mean_x = L.sum(1) / n, np.where(m, x, 0).sum(1) / n
        var = np.where(m, (L - mean_l[:, None]) ** 2, 0).sum(1)
        cov = np.where(m, (L - mean_l[:, None]) * (x - mean_x[:, None]), 0).sum(1)
        d_fit = np.where(var > 0, cov / np.maximum(var, 1e-30), 0.0)
        ok = d_fit > 0
        rho, d = _quantise_scale(np.where(ok, d_fit, 1.0).astype(np.float32), scale0)
        offset = np.clip(np.rint((mean_x - d_fit * mean_l) / d), -128, 127)
        t = x / d[:, None] - offset[:, None]
        codes = _nearest(t, table)
        err = np.where(m, (t - table[codes]) * d[:, None], 0.0)
        err = np.einsum("ij,ij->i", err, err, dtype=np.float64)
        better = ok & (err < best_err[rows])
        idx = rows[better]
        best_err[idx] = err[better]
        best_codes[idx] = codes[better]
        best["rho"][idx], best["offset"][idx] = rho[better], offset[better]


def _span(bits: int) -> float:
    """The distance from a table's centre to its outermost level (every theta's table spans the same): 127 at
    2-4 bits, 124 and 126 for the uniform 5- and 6-bit tables, 127.5 at 8 bits (-128..127 about -0.5)."""
    table = levels(bits, UNIFORM_THETA)
    return (float(table.max()) - float(table.min())) / 2


def _scale0_for(half: np.ndarray, bits: int) -> float:
    """s0 just under the smallest scale the search can ask for, so rho never clips at 0."""
    positive = half[half > 0]
    span = _span(bits)
    return float(positive.min() * min(SHRINKS[bits]) / span * 0.5) if positive.size else 1.0


def default_scale0(W: np.ndarray, bits: int, block_size: int) -> float:
    X, valid = _blocks(np.asarray(W, dtype=np.float32), block_size)
    big = np.finfo(np.float32).max
    half = (np.where(valid, X, -big).max(axis=1) - np.where(valid, X, big).min(axis=1)) * 0.5
    return _scale0_for(half, bits)


def encode(W: np.ndarray, bits: int = 4, block_size: int = 64, scale0: float | None = None) -> RBEWeight:
    """Encodes a K x N float matrix (Y = A·W) into seeds and packed codes (scale0: the node's s0, chosen
    from W unless given)."""
    W = np.asarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {list(W.shape)}")
    if not np.all(np.isfinite(W)):
        raise ValueError("weight holds NaN or Inf; it cannot be encoded")
    K, N = W.shape
    check_layout(K, N, bits, block_size, 1.0)
    if scale0 is None:
        scale0 = default_scale0(W, bits, block_size)
    # Columns are independent and the codes are stored column by column, so column slices encode apart and
    # concatenate; numpy releases the GIL in the search's array passes, so threads share the cores.
    workers = min(os.cpu_count() or 1, MAX_WORKERS, N // MIN_COLUMNS_PER_WORKER) if W.size >= PARALLEL_SIZE else 1
    if workers > 1:
        parts = np.array_split(np.arange(N), workers)
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(lambda cols: _encode_columns(W[:, cols], bits, block_size, scale0), parts))
        return RBEWeight(K=K, N=N, bits=bits, block_size=block_size, scale0=scale0,
                         seeds=np.concatenate([w.seeds for w in done]),
                         codes=np.concatenate([w.codes for w in done]))
    return _encode_columns(W, bits, block_size, scale0)


def _encode_columns(W: np.ndarray, bits: int, block_size: int, scale0: float) -> RBEWeight:
    K, N = W.shape
    X, valid = _blocks(W, block_size)
    big = np.finfo(np.float32).max
    lo = np.where(valid, X, big).min(axis=1)
    hi = np.where(valid, X, -big).max(axis=1)
    center, half = (hi + lo) * 0.5, (hi - lo) * 0.5
    span = _span(bits)

    best_err = np.full(X.shape[0], np.inf, dtype=np.float64)
    best = {k: np.zeros(X.shape[0], np.int64) for k in ("rho", "theta", "offset")}
    best_codes = np.zeros(X.shape, dtype=np.uint8)
    for shrink in SHRINKS[bits]:
        rho, d = _quantise_scale(np.maximum(half * shrink / span, 1e-30), scale0)
        offset = np.clip(np.rint(center / d), -128, 127)
        if bits == 8:
            offset = np.clip(np.rint(center / d - 0.5), -128, 127)  # L spans -128..127: centre is -0.5
        t = X / d[:, None] - offset[:, None]
        for theta in theta_candidates(bits):
            table = levels(bits, theta)
            codes = _nearest(t, table)
            err = np.where(valid, (t - table[codes]) * d[:, None], 0.0)
            err = np.einsum("ij,ij->i", err, err, dtype=np.float64)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_codes[better] = codes[better]
            best["rho"][better], best["theta"][better] = rho[better], theta
            best["offset"][better] = offset[better]
    for _ in range(REFITS):
        _refit(X, valid, bits, scale0, best, best_codes, best_err)
    best_codes[~valid] = 0  # §4: tail codes are written as 0
    nb = -(-K // block_size)
    seeds = pack_seeds(best["rho"], best["theta"], best["offset"], bits).reshape(N, nb)
    packed = pack_codes(best_codes, bits).reshape(-1)
    assert packed.size % (GROUP * bits // 8) == 0
    return RBEWeight(K=K, N=N, bits=bits, block_size=block_size, scale0=scale0, seeds=seeds, codes=packed)
