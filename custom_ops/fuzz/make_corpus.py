"""Writes the seed corpus of the prepare_weight fuzzer (custom_ops/fuzz/fuzz_prepare.cc) into corpus/.

Valid inputs are real encodings (rbe_onnx.codec.encode of random weights) of every code width, block sizes
with and without a tail block, 1/3/6/17-row activations, with bias and with NaN/Inf in A; invalid ones break
one rule of docs/FORMAT.md §6 each. The byte layout is the one documented at the top of fuzz_prepare.cc.
Deterministic: running it again rewrites the same files.

    python custom_ops/fuzz/make_corpus.py [--out DIR]
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np

RAW_SHAPE, RAW_SCALE, BIAS, SEED_DELTA, CODE_DELTA, NAN_IN_A, INF_IN_A = 1, 2, 4, 8, 16, 32, 64
BLOCKS, BITS = (32, 64, 128, 256), (2, 3, 4, 8)
TAG = 0xB2


def canonical_seed(bits: int) -> int:
    """The seed the fuzzer XORs each input mask onto: valid, rho = offset = 0, theta = 4."""
    return (4 << 16) | ((bits & 0xF) << 28) | (TAG << 56)


def make_input(*, K, N, block_size, bits, scale0=None, seeds=None, codes=b"", flags=0, M=1, a_exp=0,
               seed_delta=0, code_delta=0, prng=0, raw_shape=None) -> bytes:
    """One fuzzer input. seeds: uint64-compatible ints (the true seeds; stored as masks). raw_shape: 4 int64
    (K, N, block_size, bits) stored verbatim instead of the small-shape selectors."""
    out = bytearray()
    if raw_shape is not None:
        flags |= RAW_SHAPE
    if scale0 is not None:
        flags |= RAW_SCALE
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
    base = canonical_seed(bits)
    for s in seeds:
        out += struct.pack("<Q", s ^ base)
    out += bytes(codes)
    return bytes(out)


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
    for name, shape in {"invalid-K0": (0, 8, 64, 4), "invalid-bits5": (64, 8, 64, 5),
                        "invalid-block48": (96, 8, 48, 4), "invalid-K-too-large": ((1 << 24) + 1, 8, 64, 4),
                        "invalid-N-negative": (64, -3, 64, 4), "invalid-K-int64-max": (2**63 - 1, 2**63 - 1, 256, 8),
                        "huge-valid-shape-short-buffers": (1 << 24, 1 << 24, 32, 8)}.items():
        files[name] = make_input(K=shape[0], N=shape[1], block_size=shape[2], bits=shape[3], raw_shape=shape,
                                 scale0=1e-3)
    return files


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
