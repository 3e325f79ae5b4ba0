"""The numpy codec (the executable spec) and its agreement with the C++ decoder."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rbe_onnx import _kernels
from rbe_onnx.codec import FormatError, RBEWeight, decode, encode, matmulnbits_rtn
from rbe_onnx.codec.codebook import levels
from rbe_onnx.codec.packing import pack_codes, unpack_codes
from rbe_onnx.codec.seed import UNIFORM_THETA, pack_seeds, unpack_seeds


def real_gpt2_weights(shared_data) -> dict[str, np.ndarray]:
    """Attention weights of real GPT-2 124M layers 0 and 11 (big-endian float32, [in, out])."""
    root = shared_data / "gpt2_124m_partial_huplay"
    names = [f"{layer}/att.{proj}.w.dat" for layer in ("decoder1", "decoder12")
             for proj in ("query", "key", "value", "proj")]
    return {n: np.fromfile(root / n, dtype=">f4").astype(np.float32).reshape(768, 768) for n in names}


def test_seed_fields_round_trip():
    rng = np.random.default_rng(0)
    rho, theta = rng.integers(0, 1 << 16, 100), rng.integers(0, 16, 100)
    offset = rng.integers(-128, 128, 100)
    alpha = rng.standard_normal(100).astype(np.float16)
    f = unpack_seeds(pack_seeds(rho, theta, offset, 3, alpha=alpha))
    assert np.array_equal(f["rho"], rho) and np.array_equal(f["theta"], theta)
    assert np.array_equal(f["offset"], offset) and np.all(f["width"] == 3)
    assert np.array_equal(f["alpha"], alpha.astype(np.float32))
    assert np.all(f["tag"] == 0xB2) and not f["outliers"].any()
    assert not unpack_seeds(pack_seeds(rho, theta, offset, 3))["alpha"].view(np.uint32).any()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("block_size", [32, 64, 128, 256])
def test_packing_round_trip(bits, block_size):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (7, block_size)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, block_size * bits // 8)
    assert np.array_equal(unpack_codes(packed, bits), codes)


def _hand_block(block_size: int, codes: dict[int, int], nbytes: dict[int, int]):
    """(a block of zero codes but `codes` {index: code}, the expected packed bytes: zero but `nbytes`)."""
    c = np.zeros(block_size, np.uint8)
    for i, v in codes.items():
        c[i] = v
    expected = np.zeros(block_size * 3 // 8, np.uint8)
    for j, v in nbytes.items():
        expected[j] = v
    return c, expected


# FORMAT.md §4, 3 bits, worked by hand: a chunk of C = min(block_size, 128) codes is a low plane of C/4 bytes
# (byte j: low bits of codes j, j+C/4, j+C/2, j+3C/4 in bits 0-1, 2-3, 4-5, 6-7) and a high plane of C/8
# bytes (bit i of byte j: bit 2 of code j + i·C/8).
HAND_3BIT = [
    # C = 32. code 5 = 0b111: low 3 in byte 5 bits 0-1; high in byte 8 + 1 (5 = 1 + 4·1), bit 1.
    # code 17 = 0b010: low 2 in byte 1 (17 = 1 + 8·2) bits 4-5. code 30 = 0b100: byte 8 + 2 (30 = 2 + 4·7), bit 7.
    (32, {5: 7, 17: 2, 30: 4}, {5: 3, 1: 2 << 4, 9: 1 << 1, 10: 1 << 7}),
    # C = 64. code 63 = 0b111: low 3 in byte 15 (63 = 15 + 16·3) bits 6-7; high in byte 16 + 7 (63 = 7 + 8·7),
    # bit 7. code 9 = 0b100: byte 16 + 1 (9 = 1 + 8·1), bit 1.
    (64, {63: 7, 9: 4}, {15: 3 << 6, 23: 1 << 7, 17: 1 << 1}),
    # C = 128. code 0 = 0b101: byte 0 bit 0, byte 32 bit 0. code 40 = 0b011: byte 8 (40 = 8 + 32·1) bits 2-3.
    # code 77 = 0b110: low 2 in byte 13 (77 = 13 + 32·2) bits 4-5, high in byte 32 + 13 (77 = 13 + 16·4) bit 4.
    # code 127 = 0b111: byte 31 bits 6-7, byte 32 + 15 (127 = 15 + 16·7) bit 7.
    (128, {0: 5, 40: 3, 77: 6, 127: 7}, {0: 1, 32: 1, 8: 3 << 2, 13: 2 << 4, 45: 1 << 4, 31: 3 << 6, 47: 1 << 7}),
    # block 256: two chunks of 128, the second from byte 48 (codes 128 + 77 and 128 + 127 as above).
    (256, {205: 6, 255: 7}, {48 + 13: 2 << 4, 48 + 45: 1 << 4, 48 + 31: 3 << 6, 48 + 47: 1 << 7}),
]


@pytest.mark.parametrize("block_size,codes,nbytes", HAND_3BIT)
def test_3bit_layout_by_hand(block_size, codes, nbytes):
    c, expected = _hand_block(block_size, codes, nbytes)
    assert pack_codes(c[None], 3)[0].tolist() == expected.tolist()
    assert np.array_equal(unpack_codes(expected[None], 3)[0], c)
    # The C++ decoder reads the same bytes as the same codes: one column of one block, uniform levels, d = 1.
    w = RBEWeight(K=block_size, N=1, bits=3, block_size=block_size, scale0=1.0,
                  seeds=pack_seeds(np.zeros((1, 1)), UNIFORM_THETA, 0, 3), codes=expected)
    L = levels(3, UNIFORM_THETA).astype(np.float32)
    assert np.array_equal(decode(w)[:, 0], L[c])
    cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
    assert np.array_equal(cpp.decode()[:, 0], L[c])


def test_format1_seeds_are_refused_with_the_rewrite_hint():
    """Tag 0xB1 is format 1, whose 3-bit layout differs: both decoders refuse it and say what to do."""
    seeds = np.ascontiguousarray(_weight().seeds).view(np.uint64)
    w = _weight(seeds=((seeds & np.uint64((1 << 56) - 1)) | np.uint64(0xB1 << 56)).view(np.int64))
    with pytest.raises(FormatError, match=r"seed \[0, 0\]: tag 0xB1: a format-1 file.*rbe-onnx rewrite"):
        decode(w)
    with pytest.raises(ValueError, match=r"format-1 file.*rbe-onnx rewrite"):
        _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)


def test_level_tables_match_cpp_and_are_distinct():
    for bits in (2, 3, 4):
        for theta in range(16):
            table = levels(bits, theta)
            assert list(table) == _kernels.level_table(bits, theta)
            assert len(set(table.tolist())) == len(table), (bits, theta)
            assert table.min() == -127 and table.max() == 127
    for bits in (5, 6, 8):  # one uniform table: L + 128 is the code shifted to 8 bits, centred in its step
        table = levels(bits, UNIFORM_THETA)
        assert list(table) == _kernels.level_table(bits, UNIFORM_THETA)
        step = 1 << (8 - bits)
        assert np.array_equal(table + 128, np.arange(1 << bits) * step + step // 2 * (bits < 8))
        with pytest.raises(ValueError, match="uniform codebook"):
            levels(bits, UNIFORM_THETA + 1)


@pytest.mark.parametrize("bits,block_size", [(2, 64), (3, 32), (3, 64), (3, 128), (3, 256), (4, 32), (4, 64),
                                             (5, 32), (5, 128), (6, 64), (6, 256), (8, 256)])
def test_cpp_decoder_is_bit_exact_with_numpy(bits, block_size):
    W = np.random.default_rng(1).standard_normal((300, 45)).astype(np.float32) * 0.03
    w = encode(W, bits=bits, block_size=block_size)
    cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
    assert np.array_equal(cpp.decode(), decode(w))


def test_encode_error_shrinks_with_bits():
    W = np.random.default_rng(2).standard_normal((512, 64)).astype(np.float32)
    errors = [np.mean((decode(encode(W, bits=b, block_size=64)) - W) ** 2) for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4 * np.mean(W ** 2)  # 8 bits: ~ (range/255)^2 / 12


def test_bits_per_weight_counts_seeds_codes_and_scale0():
    w = encode(np.ones((128, 10), np.float32), bits=3, block_size=64)
    assert w.nbytes == 10 * 2 * 8 + 10 * 128 * 3 // 8 + 4
    assert w.bits_per_weight == pytest.approx(3 + 64 / 64 + 32 / (128 * 10))


@pytest.mark.parametrize("rbe,rtn", [((4, 64), (4, 32)), ((4, 128), (4, 64)), ((3, 128), (3, 64))])
def test_non_uniform_codebook_beats_matmulnbits_rtn_on_real_gpt2(shared_data, rbe, rtn):
    """At equal or lower bits/weight (all overhead counted) RBE has lower weight MSE than ORT-style RTN,
    summed over the eight real GPT-2 attention matrices."""
    rbe_err = rtn_err = 0.0
    for W in real_gpt2_weights(shared_data).values():
        w = encode(W, bits=rbe[0], block_size=rbe[1])
        deq, rtn_bpw = matmulnbits_rtn(W, bits=rtn[0], block_size=rtn[1])
        assert w.bits_per_weight <= rtn_bpw
        rbe_err += float(np.sum((decode(w) - W) ** 2))
        rtn_err += float(np.sum((deq - W) ** 2))
    print(f"RBE {rbe} {rbe_err:.4f} vs RTN {rtn} {rtn_err:.4f}: {rbe_err / rtn_err:.3f}x")
    assert rbe_err < 0.97 * rtn_err


def test_codebook_shape_search_uses_many_angles(shared_data):
    W = real_gpt2_weights(shared_data)["decoder1/att.query.w.dat"]
    theta = unpack_seeds(encode(W, bits=4, block_size=64).seeds)["theta"]
    assert len(np.unique(theta)) >= 6  # real blocks differ in shape; one fixed grid would not fit them all


def _weight(**changes) -> RBEWeight:
    w = encode(np.random.default_rng(3).standard_normal((100, 8)).astype(np.float32), bits=4, block_size=64)
    fields = dict(K=w.K, N=w.N, bits=w.bits, block_size=w.block_size, scale0=w.scale0, seeds=w.seeds,
                  codes=w.codes)
    fields.update(changes)
    return RBEWeight(**fields)


@pytest.mark.parametrize("change,message", [
    (dict(bits=7), "bits=7 unsupported"),
    (dict(block_size=48), "block_size=48 unsupported"),
    (dict(K=0), "K=0 out of range"),
    (dict(scale0=float("nan")), "scale0"),
    (dict(codes=np.zeros(10, np.uint8)), "codes must be uint8 1-D of 512 bytes"),
    (dict(seeds=np.zeros((8, 2), np.int64)), "tag is not 0xB2"),
    (dict(seeds=np.zeros((8, 3), np.int64)), "seeds must be int64 of shape [8, 2]"),
])
def test_invalid_weights_are_rejected_by_both_decoders(change, message):
    w = _weight(**change)
    with pytest.raises(FormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode(w)
    with pytest.raises(ValueError):
        _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)


def test_encode_rejects_non_finite_weights():
    W = np.ones((64, 4), np.float32)
    W[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode(W)


def test_center_vector_cuts_the_token_embedding_error(shared_data):
    """FORMAT.md §5.1 on real data: the reference GPT-2's token table shares one strong direction, so coding
    each block's residual from it (α·c) leaves far less error than coding the table as it is."""
    from safetensors.numpy import load_file

    from rbe_onnx.codec.center import center_term, fit_center
    from rbe_onnx.compressor import encode_weight

    table = load_file(str(shared_data / "ref-gpt2" / "model.safetensors"))["transformer.wte.weight"]
    W = np.ascontiguousarray(table[:8192].T)  # 8192 entries keep it quick
    centered, plain = encode_weight(W, 3, 256), encode_weight(W, 3, 256, center=False)
    assert centered.center is not None and plain.center is None
    err = lambda w: np.linalg.norm(decode(w) - W) / np.linalg.norm(W)  # noqa: E731
    print(f"3b/256 relative error: centered {err(centered):.4f}, plain {err(plain):.4f}")
    assert err(centered) < 0.5 * err(plain)
    assert centered.bits_per_weight - plain.bits_per_weight == pytest.approx(32 / W.shape[1], abs=1e-9)
    # decode = the residual's decode + the center term, as the spec writes it (float32 sum)
    c, alpha, removed = fit_center(W, 256)
    assert removed > 0.5
    # --target-bpw hands the allocation's fits to the encoder: the same encoding, without fitting again; and a
    # fit that removes nothing is taken as given (no center), so the handed-over fit is the one used
    reused = encode_weight(W, 3, 256, center_fits={256: (c, alpha, removed)})
    np.testing.assert_array_equal(reused.codes, centered.codes)
    np.testing.assert_array_equal(reused.seeds, centered.seeds)
    assert encode_weight(W, 3, 256, center_fits={256: (0 * c, 0 * alpha, 0.0)}).center is None
    residual = dataclasses.replace(centered, center=None, seeds=np.ascontiguousarray(
        (centered.seeds.view(np.uint64) & ~(np.uint64(0xFFFF) << np.uint64(40))).view(np.int64)))
    np.testing.assert_array_equal(decode(centered), decode(residual) + center_term(c, alpha, W.shape[0], 256))


def test_center_is_taken_only_where_it_lowers_the_error(shared_data):
    """Most real projection weights have no strong common direction and get no center; the one that does (layer
    11's attention output, with GPT-2's outlier channels) is coded better with it."""
    from rbe_onnx.compressor import encode_weight

    used = []
    for name, W in real_gpt2_weights(shared_data).items():
        centered = encode_weight(W, 4, 64)
        if centered.center is not None:
            plain = encode_weight(W, 4, 64, center=False)
            assert np.linalg.norm(decode(centered) - W) < np.linalg.norm(decode(plain) - W), name
            used.append(name)
    assert 0 < len(used) <= 2, used


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_uniform_widths_refuse_another_theta(bits):
    """5-, 6- and 8-bit codes have one table (§5): a seed with theta != 4 is refused by both decoders."""
    w = encode(np.random.default_rng(bits).standard_normal((64, 3)).astype(np.float32), bits=bits, block_size=32)
    fields = unpack_seeds(w.seeds)
    fields["theta"][1, 0] = UNIFORM_THETA + 1
    bad = dataclasses.replace(w, seeds=pack_seeds(fields["rho"], fields["theta"], fields["offset"], bits))
    with pytest.raises(ValueError, match=f"theta != {UNIFORM_THETA} with {bits}-bit codes"):
        decode(bad)
    with pytest.raises(ValueError, match="theta != 4 with 5-, 6- or 8-bit codes"):
        _kernels.Weight(bad.seeds, bad.codes, bad.K, bad.N, bad.block_size, bad.bits, bad.scale0)
