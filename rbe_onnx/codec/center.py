"""The center vector of FORMAT.md §5.1: a common direction `c` (K values) that every block may carry a multiple of.

Embedding tables are dominated by one direction shared by all entries (in the reference GPT-2's token embedding,
the mean entry has RMS 0.113 against 0.052 for the rest), and frequent and rare tokens carry very different
amounts of it. Coding `w − α·c`, with `α` fitted per block and stored in the seed, spends the levels on what
tells entries apart.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .seed import alpha_bits
from .weight import RBEWeight

# Use a center only when it removes at least this fraction of the weight's energy: below that, the 32 bits per
# column-independent entry and the extra term per block buy too little (trained projection matrices remove ~1 %,
# embedding tables ~80 %).
MIN_ENERGY_REMOVED = 0.2


def _padded_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """[..., K] -> [..., nb, block_size], zero-padded."""
    K = x.shape[-1]
    nb = -(-K // block_size)
    out = np.zeros(x.shape[:-1] + (nb * block_size,), dtype=np.float64)
    out[..., :K] = x
    return out.reshape(x.shape[:-1] + (nb, block_size))


def fit_center(W: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(center [K] float32, alpha [N, nb] float32 exactly representable in binary16, fraction of W's energy
    the term removes) for a K x N weight.

    c is W's leading left singular vector (the rank-1 direction closest to every column), scaled to the mean
    column's length so that alpha stays near 1 where the direction is fully present; alpha is the per-block
    least-squares coefficient, rounded to binary16.
    """
    W = np.asarray(W, dtype=np.float64)
    K, N = W.shape
    mean = W.mean(axis=1)
    v = mean if np.any(mean) else W[:, 0]
    for _ in range(30):  # power iteration on W·Wᵀ, from the mean column
        v = W @ (W.T @ v)
        norm = np.linalg.norm(v)
        if norm == 0:
            return np.zeros(K, np.float32), np.zeros((N, -(-K // block_size)), np.float32), 0.0
        v /= norm
    if v @ mean < 0:
        v = -v
    center = (v * max(abs(v @ mean), 1e-30)).astype(np.float32)
    cb = _padded_blocks(center.astype(np.float64), block_size)                  # [nb, bs]
    wb = _padded_blocks(W.T, block_size)                                         # [N, nb, bs]
    denom = np.maximum((cb * cb).sum(-1), 1e-300)
    alpha = ((wb * cb).sum(-1) / denom).astype(np.float16)
    alpha[~np.isfinite(alpha)] = 0
    alpha = alpha.astype(np.float32)
    residual = wb - alpha[..., None] * cb
    total = float((W * W).sum())
    removed = 1.0 - float((residual * residual).sum()) / total if total > 0 else 0.0
    return center, alpha, removed


def center_term(center: np.ndarray, alpha: np.ndarray, K: int, block_size: int) -> np.ndarray:
    """The K x N matrix α·c_k that the decoder adds (float32, as §5.1 computes it)."""
    cb = _padded_blocks(center.astype(np.float32)[None], block_size)[0].astype(np.float32)  # [nb, bs]
    term = alpha.astype(np.float32)[..., None] * cb                                         # [N, nb, bs]
    return np.ascontiguousarray(term.reshape(alpha.shape[0], -1)[:, :K].T)


def with_center(w: RBEWeight, center: np.ndarray, alpha: np.ndarray) -> RBEWeight:
    """`w` (the residual's encoding) with the center attached and alpha written into its seeds."""
    u = w.seeds.view(np.uint64) | (alpha_bits(alpha) << np.uint64(40))
    return dataclasses.replace(w, seeds=u.view(np.int64), center=center.astype(np.float32))
