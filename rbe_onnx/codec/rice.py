"""Rice-coded embedding tables (docs/FORMAT.md §5.4): a uniform step per entry (this encoder gives every entry
the same one), each value's integer coded with a Rice code, for tables that are only gathered (never
multiplied), where a bit-serial decoder costs nothing that matters and the entropy code spends fewer bits than
fixed-width codes for the same error."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .seed import FormatError, TAG, UNIFORM_THETA, pack_seeds, scales_from_rho, unpack_seeds

MAX_K = 16384          # entries of at most 31 bits a value fit a uint16 length
ESCAPE = 15            # a unary run of 15 ones: the value follows in ESCAPE_BITS raw bits
ESCAPE_BITS = 16
MAX_RICE_K = 15        # the seed's 4-bit width field


# The steps a budget chooses from, as fractions of the table's RMS: a factor 2^(1/4) apart, so that each
# costs about a quarter of a bit per weight more (halving the step halves the error's RMS for about one bit)
# and a budget can be spent closely on a table that holds half of a model's weights (MiniLM's).
STEP_LADDER = tuple(float(2.4 * 2 ** (-i / 4)) for i in range(24))


def ladder_step(W: np.ndarray, level: int) -> float:
    """STEP_LADDER[level] times the RMS of W."""
    return STEP_LADDER[level] * float(np.sqrt(np.mean(np.square(W, dtype=np.float64))))


def encodable(W: np.ndarray, step: float) -> bool:
    """Whether rice_encode(W, step) can hold every value: |q| stays within what k = 15 reaches before an
    escape (z < 15·2^15), with room for the offset."""
    return W.shape[0] <= MAX_K and float(np.abs(W).max(initial=0.0)) / step < (ESCAPE << MAX_RICE_K) // 2 - 256


@dataclass(frozen=True)
class RiceTable:
    """A K x N weight W = Eᵀ (entry t of the table is column t) in §5.4's form."""

    K: int
    N: int
    scale0: float
    seeds: np.ndarray    # int64 [N, 1]: step (rho), offset, Rice parameter (width)
    codes: np.ndarray    # uint8: the entries' streams, back to back
    lengths: np.ndarray  # uint16 [N]: bytes of each entry's stream

    @property
    def nbytes(self) -> int:
        """Stored bytes: streams + seeds + lengths + the float scale0."""
        return int(self.codes.nbytes + self.seeds.nbytes + self.lengths.nbytes + 4)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.K * self.N)

    def validate(self) -> dict[str, np.ndarray]:
        """Raises FormatError naming the first rule of §5.4 / §6 this table breaks; returns the seed fields."""
        if not 1 <= self.K <= MAX_K:
            raise FormatError(f"K={self.K} out of range [1, {MAX_K}] for a Rice-coded table")
        if not 1 <= self.N <= 1 << 24:
            raise FormatError(f"N={self.N} out of range [1, 2^24]")
        if not (np.isfinite(self.scale0) and self.scale0 > 0):
            raise FormatError(f"scale0={self.scale0} must be positive and finite")
        if self.seeds.dtype != np.int64 or self.seeds.shape != (self.N, 1):
            raise FormatError(f"seeds must be int64 of shape [{self.N}, 1], got {self.seeds.dtype} "
                              f"{list(self.seeds.shape)}")
        if self.lengths.dtype != np.uint16 or self.lengths.shape != (self.N,):
            raise FormatError(f"lengths must be uint16 of shape [{self.N}], got {self.lengths.dtype} "
                              f"{list(self.lengths.shape)}")
        if self.codes.dtype != np.uint8 or self.codes.ndim != 1:
            raise FormatError(f"codes must be uint8 1-D, got {self.codes.dtype} {list(self.codes.shape)}")
        total = int(self.lengths.sum(dtype=np.int64))
        if total != self.codes.size:
            raise FormatError(f"lengths add up to {total} bytes but codes hold {self.codes.size}")
        f = unpack_seeds(self.seeds)
        for bad, what in ((f["tag"] != TAG, f"tag is not 0x{TAG:X}"),
                          (f["theta"] != UNIFORM_THETA, f"theta != {UNIFORM_THETA} in a Rice-coded table"),
                          (f["outliers"] != 0, "outlier count nonzero in a Rice-coded table"),
                          (f["alpha"].view(np.uint32) != 0, "alpha nonzero in a Rice-coded table")):
            if np.any(bad):
                raise FormatError(f"seed [{int(np.argwhere(bad)[0][0])}, 0]: {what}")
        return f


def _zigzag(q: np.ndarray) -> np.ndarray:
    return np.where(q >= 0, 2 * q, -2 * q - 1)


def code_bits(z: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """Bits each zigzagged value z takes with Rice parameter k (§5.4, escapes included)."""
    u = z >> k
    return np.where(u < ESCAPE, u + 1 + k, ESCAPE + ESCAPE_BITS)


def _best_k(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of z [K, N]: the Rice parameter with the fewest bits, and those bits."""
    big = z >= 1 << ESCAPE_BITS  # too large for an escape: such a value needs a k whose unary run stays < 15
    costs = np.stack([np.where(np.any(big & ((z >> k) >= ESCAPE), axis=0), np.iinfo(np.int64).max,
                               code_bits(z, k).sum(axis=0)) for k in range(MAX_RICE_K + 1)])
    k = costs.argmin(axis=0)
    if np.any(costs[k, np.arange(z.shape[1])] == np.iinfo(np.int64).max):
        raise ValueError("step too small for the table's range: a value needs more than 19 bits")
    return k, costs[k, np.arange(z.shape[1])]


def _quantise(W: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Integers q (offset removed) and the per-entry offsets o with W ≈ step·(q + o)."""
    n = np.rint(W.astype(np.float64) / step).astype(np.int64)
    o = np.clip(np.rint(np.median(n, axis=0)), -128, 127).astype(np.int64)
    return n - o[None, :], o


def rice_encode(W: np.ndarray, step: float) -> RiceTable:
    """W (K x N, entry t = column t) with one uniform step for every entry: rounding to the nearest multiple
    of the step is what minimises the squared error for a given entropy at these rates, so no entry gets
    another (the seed could carry one per entry)."""
    K, N = W.shape
    if not 1 <= K <= MAX_K:
        raise ValueError(f"a Rice-coded table needs 1 <= K <= {MAX_K}, got K={K}")
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be positive and finite, got {step}")
    if not np.all(np.isfinite(W)):
        raise ValueError("weight holds NaN or Inf")
    scale0 = float(np.float32(step))
    q, o = _quantise(W, scale0)
    z = _zigzag(q)
    k, bits = _best_k(z)
    lengths = ((bits + 7) // 8).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 8  # bit position of each entry's stream
    # Bit position of every value's code, entry by entry (column-major over W).
    zc, kc = z.T.reshape(-1), np.repeat(k, K)
    nbits = code_bits(zc, kc)
    pos = np.repeat(starts, K) + np.concatenate([[0], np.cumsum(nbits)[:-1]]) - np.repeat(
        np.concatenate([[0], np.cumsum(bits)[:-1]]), K)
    stream = np.zeros(int(lengths.sum()) * 8, np.uint8)
    u = zc >> kc
    esc = u >= ESCAPE
    ones = np.where(esc, ESCAPE, u)
    # The unary run: `ones` 1 bits from pos (the terminating 0 is already 0).
    run_start = np.repeat(pos, ones)
    stream[run_start + (np.arange(run_start.size) - np.repeat(np.cumsum(ones) - ones, ones))] = 1
    # The k remainder bits after the 0, or the ESCAPE_BITS raw bits after an escape's run.
    tail_at = np.where(esc, pos + ESCAPE, pos + u + 1)
    tail_w = np.where(esc, ESCAPE_BITS, kc)
    tail_v = np.where(esc, zc, zc & ((1 << kc) - 1))
    for j in range(max(ESCAPE_BITS, MAX_RICE_K)):
        sel = (tail_w > j) & (((tail_v >> j) & 1) == 1)
        stream[tail_at[sel] + j] = 1
    codes = np.packbits(stream, bitorder="little")
    seeds = pack_seeds(np.zeros(N, np.int64), UNIFORM_THETA, o, k).reshape(N, 1)
    return RiceTable(K=K, N=N, scale0=scale0, seeds=seeds, codes=codes, lengths=lengths.astype(np.uint16))


def rice_decode(t: RiceTable) -> np.ndarray:
    """The float32 K x N matrix the table stands for (§5.4), checking every stream as the C++ decoder does.
    All entries are read in lockstep, value by value, so the work is K vector steps over N entries."""
    f = t.validate()
    d = scales_from_rho(f["rho"].reshape(-1), t.scale0)
    o, k = f["offset"].reshape(-1), f["width"].reshape(-1)
    bits = np.concatenate([np.unpackbits(t.codes, bitorder="little"), np.zeros(ESCAPE_BITS + ESCAPE, np.uint8)])
    ends = np.cumsum(t.lengths.astype(np.int64)) * 8
    pos = ends - t.lengths.astype(np.int64) * 8
    zeros = np.flatnonzero(bits == 0)
    weights = 1 << np.arange(ESCAPE_BITS, dtype=np.int64)
    q = np.empty((t.K, t.N), np.int64)
    for i in range(t.K):
        nxt = zeros[np.minimum(np.searchsorted(zeros, pos), zeros.size - 1)]
        u = np.minimum(nxt - pos, ESCAPE)
        esc = u == ESCAPE
        at = pos + u + ~esc  # past the run and, unless an escape, its terminating 0
        width = np.where(esc, ESCAPE_BITS, k)
        pos = at + width
        if np.any(pos > ends):
            n = int(np.argmax(pos > ends))
            raise FormatError(f"entry {n}: stream ends before its {t.K} values")
        raw = bits[at[:, None] + np.arange(ESCAPE_BITS)].astype(np.int64)
        r = (raw * weights * (np.arange(ESCAPE_BITS) < width[:, None])).sum(axis=1)
        z = np.where(esc, r, (u << k) + r)
        q[i] = np.where(z % 2 == 0, z >> 1, -((z + 1) >> 1))
    left = ends - pos
    if np.any(left >= 8):
        raise FormatError(f"entry {int(np.argmax(left >= 8))}: stream has a whole byte left after its {t.K} values")
    ones = np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])
    stray = ones[ends] - ones[pos] > 0
    if np.any(stray):
        raise FormatError(f"entry {int(np.argmax(stray))}: stream has nonzero bits after its {t.K} values")
    return (d[None, :] * (q + o[None, :]).astype(np.float32)).astype(np.float32)


__all__ = ["RiceTable", "rice_encode", "rice_decode", "ladder_step", "encodable", "STEP_LADDER", "MAX_K"]
