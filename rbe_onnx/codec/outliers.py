"""Exact outliers (docs/FORMAT.md §5.2): a few weights per block kept as binary16 values in place of what their
codes decode to, for the heavy tails of trained matrices (MiniLM's `layers.0.out` has max/std 175), where one
weight would otherwise set a block's scale and cost its other weights their resolution.

A block's seed holds its outlier count; the records (3 bytes: row in block, binary16 value) follow in block
order in one uint8 array, rows ascending within a block.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .seed import FormatError

RECORD_BYTES = 3
BITS_PER_OUTLIER = 8 * RECORD_BYTES
MAX_PER_BLOCK = 255  # the seed's 8-bit field
HALF_MAX = 65504.0  # larger magnitudes stay with the codes: binary16 cannot hold them


def pack_records(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """uint8 [3·n]: per outlier its row in the block, then the binary16 value little-endian."""
    rows = np.asarray(rows, dtype=np.uint8)
    half = np.asarray(values, dtype=np.float16).astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.ascontiguousarray(np.concatenate([rows[:, None], half], axis=1).reshape(-1))


def unpack_records(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows int64 [n], values float32 [n]) of a record array."""
    rec = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    values = np.ascontiguousarray(rec[:, 1:]).view("<f2").reshape(-1).astype(np.float32)
    return rec[:, 0].astype(np.int64), values


def positions(counts: np.ndarray, data: np.ndarray, K: int, block_size: int) -> tuple[np.ndarray, ...]:
    """(block index n·nb + b, row in block, value) of every outlier, checked against §5.2's rules."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    total = int(counts.sum())
    if data.dtype != np.uint8 or data.ndim != 1 or data.size != RECORD_BYTES * total:
        raise FormatError(f"outliers must hold {RECORD_BYTES} x {total} (the seeds' outlier counts) = "
                          f"{RECORD_BYTES * total} bytes as uint8 1-D, got {data.dtype} {list(data.shape)}")
    rows, values = unpack_records(data)
    blocks = np.repeat(np.arange(counts.size), counts)
    nb = -(-K // block_size)
    k = (blocks % nb) * block_size + rows
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ascending = np.ones(total, bool)
    ascending[1:] = rows[1:] > rows[:-1]
    ascending[first[counts > 0]] = True  # each block starts afresh
    for bad, what in ((rows >= block_size, f"row past the block of {block_size}"),
                      (k >= K, f"row past K = {K} (a tail position)"),
                      (~ascending, "rows not strictly ascending within the block"),
                      (~np.isfinite(values), "value is not finite")):
        if np.any(bad):
            i = int(np.argmax(bad))
            raise FormatError(f"outlier {i} (block [{blocks[i] // nb}, {blocks[i] % nb}]): {what}")
    return blocks, rows, values


def attach(w, blocks: np.ndarray, rows: np.ndarray, values: np.ndarray):
    """`w` with these outliers: counts written into the seeds, records stored (blocks ascending, then rows)."""
    n_blocks = w.seeds.size
    order = np.lexsort((rows, blocks))
    blocks, rows, values = blocks[order], rows[order], values[order]
    counts = np.bincount(blocks, minlength=n_blocks).astype(np.uint64)
    if counts.size and counts.max() > MAX_PER_BLOCK:
        raise ValueError(f"at most {MAX_PER_BLOCK} outliers per block")
    u = (w.seeds.reshape(-1).view(np.uint64) & ~(np.uint64(0xFF) << np.uint64(32))) | (counts << np.uint64(32))
    return dataclasses.replace(w, seeds=u.view(np.int64).reshape(w.seeds.shape),
                               outliers=pack_records(rows, values) if rows.size else None)


def select(block: np.ndarray, fraction: float, median: np.ndarray | None = None) -> np.ndarray:
    """Bool mask of the weights of one row block [rows, N] to keep exactly: the `fraction` of them that lie
    farthest from their column's bulk (distance from the median in units of the column block's RMS), at most
    MAX_PER_BLOCK per column. `median`: the block's column medians [1, N], when the caller has them."""
    rows, N = block.shape
    keep = int(round(fraction * block.size))
    if keep <= 0:
        return np.zeros(block.shape, bool)
    med = np.median(block, axis=0, keepdims=True) if median is None else median
    rms = np.sqrt(np.mean(block * block, axis=0, keepdims=True))
    score = np.abs(block - med) / np.where(rms > 0, rms, 1.0)
    flat = score.reshape(-1)
    mask = np.zeros(flat.size, bool)
    mask[np.argpartition(flat, -keep)[-keep:]] = True
    mask = mask.reshape(rows, N) & (score > 0) & (np.abs(block) <= HALF_MAX)
    crowded = np.nonzero(mask.sum(axis=0) > MAX_PER_BLOCK)[0]
    for n in crowded:  # keep a column's strongest MAX_PER_BLOCK
        top = np.argsort(score[:, n])[-MAX_PER_BLOCK:]
        mask[:, n] = False
        mask[top, n] = True
    return mask
