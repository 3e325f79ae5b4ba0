"""Integer level tables L_theta of docs/FORMAT.md §5."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .seed import THETA_STEPS, UNIFORM_BITS, UNIFORM_THETA


def gamma(theta_index: int) -> float:
    """Power-law exponent of the codebook shaped by the angle θ = theta_index·π/32."""
    theta = theta_index * np.pi / 32.0
    return float(np.exp(0.6 * (theta - np.pi / 8.0)))


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


@lru_cache(maxsize=None)
def levels(bits: int, theta_index: int) -> np.ndarray:
    """int16 levels L[c] for every code c (read-only)."""
    if bits in UNIFORM_BITS:
        if theta_index != UNIFORM_THETA:
            raise ValueError(f"{bits}-bit codes use the one uniform codebook (theta index {UNIFORM_THETA})")
        # L + 128 is the code shifted to 8 bits (and centred in its step): c − 128 at 8 bits, 8c − 124 at 5,
        # 4c − 126 at 6, so a kernel reads 5- and 6-bit codes as 8-bit ones once unpacked.
        table = ((np.arange(1 << bits, dtype=np.int16) << (8 - bits)) + ((1 << (7 - bits)) if bits < 8 else 0)
                 - 128).astype(np.int16)
    else:
        n = 1 << bits
        u = (2.0 * np.arange(n) + 1.0 - n) / (n - 1.0)
        table = _round_half_away(127.0 * np.sign(u) * np.abs(u) ** gamma(theta_index)).astype(np.int16)
    table.setflags(write=False)
    return table


def theta_candidates(bits: int) -> range:
    """Theta indices an encoder may choose for this code width."""
    return range(UNIFORM_THETA, UNIFORM_THETA + 1) if bits in UNIFORM_BITS else range(THETA_STEPS)
