"""Bit packing of codes into the byte layout of docs/FORMAT.md §4 (groups of 32 codes)."""
from __future__ import annotations

import numpy as np

GROUP = 32


def group_bytes(bits: int) -> int:
    return 4 * bits


def _pack2(g: np.ndarray) -> np.ndarray:
    return g[..., 0:8] | (g[..., 8:16] << 2) | (g[..., 16:24] << 4) | (g[..., 24:32] << 6)


def _unpack2(b: np.ndarray) -> np.ndarray:
    return np.concatenate([(b >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: uint8 [..., L] with L a multiple of 32 -> uint8 [..., L·bits/8]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    lead, L = codes.shape[:-1], codes.shape[-1]
    if L % GROUP:
        raise ValueError(f"code rows must hold a multiple of {GROUP} codes, got {L}")
    g = codes.reshape(*lead, L // GROUP, GROUP)
    if bits == 8:
        out = g
    elif bits == 4:
        out = g[..., :16] | (g[..., 16:] << 4)
    elif bits == 2:
        out = _pack2(g)
    elif bits == 3:
        high = np.packbits((g >> 2) & 1, axis=-1, bitorder="little")  # bit t of a LE uint32
        out = np.concatenate([_pack2(g & 3), high], axis=-1)
    else:
        raise ValueError(f"bits={bits} unsupported")
    return np.ascontiguousarray(out, dtype=np.uint8).reshape(*lead, L * bits // 8)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [..., L·bits/8] -> uint8 [..., L]."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    gb = group_bytes(bits)
    if nbytes % gb:
        raise ValueError(f"packed rows must hold whole groups of {gb} bytes, got {nbytes}")
    g = packed.reshape(*lead, nbytes // gb, gb)
    if bits == 8:
        out = g
    elif bits == 4:
        out = np.concatenate([g & 0xF, g >> 4], axis=-1)
    elif bits == 2:
        out = _unpack2(g)
    elif bits == 3:
        high = np.unpackbits(g[..., 8:12], axis=-1, bitorder="little")
        out = _unpack2(g[..., :8]) | (high << 2)
    else:
        raise ValueError(f"bits={bits} unsupported")
    return np.ascontiguousarray(out).reshape(*lead, nbytes // gb * GROUP)
