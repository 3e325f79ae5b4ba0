"""Input rotation (FORMAT.md §5.3): the op multiplies its activations by an orthogonal matrix Q = D·B before the
product, so the stored weight is Qᵀ·W and the model computes the same Y = (A·Q)·(Qᵀ·W).

D is a diagonal of ±1 drawn from a 64-bit seed (splitmix64), B is block-diagonal with R x R normalized
Walsh-Hadamard blocks. Q spreads a weight's heavy rows (and an activation's outlier channels) over R rows, so a
block's range is set by many values instead of one: on all-MiniLM-L6-v2, 3-bit/128 error-feedback codes went
from a mean pooled cosine of 0.935 to 0.963 (300 WikiText-2 valid paragraphs).

`Rotation.activations` is the executable spec: the same float32 butterflies, in the same order, as the C++
kernels, so both compute bit-identical A·Q.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MAX_BLOCK = 4096
DEFAULT_MAX_BLOCK = 256  # larger blocks spread further but cost log2(R) passes over the activations per product
_MASK = (1 << 64) - 1


def splitmix64(seed: int, count: int) -> list[int]:
    """The first `count` outputs of splitmix64 started from `seed` (state += 0x9E3779B97F4A7C15 before each)."""
    state, out = seed & _MASK, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        out.append(z ^ (z >> 31))
    return out


def signs(seed: int, K: int) -> np.ndarray:
    """float32 [K] of ±1: entry k is −1 where bit k mod 64 of output k // 64 is set."""
    words = np.array(splitmix64(seed, -(-K // 64)), dtype=np.uint64)
    bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return np.where(bits.reshape(-1)[:K] == 1, -1.0, 1.0).astype(np.float32)


def is_valid_block(K: int, block: int) -> bool:
    return 2 <= block <= MAX_BLOCK and block & (block - 1) == 0 and K % block == 0


def block_for(K: int, max_block: int = DEFAULT_MAX_BLOCK) -> int:
    """The largest power of two ≤ max_block dividing K (0 when K is odd: no rotation)."""
    block = 1
    while block * 2 <= max_block and K % (block * 2) == 0:
        block *= 2
    return block if block >= 2 else 0


def seed_for(name: str) -> int:
    """A fixed seed per weight name, so a rewrite is reproducible."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def _hadamard_rows(x: np.ndarray, block: int) -> np.ndarray:
    """x [M, K] -> x with every block of `block` values replaced by its (unnormalized) Walsh-Hadamard transform,
    butterflies h = 1, 2, 4, ... as in the C++ kernels."""
    M, K = x.shape
    y = x.reshape(M, K // block, block).copy()
    h = 1
    while h < block:
        v = y.reshape(M, K // block, block // (2 * h), 2, h)
        a, b = v[:, :, :, 0, :].copy(), v[:, :, :, 1, :].copy()
        v[:, :, :, 0, :], v[:, :, :, 1, :] = a + b, a - b
        h *= 2
    return y.reshape(M, K)


def hadamard_matrix(block: int) -> np.ndarray:
    """B's block: the normalized R x R Walsh-Hadamard matrix (Sylvester order, symmetric, orthogonal), float64."""
    return _hadamard_rows(np.eye(block), block) / np.sqrt(block)


def _norm(block: int, dtype) -> np.floating:
    return dtype(1.0 / np.sqrt(block))


@dataclass(frozen=True)
class Rotation:
    """Q = D·B for a K-row weight: `block` (R) and `seed` are the node's `rotation` and `rotation_seed`."""

    block: int
    seed: int

    def check(self, K: int) -> None:
        if not is_valid_block(K, self.block):
            raise ValueError(f"rotation block {self.block} must be a power of two in [2, {MAX_BLOCK}] dividing "
                             f"K={K}")
        if not 0 <= self.seed <= _MASK:
            raise ValueError(f"rotation seed {self.seed} is not a 64-bit pattern")

    def activations(self, A: np.ndarray) -> np.ndarray:
        """A·Q for float32 activations [..., K], exactly as the kernels compute it (§5.3)."""
        A = np.asarray(A, dtype=np.float32)
        K = A.shape[-1]
        x = A.reshape(-1, K) * signs(self.seed, K)
        return (_hadamard_rows(x, self.block) * _norm(self.block, np.float32)).reshape(A.shape)

    def weight(self, W: np.ndarray) -> np.ndarray:
        """Qᵀ·W (float64): what the codes store for a K x N weight W."""
        W = np.asarray(W, dtype=np.float64)
        x = W * signs(self.seed, W.shape[0])[:, None]
        return _hadamard_rows(np.ascontiguousarray(x.T), self.block).T * _norm(self.block, np.float64)

    def unrotate(self, Wq: np.ndarray) -> np.ndarray:
        """Q·Wq: the weight a product with the stored Wq stands for (inverse of `weight`; B is symmetric)."""
        Wq = np.asarray(Wq)
        B = _hadamard_rows(np.ascontiguousarray(Wq.T), self.block).T * _norm(self.block, Wq.dtype.type)
        return (B * signs(self.seed, Wq.shape[0])[:, None]).astype(Wq.dtype, copy=False)

    def hessian(self, H: np.ndarray) -> np.ndarray:
        """Qᵀ·H·Q: the input statistics Σ (xQ)ᵀ(xQ) of the rotated activations."""
        return self.weight(self.weight(H).T)
