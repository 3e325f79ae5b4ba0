"""Every kernel ISA against the scalar reference and the numpy decoder (FORMAT.md is the contract)."""
from __future__ import annotations

import numpy as np
import pytest

from rbe_onnx import _kernels
from rbe_onnx.codec import decode, encode

SIMD = [isa for isa in ("avx2", "avxvnni", "neon") if _kernels.isa_available(isa)]


def test_this_machine_has_a_simd_kernel():
    assert SIMD, "no SIMD kernel available: the CI machine has AVX2+FMA"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
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
