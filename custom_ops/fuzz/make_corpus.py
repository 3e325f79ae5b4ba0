"""Writes the seed corpus of the prepare_weight fuzzer (custom_ops/fuzz/fuzz_prepare.cc) into corpus/.

Valid inputs are real encodings (rbe_onnx.codec.encode of random weights) of every code width, block sizes
with and without a tail block, 1/3/6/17-row activations, with bias and with NaN/Inf in A, some with exact
outliers (§5.2) and accuracy_level 4; invalid ones break one rule of docs/FORMAT.md §6 each. The byte layout is
the one documented at the top of fuzz_prepare.cc.
Deterministic: running it again rewrites the same files.

    python custom_ops/fuzz/make_corpus.py [--out DIR]
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

RAW_SHAPE, RAW_SCALE, BIAS, SEED_DELTA, CODE_DELTA, NAN_IN_A, INF_IN_A, OUTLIERS = 1, 2, 4, 8, 16, 32, 64, 128
DERIVE, RANDOM_COUNTS, INT8, ROTATE = 1, 2, 4, 8  # the OUTLIERS options byte
BLOCKS, BITS = (32, 64, 128, 256), (2, 3, 4, 8, 5, 6)  # the fuzzer's order (fuzz_prepare.cc)
TAG, TAG_ROTATED = 0xB2, 0xB3


def canonical_seed(bits: int) -> int:
    """The seed the fuzzer XORs each input mask onto: valid, rho = offset = 0, theta = 4."""
    return (4 << 16) | ((bits & 0xF) << 28) | (TAG << 56)


def make_input(*, K, N, block_size, bits, scale0=None, seeds=None, codes=b"", flags=0, M=1, a_exp=0,
               seed_delta=0, code_delta=0, prng=0, raw_shape=None, outlier_options=None, outlier_bytes=b"",
               xor_at=0, outlier_delta=0, rotation=None, rotation_seed=0) -> bytes:
    """One fuzzer input. seeds: uint64-compatible ints (the true seeds; stored as masks). raw_shape: 4 int64
    (K, N, block_size, bits) stored verbatim instead of the small-shape selectors. outlier_options: None for a
    node without an outliers input, else the options byte (DERIVE, RANDOM_COUNTS, INT8), with outlier_bytes
    the records (or, with DERIVE, the bytes XORed onto the derived ones from byte xor_at on). rotation: None,
    or the node's rotation R (§5.3; a power of two in [2, 4096], or one in [-8, 7]); it lives in the options
    byte, so such a node also has an outliers input (empty unless given)."""
    out = bytearray()
    if rotation is not None:
        outlier_options = (outlier_options or 0) | ROTATE
    if raw_shape is not None:
        flags |= RAW_SHAPE
    if scale0 is not None:
        flags |= RAW_SCALE
    if outlier_options is not None:
        flags |= OUTLIERS
    out += struct.pack("<B", flags)
    if raw_shape is not None:
        out += struct.pack("<4q", *raw_shape)
    else:
        assert 1 <= K <= 2048 and 1 <= N <= 96
        out += struct.pack("<HBBB", K - 1, N - 1, BLOCKS.index(block_size), BITS.index(bits))
    out += struct.pack("<f", scale0) if scale0 is not None else struct.pack("<B", 10)
    out += struct.pack("<BBbh", M, a_exp + 12, seed_delta, code_delta)
    seeds = [] if seeds is None else [int(s) & (2**64 - 1) for s in np.asarray(seeds).ravel()]
    out += struct.pack("<HB", len(seeds), prng)
    if outlier_options is not None:
        out += struct.pack("<BH", outlier_options, len(outlier_bytes))
        if outlier_options & DERIVE:
            out += struct.pack("<Hb", xor_at, outlier_delta)
    if rotation is not None:
        power = rotation.bit_length() - 1
        if rotation >= 2 and rotation == 1 << power and power <= 12:
            selector = power - 1
        else:
            assert -8 <= rotation <= 7, rotation
            selector = rotation + 248
        out += struct.pack("<BQ", selector, rotation_seed)
    # The fuzzer flips every seed's tag 0xB2 <-> 0xB3 under ROTATE: the masks are taken against that.
    base = canonical_seed(bits) ^ ((TAG ^ TAG_ROTATED) << 56 if rotation is not None else 0)
    for s in seeds:
        out += struct.pack("<Q", s ^ base)
    out += bytes(outlier_bytes)
    out += bytes(codes)
    return bytes(out)


def with_outliers(seeds, outliers: dict[tuple[int, int], list[tuple[int, float | int]]]):
    """(seeds with their outlier counts set, §5.2 record bytes) for {(n, b): [(row, value), ...]}, records in
    block order and as listed within a block (so a test can list them out of order). A value given as an int
    is a raw binary16 pattern (for Inf/NaN)."""
    seeds = np.asarray(seeds).copy().view(np.uint64)
    nb = seeds.shape[1]
    records = bytearray()
    for blk in range(seeds.size):
        n, b = divmod(blk, nb)
        rows = outliers.get((n, b), [])
        seeds[n, b] = (seeds[n, b] & ~np.uint64(0xFF << 32)) | np.uint64(len(rows) << 32)
        for row, value in rows:
            half = value if isinstance(value, int) else int(np.array(value, np.float16).view(np.uint16))
            records += struct.pack("<BH", row, half)
    return seeds, bytes(records)


def spread_outliers(K, N, block_size, nb, seed, full_block=None):
    """A few outliers in most blocks (0-3 random rows inside the block and K, values far out of a 0.05-RMS
    weight's range), and every row of block full_block (n, b)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n in range(N):
        for b in range(nb):
            rows_in_block = min(block_size, K - b * block_size)
            count = rows_in_block if (n, b) == full_block else min(int(rng.integers(0, 4)), rows_in_block)
            rows = np.sort(rng.choice(rows_in_block, size=count, replace=False))
            out[(n, b)] = [(int(r), float(rng.standard_normal() * 2.0)) for r in rows]
    return out


def encoded(K, N, bits, block_size, seed):
    from rbe_onnx.codec import encode

    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w = encode(W, bits=bits, block_size=block_size)
    return w


def corpus() -> dict[str, bytes]:
    files: dict[str, bytes] = {}

    def valid(name, K, N, bits, bs, **kw):
        w = encoded(K, N, bits, bs, len(files))
        kw_all = dict(K=K, N=N, block_size=bs, bits=bits, scale0=w.scale0, seeds=w.seeds, codes=w.codes.tobytes())
        kw_all.update(kw)
        files[name] = make_input(**kw_all)
        return w

    w4 = valid("valid-b4-bs64-K100-N24-M3", 100, 24, 4, 64, M=3)
    valid("valid-b3-bs128-K200-N17-M17", 200, 17, 3, 128, M=17)
    valid("valid-b2-bs32-K45-N20-M1-bias", 45, 20, 2, 32, M=1, flags=BIAS)
    w8 = valid("valid-b8-bs256-K300-N16-M6", 300, 16, 8, 256, M=6)
    valid("valid-b4-bs256-K5-N3-M1-tail", 5, 3, 4, 256, M=1)
    valid("valid-b2-bs64-K130-N40-M4-nan", 130, 40, 2, 64, M=4, flags=NAN_IN_A)
    valid("valid-b3-bs32-K96-N33-M2-inf", 96, 33, 3, 32, M=2, flags=INF_IN_A)
    valid("valid-b5-bs128-K200-N17-M3", 200, 17, 5, 128, M=3)
    valid("valid-b6-bs64-K100-N24-M2-bias", 100, 24, 6, 64, M=2, flags=BIAS)
    # Seeds left to the fuzzer's PRNG (valid, varied theta/offset), codes too: a large-ish weight in 14 bytes.
    files["valid-prng-b4-bs128-K2048-N96-M1"] = make_input(K=2048, N=96, block_size=128, bits=4, M=1, prng=7)
    files["valid-prng-b8-bs32-K777-N65-M7"] = make_input(K=777, N=65, block_size=32, bits=8, M=7, prng=3)

    def broken(name, field_xor=0, index=0, field_or=0, **kw):
        seeds = w4.seeds.copy().view(np.uint64)
        seeds.flat[index] ^= np.uint64(field_xor)
        seeds.flat[index] |= np.uint64(field_or)
        args = dict(K=100, N=24, block_size=64, bits=4, scale0=w4.scale0, seeds=seeds, codes=w4.codes.tobytes(),
                    M=1)
        args.update(kw)
        files[name] = make_input(**args)

    broken("invalid-tag", 1 << 57, index=5)
    broken("invalid-tag-format1", 0x03 << 56, index=5)  # 0xB2 -> 0xB1
    broken("invalid-width", 0x7 << 28, index=47)
    broken("invalid-outliers", 1 << 33, index=0)
    broken("invalid-reserved", 1 << 45, index=20)
    s8 = w8.seeds.copy().view(np.uint64)
    s8.flat[3] ^= np.uint64(1 << 16)  # theta 4 -> 5 with 8-bit codes
    files["invalid-theta-8bit"] = make_input(K=300, N=16, block_size=256, bits=8, scale0=w8.scale0, seeds=s8,
                                             codes=w8.codes.tobytes(), M=2)
    broken("invalid-codes-one-short", flags=CODE_DELTA, code_delta=-1)
    broken("invalid-codes-one-long", flags=CODE_DELTA, code_delta=1)
    broken("invalid-seeds-one-short", flags=SEED_DELTA, seed_delta=-1)
    broken("invalid-seeds-one-long", flags=SEED_DELTA, seed_delta=1)
    broken("invalid-scale0-nan", scale0=float("nan"))
    broken("invalid-scale0-inf", scale0=float("inf"))
    broken("invalid-scale0-zero", scale0=0.0)
    broken("invalid-scale0-negative", scale0=-1e-3)
    # rho = 65535 puts d = s0·e^128 past float32 for any ordinary s0.
    broken("invalid-scale-overflow", field_or=0xFFFF, index=7, scale0=1e-3)
    outlier_cases(files)
    for name, shape in {"invalid-K0": (0, 8, 64, 4), "invalid-bits7": (64, 8, 64, 7),
                        "invalid-block48": (96, 8, 48, 4), "invalid-K-too-large": ((1 << 24) + 1, 8, 64, 4),
                        "invalid-N-negative": (64, -3, 64, 4), "invalid-K-int64-max": (2**63 - 1, 2**63 - 1, 256, 8),
                        "huge-valid-shape-short-buffers": (1 << 24, 1 << 24, 32, 8)}.items():
        files[name] = make_input(K=shape[0], N=shape[1], block_size=shape[2], bits=shape[3], raw_shape=shape,
                                 scale0=1e-3)
    rotation_cases(files)
    # A weight of exact zeros (8-bit codes 128, offset 0) at accuracy_level 4, so every output must be exactly 0.
    # The AVX-512 GEMV once split -128·Σq evenly over its lanes and gave -7.5e-9: each lane's share was
    # rounded in float before they cancelled.
    files["valid-int8-zero-weight-b8-bs128-K40-N16-M2"] = make_input(
        K=40, N=16, block_size=128, bits=8, scale0=1 / 128, seeds=[canonical_seed(8)] * 16,
        codes=b"\x80" * (16 * 128), M=2, outlier_options=INT8)
    return files


def rotation_cases(files: dict[str, bytes]) -> None:
    """Input rotations (§5.3): valid ones of several sizes (with int8 and outliers too), and each rule broken."""
    def retagged(seeds, tag=TAG_ROTATED):
        seeds = np.asarray(seeds).view(np.uint64) & np.uint64((1 << 56) - 1)
        return seeds | np.uint64(tag << 56)

    def rotated(name, K, N, bits, bs, M, rotation, tag=TAG_ROTATED, **kw):
        w = encoded(K, N, bits, bs, len(files))
        files[name] = make_input(K=K, N=N, block_size=bs, bits=bits, scale0=w.scale0, seeds=retagged(w.seeds, tag),
                                 codes=w.codes.tobytes(), M=M, rotation=rotation, rotation_seed=len(files), **kw)

    rotated("valid-rotated-b3-bs64-K256-N12-M3-int8", 256, 12, 3, 64, 3, 128, outlier_options=INT8)
    rotated("valid-rotated-b4-bs32-K96-N5-M1", 96, 5, 4, 32, 1, 32)
    rotated("valid-rotated-b2-bs128-K6-N7-M6-int8-nan", 6, 7, 2, 128, 6, 2, outlier_options=INT8, flags=NAN_IN_A)
    rotated("valid-rotated-b8-bs256-K512-N9-M2-bias", 512, 9, 8, 256, 2, 512, flags=BIAS)
    files["valid-rotated-prng-b4-bs128-K2048-N40-M5-int8-outliers"] = make_input(
        K=2048, N=40, block_size=128, bits=4, M=5, prng=11, outlier_options=DERIVE | RANDOM_COUNTS | INT8,
        rotation=2048, rotation_seed=2**64 - 1)
    rotated("invalid-rotation-not-dividing-K", 100, 8, 4, 64, 1, 8)
    rotated("invalid-rotation-3", 96, 5, 4, 32, 1, 3)
    rotated("invalid-rotation-negative", 96, 5, 4, 32, 1, -2)
    rotated("invalid-rotation-longer-than-K", 96, 5, 4, 32, 1, 128)
    rotated("invalid-rotation-zero-with-0xB3-seeds", 96, 5, 4, 32, 1, 0)
    rotated("invalid-rotation-with-0xB2-seeds", 96, 5, 4, 32, 1, 32, tag=TAG)


def outlier_cases(files: dict[str, bytes]) -> None:
    """Exact outliers (§5.2): valid sets (given, derived by the fuzzer, empty, a block made of outliers, at
    accuracy_level 4 too) and each rule of §6 on them broken once."""
    def encoded_with(name, K, N, bits, bs, M, outliers, options=0, **kw):
        w = encoded(K, N, bits, bs, len(files))
        seeds, records = with_outliers(w.seeds, outliers)
        files[name] = make_input(K=K, N=N, block_size=bs, bits=bits, scale0=w.scale0, seeds=seeds,
                                 codes=w.codes.tobytes(), M=M, outlier_options=options, outlier_bytes=records, **kw)
        return w

    # K = 100, block 64: block 1 is a tail of 36 rows, so row 35 is the last a record may name there.
    spread = spread_outliers(100, 24, 64, 2, 1, full_block=(5, 1))
    spread[(0, 1)] = [(0, 0.75), (35, -1.5)]
    encoded_with("valid-outliers-b4-bs64-K100-N24-M3", 100, 24, 4, 64, 3, spread)
    encoded_with("valid-outliers-b3-bs32-K70-N9-M5-int8", 70, 9, 3, 32, 5,
                 spread_outliers(70, 9, 32, 3, 2, full_block=(4, 0)), options=INT8)
    encoded_with("valid-outliers-b8-bs256-K300-N16-M6-int8-bias", 300, 16, 8, 256, 6,
                 spread_outliers(300, 16, 256, 2, 3), options=INT8, flags=BIAS)
    encoded_with("valid-outliers-b2-bs128-K130-N20-M4-nan-int8", 130, 20, 2, 128, 4,
                 spread_outliers(130, 20, 128, 2, 4), options=INT8, flags=NAN_IN_A)
    # Binary16 extremes: the largest finite, the smallest subnormal, -0.
    encoded_with("valid-outliers-half-extremes", 100, 24, 4, 64, 2,
                 {(0, 0): [(1, 65504.0), (2, -65504.0)], (1, 0): [(0, 0x0001), (63, 0x8000)]}, options=INT8)
    # An outliers input with no records: given, but every count 0.
    encoded_with("valid-outliers-empty-input-M2", 100, 24, 4, 64, 2, {})
    # Records the fuzzer derives from the PRNG seeds' counts: a large weight with outliers in 21 bytes.
    files["valid-outliers-derived-prng-b4-bs64-K1000-N50-M4-int8"] = make_input(
        K=1000, N=50, block_size=64, bits=4, M=4, prng=5, outlier_options=DERIVE | RANDOM_COUNTS | INT8)
    files["valid-outliers-derived-prng-b3-bs256-K600-N40-M7"] = make_input(
        K=600, N=40, block_size=256, bits=3, M=7, prng=9, outlier_options=DERIVE | RANDOM_COUNTS)
    # Counts from the (real) seeds, records derived: a block's count may be anything up to its rows.
    w = encoded(200, 17, 4, 128, len(files))
    counts = {(n, b): [(0, 0.0)] * ((3 * n + b) % 5) for n in range(17) for b in range(2)}
    counts[(2, 1)] = [(0, 0.0)] * 72  # all of the 72-row tail block
    derived_seeds, _ = with_outliers(w.seeds, counts)
    derived = dict(K=200, N=17, block_size=128, bits=4, scale0=w.scale0, seeds=derived_seeds,
                   codes=w.codes.tobytes(), M=2)
    files["valid-outliers-derived-b4-bs128-K200-N17-M2"] = make_input(**derived, outlier_options=DERIVE)
    files["valid-int8-no-outliers-b4-bs128-K200-N17-M6"] = make_input(**{**derived, "seeds": w.seeds, "M": 6},
                                                                      outlier_options=INT8)

    base = {(0, 0): [(3, 1.0), (9, -2.0)], (3, 1): [(35, 0.5)], (23, 1): [(0, 4.0)]}

    def bad(name, changes, **kw):
        outliers = {**base, **changes}
        encoded_with(name, 100, 24, 4, 64, 1, outliers, **kw)

    bad("invalid-outliers-count-above-block", {(7, 0): [(r % 64, 1.0) for r in range(65)]})
    bad("invalid-outliers-row-past-block", {(7, 0): [(64, 1.0)]})  # k = 64 < K: only the block rule
    bad("invalid-outliers-row-255", {(7, 0): [(2, 1.0), (255, 1.0)]})
    bad("invalid-outliers-row-past-K", {(3, 1): [(36, 0.5)]})  # tail block of 36 rows
    bad("invalid-outliers-rows-equal", {(0, 0): [(3, 1.0), (3, -2.0)]})
    bad("invalid-outliers-rows-descending", {(0, 0): [(9, 1.0), (3, -2.0)]})
    bad("invalid-outliers-value-inf", {(3, 1): [(35, 0x7C00)]})
    bad("invalid-outliers-value-neg-inf", {(3, 1): [(35, 0xFC00)]})
    bad("invalid-outliers-value-nan", {(0, 0): [(3, 1.0), (9, 0x7E01)]})
    w4 = encoded(100, 24, 4, 64, len(files))
    seeds, records = with_outliers(w4.seeds, base)
    common = dict(K=100, N=24, block_size=64, bits=4, scale0=w4.scale0, seeds=seeds, codes=w4.codes.tobytes(), M=1)
    files["invalid-outliers-length-short"] = make_input(**common, outlier_options=0, outlier_bytes=records[:-1])
    files["invalid-outliers-length-long"] = make_input(**common, outlier_options=0,
                                                       outlier_bytes=records + struct.pack("<BH", 10, 0x3C00))
    files["invalid-outliers-count-but-empty-input"] = make_input(**common, outlier_options=0)
    files["invalid-outliers-derived-length-short"] = make_input(**common, outlier_options=DERIVE, outlier_delta=-3)
    # Derived records, then a row byte XORed past the block (a row below 64, XOR 0x80, is 128 or more).
    files["invalid-outliers-derived-xor-row"] = make_input(**common, outlier_options=DERIVE, xor_at=3,
                                                           outlier_bytes=b"\x80")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "corpus")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    files = corpus()
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    print(f"wrote {len(files)} inputs ({sum(map(len, files.values()))} bytes) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
