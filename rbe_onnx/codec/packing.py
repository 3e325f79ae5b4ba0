"""Bit packing of codes into the byte layout of docs/FORMAT.md §4: groups of 32 codes (for 5 and 6 bits a
4-bit plane and a high plane), or for 3 bits chunks of min(block_size, 128) codes in two planes."""
from __future__ import annotations

import numpy as np

GROUP = 32
MAX_CHUNK = 128  # codes per 3-bit chunk (§4): min(block_size, 128)


def group_bytes(bits: int) -> int:
    return 4 * bits


def _pack2(g: np.ndarray) -> np.ndarray:
    """Byte j of n = L/4 bytes holds codes j, j+n, j+2n, j+3n in bits 0-1, 2-3, 4-5, 6-7."""
    n = g.shape[-1] // 4
    return g[..., 0:n] | (g[..., n:2 * n] << 2) | (g[..., 2 * n:3 * n] << 4) | (g[..., 3 * n:] << 6)


def _unpack2(b: np.ndarray) -> np.ndarray:
    return np.concatenate([(b >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)


def _pack4(g: np.ndarray) -> np.ndarray:
    """Byte j (0-15) holds codes j and j+16 in its low and high nibble."""
    return g[..., :16] | (g[..., 16:] << 4)


def _unpack4(b: np.ndarray) -> np.ndarray:
    return np.concatenate([b & 0xF, b >> 4], axis=-1)


def _chunk(L: int) -> int:
    """Codes per 3-bit chunk of a block of L codes."""
    C = min(L, MAX_CHUNK)
    if L % C:
        raise ValueError(f"3-bit code rows must be whole blocks (32, 64, 128 or 256 codes), got {L}")
    return C


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes: uint8 [..., L], each row one block (L = block_size) -> uint8 [..., L·bits/8]."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    lead, L = codes.shape[:-1], codes.shape[-1]
    if L % GROUP:
        raise ValueError(f"code rows must hold a multiple of {GROUP} codes, got {L}")
    g = codes.reshape(*lead, L // GROUP, GROUP)
    if bits == 3:
        C = _chunk(L)
        c = codes.reshape(*lead, L // C, C)
        # Bit i of high-plane byte j is code j + i·C/8: the C/8 codes of plane row i are consecutive.
        high = np.packbits(((c >> 2) & 1).reshape(*lead, L // C, 8, C // 8), axis=-2, bitorder="little")
        out = np.concatenate([_pack2(c & 3), high[..., 0, :]], axis=-1)
    elif bits == 8:
        out = g
    elif bits == 4:
        out = _pack4(g)
    elif bits == 2:
        out = _pack2(g)
    elif bits == 5:  # the low nibbles as 4-bit codes, then bit t of the little-endian uint32 is code t's bit 4
        out = np.concatenate([_pack4(g & 0xF), np.packbits(g >> 4, axis=-1, bitorder="little")], axis=-1)
    elif bits == 6:  # the low nibbles as 4-bit codes, then the top two bits as 2-bit codes
        out = np.concatenate([_pack4(g & 0xF), _pack2(g >> 4)], axis=-1)
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
    if bits == 3:
        C = _chunk(nbytes // gb * GROUP)
        c = packed.reshape(*lead, -1, 3 * C // 8)
        high = np.unpackbits(c[..., None, C // 4:], axis=-2, bitorder="little")  # [..., chunk, i, j]
        out = _unpack2(c[..., :C // 4]) | (high.reshape(*c.shape[:-1], C) << 2)
    elif bits == 8:
        out = g
    elif bits == 4:
        out = _unpack4(g)
    elif bits == 2:
        out = _unpack2(g)
    elif bits == 5:
        out = _unpack4(g[..., :16]) | (np.unpackbits(g[..., 16:], axis=-1, bitorder="little") << 4)
    elif bits == 6:
        out = _unpack4(g[..., :16]) | (_unpack2(g[..., 16:]) << 4)
    else:
        raise ValueError(f"bits={bits} unsupported")
    return np.ascontiguousarray(out).reshape(*lead, nbytes // gb * GROUP)
