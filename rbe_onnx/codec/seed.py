"""The 64-bit block seed of docs/FORMAT.md §3: packing, unpacking and validation of its fields."""
from __future__ import annotations

import numpy as np

TAG = 0xB2
TAG_ROTATED = 0xB3  # the seeds of a node with an input rotation (§5.3), so a reader without it refuses them
TAG_V1 = 0xB1  # format 1 (its own 3-bit layout): refused, pointing to `rbe-onnx rewrite`
RHO_PER_LOG_SCALE = 512.0  # rho / 512 = hyperbolic distance 2·atanh(r) = ln(d / s0)
THETA_STEPS = 16
UNIFORM_THETA = 4  # theta index whose gamma is 1 (the uniform grid)
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# Code widths with one uniform level table, whose seeds must carry theta = UNIFORM_THETA (FORMAT.md §5).
UNIFORM_BITS = (5, 6, 8)
SUPPORTED_BLOCK_SIZES = (32, 64, 128, 256)


class FormatError(ValueError):
    """A seed array, code buffer or attribute set that docs/FORMAT.md does not allow."""


def alpha_bits(alpha) -> np.ndarray:
    """binary16 bit patterns (uint64) of the center coefficients α (§3, §5.1)."""
    return np.asarray(alpha, dtype=np.float16).view(np.uint16).astype(np.uint64)


def pack_seeds(rho, theta, offset, width, alpha=0.0) -> np.ndarray:
    """Seeds as int64 (the uint64 bit pattern) from per-block fields of any matching shape."""
    rho = np.asarray(rho, dtype=np.uint64)
    theta = np.asarray(theta, dtype=np.uint64)
    off = np.asarray(offset, dtype=np.int64).astype(np.uint64) & np.uint64(0xFF)
    width = np.broadcast_to(np.asarray(width, dtype=np.uint64), rho.shape)
    u = (rho & np.uint64(0xFFFF)) | ((theta & np.uint64(0xF)) << np.uint64(16)) \
        | (off << np.uint64(20)) | ((width & np.uint64(0xF)) << np.uint64(28)) \
        | (np.broadcast_to(alpha_bits(alpha), rho.shape) << np.uint64(40)) | (np.uint64(TAG) << np.uint64(56))
    return u.view(np.int64)


def with_tag(seeds: np.ndarray, tag: int) -> np.ndarray:
    """The seeds with their tag field (bits 56-63) set to `tag`."""
    u = np.ascontiguousarray(seeds, dtype=np.int64).view(np.uint64)
    return ((u & np.uint64((1 << 56) - 1)) | (np.uint64(tag) << np.uint64(56))).view(np.int64)


def unpack_seeds(seeds) -> dict[str, np.ndarray]:
    """Fields of each seed: rho, theta, offset (signed), width, outliers, alpha (float32), tag."""
    u = np.ascontiguousarray(seeds, dtype=np.int64).view(np.uint64)
    field = lambda shift, mask: ((u >> np.uint64(shift)) & np.uint64(mask)).astype(np.int64)  # noqa: E731
    off = field(20, 0xFF)
    return {
        "rho": field(0, 0xFFFF),
        "theta": field(16, 0xF),
        "offset": np.where(off >= 128, off - 256, off),
        "width": field(28, 0xF),
        "outliers": field(32, 0xFF),
        "alpha": field(40, 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32),
        "tag": field(56, 0xFF),
    }


def scales_from_rho(rho, scale0: float) -> np.ndarray:
    """Block scale d = s0·(1+r)/(1−r) with r = tanh(rho/1024), computed as s0·exp(rho/512) (§3)."""
    return (float(scale0) * np.exp(np.asarray(rho, dtype=np.float64) / RHO_PER_LOG_SCALE)).astype(np.float32)


def check_layout(K: int, N: int, bits: int, block_size: int, scale0: float) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits={bits} unsupported (supported: {SUPPORTED_BITS})")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise FormatError(f"block_size={block_size} unsupported (supported: {SUPPORTED_BLOCK_SIZES})")
    for name, v in (("K", K), ("N", N)):
        if not 1 <= v <= (1 << 24):
            raise FormatError(f"{name}={v} out of range [1, 2^24]")
    if not (np.isfinite(scale0) and scale0 > 0):
        raise FormatError(f"scale0={scale0} must be positive and finite")


def check_seeds(seeds: np.ndarray, K: int, N: int, bits: int, block_size: int,
                has_center: bool = False, has_outliers: bool = False, rotated: bool = False) -> dict[str, np.ndarray]:
    """Validates a seed array against §6 and returns its fields."""
    nb = -(-K // block_size)
    if seeds.dtype != np.int64 or seeds.shape != (N, nb):
        raise FormatError(f"seeds must be int64 of shape [{N}, {nb}], got {seeds.dtype} {list(seeds.shape)}")
    f = unpack_seeds(seeds)
    problems = [
        (f["tag"] == TAG_V1, f"tag 0x{TAG_V1:X}: a format-1 file (its 3-bit code layout is not format 2's); "
                             "re-run `rbe-onnx rewrite` on the original model to re-encode it"),
        ((f["tag"] == TAG_ROTATED) & (not rotated),
         f"tag 0x{TAG_ROTATED:X}: the block belongs to a rotated product (FORMAT.md §5.3) but the node has no "
         "'rotation'"),
        ((f["tag"] == TAG) & rotated, f"tag 0x{TAG:X} in a node with a 'rotation': a rotated node's seeds carry "
                                      f"0x{TAG_ROTATED:X} (FORMAT.md §5.3)"),
        ((f["tag"] != TAG) & (f["tag"] != TAG_ROTATED), f"tag is not 0x{TAG:X} (not an RBE v2 seed)"),
        (f["width"] != bits, f"width field differs from bits={bits}"),
        ((f["outliers"] != 0) if not has_outliers else np.zeros(1, bool),
         "outlier count nonzero but the node has no outliers input"),
        (f["outliers"] > block_size, f"outlier count above block_size={block_size}"),
        (~np.isfinite(f["alpha"]), "alpha is not finite"),
        ((f["alpha"].view(np.uint32) != 0) if not has_center else np.zeros(1, bool),
         "alpha nonzero but the node has no center vector"),
        ((f["theta"] != UNIFORM_THETA) if bits in UNIFORM_BITS else np.zeros(1, bool),
         f"theta != {UNIFORM_THETA} with {bits}-bit codes"),
    ]
    for bad, what in problems:
        if np.any(bad):
            idx = np.argwhere(np.broadcast_to(bad, f["tag"].shape))[0]
            raise FormatError(f"seed [{idx[0]}, {idx[1]}]: {what}")
    return f
