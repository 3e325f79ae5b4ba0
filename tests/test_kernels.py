"""Every kernel ISA against the scalar reference and the numpy decoder (FORMAT.md is the contract)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rbe_onnx import _kernels
from rbe_onnx.codec import RBEWeight, decode, encode
from rbe_onnx.codec.seed import alpha_bits

SIMD = [isa for isa in ("avx2", "avxvnni", "avx512", "neon") if _kernels.isa_available(isa)]


def test_this_machine_has_a_simd_kernel():
    assert SIMD, "no SIMD kernel available: the CI machine has AVX2+FMA"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
@pytest.mark.parametrize("K,N", [(256, 48), (77, 19), (1000, 33)])
def test_gemm_matches_numpy_decode(bits, block_size, K, N):
    rng = np.random.default_rng(bits * 1000 + block_size + K)
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w = encode(W, bits=bits, block_size=block_size)
    cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
    D = decode(w).astype(np.float64)
    bias = rng.standard_normal(N).astype(np.float32)
    for M in (1, 7, 64):
        A = rng.standard_normal((M, K)).astype(np.float32)
        ref = A.astype(np.float64) @ D + bias
        tol = 1e-5 * np.abs(ref).max()
        for isa in ("scalar", *SIMD):
            Y = cpp.gemm(A, bias, isa=isa, threads=2)
            assert Y.shape == (M, N)
            np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=tol, err_msg=f"{isa} M={M}")


def test_simd_equals_scalar_on_gpt2_shapes():
    rng = np.random.default_rng(7)
    for K, N in ((768, 2304), (3072, 768)):
        w = encode((rng.standard_normal((K, N)) * 0.02).astype(np.float32), bits=4, block_size=64)
        cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
        for M in (1, 5):
            A = rng.standard_normal((M, K)).astype(np.float32)
            ref = cpp.gemm(A, isa="scalar")
            for isa in SIMD:
                np.testing.assert_allclose(cpp.gemm(A, isa=isa, threads=2), ref, rtol=1e-5,
                                           atol=1e-5 * np.abs(ref).max())


def test_nan_and_inf_in_activations_propagate():
    w = encode(np.random.default_rng(8).standard_normal((64, 8)).astype(np.float32), bits=4)
    cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
    A = np.ones((3, 64), np.float32)
    A[1, 5] = np.nan
    A[2, 9] = np.inf
    for isa in ("scalar", *SIMD):
        Y = cpp.gemm(A, isa=isa)
        assert np.all(np.isfinite(Y[0])) and np.all(np.isnan(Y[1])) and not np.any(np.isfinite(Y[2]))


def test_gemm_rejects_wrong_activation_width():
    w = encode(np.ones((64, 8), np.float32), bits=4)
    cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
    with pytest.raises(ValueError, match="K=64"):
        cpp.gemm(np.ones((2, 65), np.float32))
    with pytest.raises(ValueError, match="unknown kernel ISA"):
        cpp.gemm(np.ones((2, 64), np.float32), isa="sse9")
    # the timed product tools/bench.py uses checks its input the same way
    with pytest.raises(ValueError, match="K=64"):
        cpp.gemm_seconds(np.ones((1, 65), np.float32))
    with pytest.raises(ValueError, match="accuracy_level=7"):
        cpp.gemm_seconds(np.ones((1, 64), np.float32), accuracy_level=7)
    assert 0 < cpp.gemm_seconds(np.ones((1, 64), np.float32), threads=2, accuracy_level=4) < 1


def quantize_int8_spec(A: np.ndarray, block_size: int):
    """FORMAT.md §2.1: per row and block, q = rint(a·127/amax) as int8, scale amax/127, and Σq per block."""
    M, K = A.shape
    nb = -(-K // block_size)
    padded = np.zeros((M, nb * block_size), np.float32)
    padded[:, :K] = A
    blocks = padded.reshape(M, nb, block_size)
    amax = np.abs(blocks).max(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(blocks * (np.float32(127) / amax).astype(np.float32)[..., None]).astype(np.float32)
    q = np.where(amax[..., None] > 0, q, 0).astype(np.int8)
    scale = np.where(amax > 0, amax / np.float32(127), 0).astype(np.float32)
    return q.reshape(M, -1), scale, q.astype(np.int32).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_int8_activation_path_matches_its_spec(bits):
    """accuracy_level=4: the exact product of the int8-quantized activations with the decoded weight."""
    rng = np.random.default_rng(bits)
    for block_size in (32, 64, 256):
        for K, N in ((77, 19), (1000, 33)):
            w = encode((rng.standard_normal((K, N)) * 0.05).astype(np.float32), bits=bits, block_size=block_size)
            cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
            D = decode(w).astype(np.float64)
            bias = rng.standard_normal(N).astype(np.float32)
            for M in (1, 3, 7, 64):
                A = rng.standard_normal((M, K)).astype(np.float32)
                q, scale, sums = _kernels.quantize_int8(A, block_size)
                q_spec, scale_spec, sums_spec = quantize_int8_spec(A, block_size)
                assert np.array_equal(q, q_spec) and np.array_equal(scale, scale_spec)
                assert np.array_equal(sums, sums_spec)
                nb = scale.shape[1]
                dequant = (q.reshape(M, nb, block_size) * scale[..., None].astype(np.float64)).reshape(M, -1)[:, :K]
                ref = dequant @ D + bias
                for isa in ("scalar", *SIMD):
                    Y = cpp.gemm(A, bias, isa=isa, threads=2, accuracy_level=4)
                    np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=isa)


# --- the center vector (FORMAT.md §5.1) -------------------------------------------------------------------

# binary16 patterns every decoder must widen exactly: ±0, the smallest and largest subnormal, the smallest
# normal, ±1 and ±max.
SPECIAL_ALPHAS = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF],
                          np.uint16).view(np.float16)


def with_center(w: RBEWeight, rng, scale: float = 0.05, specials: bool = False) -> RBEWeight:
    """w plus a random center (K float32) and a random binary16 alpha in every seed (bits 40-55)."""
    center = (rng.standard_normal(w.K) * scale).astype(np.float32)
    alpha = rng.uniform(-2, 2, w.seeds.shape).astype(np.float16)
    if specials:
        flat = alpha.reshape(-1)
        flat[: min(flat.size, SPECIAL_ALPHAS.size)] = SPECIAL_ALPHAS[: flat.size]
    seeds = np.ascontiguousarray(w.seeds).view(np.uint64) | (alpha_bits(alpha) << np.uint64(40))
    return dataclasses.replace(w, seeds=seeds.view(np.int64), center=center)


def kernel_weight(w: RBEWeight):
    return _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0, center=w.center,
                           outliers=w.outliers)


def center_term(w: RBEWeight) -> np.ndarray:
    """K x N float64: α of the block holding row k of column n, times c_k (the part §2.1 keeps in float)."""
    alpha = alpha_of(w)
    rows = np.arange(w.K) // w.block_size
    return alpha[:, rows].T.astype(np.float64) * w.center.astype(np.float64)[:, None]


def alpha_of(w: RBEWeight) -> np.ndarray:
    """[N, nb] float32 alphas from the seeds' bits 40-55."""
    bits16 = ((np.ascontiguousarray(w.seeds).view(np.uint64) >> np.uint64(40)) & np.uint64(0xFFFF)).astype(np.uint16)
    return bits16.view(np.float16).astype(np.float32)


@pytest.mark.parametrize("bits,block_size", [(2, 64), (3, 128), (4, 32), (4, 64), (5, 128), (6, 32), (8, 256),
                                             (3, 32)])
@pytest.mark.parametrize("K,N", [(300, 45), (64, 7), (1, 3)])
def test_cpp_decoder_with_center_is_bit_exact_with_numpy(bits, block_size, K, N):
    rng = np.random.default_rng(bits * 100 + block_size + K)
    w = with_center(encode((rng.standard_normal((K, N)) * 0.03).astype(np.float32), bits=bits,
                           block_size=block_size), rng, specials=True)
    got, want = kernel_weight(w).decode(), decode(w)
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("K,N", [(256, 48), (77, 19), (1000, 33), (1, 5)])
def test_gemm_with_center_matches_numpy_decode(bits, block_size, K, N):
    """Float path: A · decode(w) with the center term folded into the weight; int8 path (accuracy_level 4):
    the int8 product of the center-free weight plus the center term on the float activations (§2.1)."""
    rng = np.random.default_rng(bits * 1000 + block_size + K + 7)
    plain = encode((rng.standard_normal((K, N)) * 0.05).astype(np.float32), bits=bits, block_size=block_size)
    w = with_center(plain, rng)
    cpp = kernel_weight(w)
    D, D0, C = decode(w).astype(np.float64), decode(plain).astype(np.float64), center_term(w)
    bias = rng.standard_normal(N).astype(np.float32)
    for M in (1, 7, 64):
        A = rng.standard_normal((M, K)).astype(np.float32)
        ref = A.astype(np.float64) @ D + bias
        q, scale, _ = _kernels.quantize_int8(A, block_size)
        nb = scale.shape[1]
        dequant = (q.reshape(M, nb, block_size) * scale[..., None].astype(np.float64)).reshape(M, -1)[:, :K]
        ref_int8 = dequant @ D0 + A.astype(np.float64) @ C + bias
        for isa in ("scalar", *SIMD):
            Y = cpp.gemm(A, bias, isa=isa, threads=2)
            np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f"{isa} M={M}")
            Y = cpp.gemm(A, None, isa=isa, threads=2, accuracy_level=4)
            np.testing.assert_allclose(Y, ref_int8 - bias, rtol=1e-5, atol=1e-5 * np.abs(ref_int8).max(),
                                       err_msg=f"int8 {isa} M={M}")


def test_center_term_carries_the_product():
    """At GPT-2 width, the product with a center minus the product without (same codes and scales) is
    A · (α·c) on every ISA and both paths: the term is checked on its own, not only next to a larger product."""
    rng = np.random.default_rng(11)
    K, N = 768, 2304
    plain = encode((rng.standard_normal((K, N)) * 0.02).astype(np.float32), bits=4, block_size=64)
    w = with_center(plain, rng, scale=0.1)
    cpp, cpp0 = kernel_weight(w), kernel_weight(plain)
    C = center_term(w)
    for M in (1, 5):
        A = rng.standard_normal((M, K)).astype(np.float32)
        want = A.astype(np.float64) @ C
        for isa in ("scalar", *SIMD):
            for level in (0, 4):
                diff = cpp.gemm(A, isa=isa, threads=2, accuracy_level=level).astype(np.float64) \
                    - cpp0.gemm(A, isa=isa, threads=2, accuracy_level=level)
                np.testing.assert_allclose(diff, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                           err_msg=f"{isa} level {level} M={M}")


def test_nan_and_inf_in_activations_propagate_with_center():
    rng = np.random.default_rng(12)
    w = with_center(encode(rng.standard_normal((64, 8)).astype(np.float32), bits=4), rng)
    cpp = kernel_weight(w)
    A = np.ones((3, 64), np.float32)
    A[1, 5] = np.nan
    A[2, 9] = np.inf
    for isa in ("scalar", *SIMD):
        for level in (0, 4):
            Y = cpp.gemm(A, isa=isa, accuracy_level=level)
            assert np.all(np.isfinite(Y[0])) and np.all(np.isnan(Y[1])) and not np.any(np.isfinite(Y[2])), isa


def test_weight_rejects_bad_center_and_alpha():
    rng = np.random.default_rng(13)
    plain = encode(rng.standard_normal((100, 6)).astype(np.float32), bits=4, block_size=64)
    w = with_center(plain, rng)

    def make(seeds, center):
        return _kernels.Weight(seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0, center=center)

    make(plain.seeds, w.center)  # a center no block uses is valid
    with pytest.raises(ValueError, match=r"seed \[0, 0\]: alpha nonzero but the node has no center vector"):
        make(w.seeds, None)
    minus_zero = plain.seeds.copy()
    minus_zero.view(np.uint64)[2, 1] |= np.uint64(0x8000) << np.uint64(40)
    with pytest.raises(ValueError, match=r"seed \[2, 1\]: alpha nonzero"):
        make(minus_zero, None)
    for pattern in (0x7C00, 0xFC00, 0x7E00):
        bad = w.seeds.copy()
        u = bad.view(np.uint64)
        u[3, 0] = (u[3, 0] & ~(np.uint64(0xFFFF) << np.uint64(40))) | (np.uint64(pattern) << np.uint64(40))
        with pytest.raises(ValueError, match=r"seed \[3, 0\]: alpha is not finite"):
            make(bad, w.center)
    with pytest.raises(ValueError, match="center must hold K = 100 floats, got 99"):
        make(w.seeds, w.center[:-1])
    for value in (np.nan, np.inf, -np.inf):
        c = w.center.copy()
        c[40] = value
        with pytest.raises(ValueError, match="center holds NaN or Inf"):
            make(w.seeds, c)
