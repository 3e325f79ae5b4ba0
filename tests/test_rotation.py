"""The input rotation of FORMAT.md §5.3: the numpy spec, the C++ kernels against it, and what it buys."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from rbe_onnx import _kernels
from rbe_onnx.codec import RBEWeight, decode
from rbe_onnx.codec.packing import pack_codes
from rbe_onnx.codec.rotation import Rotation, block_for, hadamard_matrix, signs, splitmix64
from rbe_onnx.codec.seed import TAG, TAG_ROTATED, UNIFORM_THETA, FormatError, pack_seeds, with_tag
from rbe_onnx.compressor import encode_weight
from rbe_onnx.library import get_library_path
from test_codec import real_gpt2_weights
from test_kernels import SIMD, quantize_int8_spec

ALL_ISAS = ("scalar", *SIMD)


def kernel_weight(w):
    return _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0, center=w.center,
                           outliers=w.outliers, rotation=w.rotation, rotation_seed=w.rotation_seed)


def rotated_weight(K: int, N: int, bits: int, block_size: int, rotation: Rotation, rng, **kw):
    W = (rng.standard_t(3, size=(K, N)) * 0.02).astype(np.float32)
    return encode_weight(W, bits, block_size, rotation=rotation, **kw)


def test_splitmix64_and_the_sign_layout():
    # splitmix64's published first outputs from state 0
    assert splitmix64(0, 2) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    word = splitmix64(99, 2)
    s = signs(99, 100)
    expected = [-1.0 if (word[k // 64] >> (k % 64)) & 1 else 1.0 for k in range(100)]
    assert s.tolist() == expected
    assert 35 < (s < 0).sum() < 65  # about half negative


def test_rotation_is_orthogonal_and_keeps_the_product():
    rng = np.random.default_rng(0)
    B = hadamard_matrix(16)
    np.testing.assert_allclose(B @ B, np.eye(16), atol=1e-12)
    rot = Rotation(64, 2 ** 64 - 1)
    W = rng.standard_normal((192, 10))
    A = rng.standard_normal((5, 192)).astype(np.float32)
    np.testing.assert_allclose(rot.unrotate(rot.weight(W)), W, atol=1e-12)
    np.testing.assert_allclose(rot.activations(A).astype(np.float64) @ rot.weight(W), A.astype(np.float64) @ W,
                               atol=1e-4)
    H = A.T.astype(np.float64) @ A
    Ar = rot.activations(A).astype(np.float64)
    np.testing.assert_allclose(rot.hessian(H), Ar.T @ Ar, atol=1e-4)


def test_block_choice():
    assert block_for(768) == 256 and block_for(384) == 128 and block_for(3072) == 256
    assert block_for(77) == 0 and block_for(6) == 2 and block_for(4096, 4096) == 4096


@pytest.mark.parametrize("bits,block_size,K,R", [(3, 128, 384, 128), (4, 64, 256, 256), (2, 32, 96, 32),
                                                 (8, 64, 100, 4), (3, 256, 6, 2)])
def test_cpp_matches_the_spec_on_rotated_weights(bits, block_size, K, R):
    """Decoder bit-exact with numpy (Q·W included); every ISA's float product within §2.1's tolerance of
    A·decode(w), with a center and outliers on top of the rotation."""
    rng = np.random.default_rng(K + R)
    N = 37
    w = rotated_weight(K, N, bits, block_size, Rotation(R, int(rng.integers(0, 2 ** 63)) * 2 + 1), rng,
                       H=np.eye(K), outlier_fraction=0.02)
    assert w.rotation == R and w.outliers is not None
    cpp = kernel_weight(w)
    D = decode(w)
    assert np.array_equal(cpp.decode(), D)
    bias = rng.standard_normal(N).astype(np.float32)
    for M in (1, 3, 9):
        A = rng.standard_normal((M, K)).astype(np.float32)
        ref = A.astype(np.float64) @ D + bias
        for isa in ALL_ISAS:
            Y = cpp.gemm(A, bias, isa=isa, threads=2)
            np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=isa)


def identity_weight(K: int, rotation: Rotation) -> RBEWeight:
    """K x K 8-bit codes decoding to exactly the identity (d = s0 = 1, level 1 on the diagonal, 0 elsewhere), with
    a rotation: its float product is A·Q with no rounding of its own."""
    nb = -(-K // 64)
    codes = np.full((K, nb * 64), 128, np.uint8)  # level 0
    codes[np.arange(K), np.arange(K)] = 129       # level 1
    seeds = with_tag(pack_seeds(np.zeros((K, nb), np.int64), UNIFORM_THETA, 0, 8), TAG_ROTATED)
    return RBEWeight(K=K, N=K, bits=8, block_size=64, scale0=1.0, seeds=seeds,
                     codes=pack_codes(codes.reshape(K * nb, 64), 8).reshape(-1), rotation=rotation.block,
                     rotation_seed=rotation.seed)


@pytest.mark.parametrize("K,R", [(256, 256), (384, 128), (64, 8), (64, 4), (32, 2), (4096, 4096)])
def test_every_isa_rotates_activations_bit_for_bit_as_the_spec(K, R):
    """A·Q through a weight that is exactly the identity: each kernel's output is its rotation of A, which must
    equal the numpy spec's to the bit (the int8 path quantizes A·Q, so any difference would change its codes)."""
    rot = Rotation(R, 0xDEADBEEF12345678)
    w = identity_weight(K, rot)
    assert np.array_equal(decode(dataclasses.replace(w, seeds=with_tag(w.seeds, TAG), rotation=0)), np.eye(K))
    A = (np.random.default_rng(K + R).standard_normal((5, K)) * np.logspace(-3, 3, K)).astype(np.float32)
    spec = rot.activations(A)
    cpp = kernel_weight(w)
    for isa in ALL_ISAS:
        assert np.array_equal(cpp.gemm(A, isa=isa, threads=2), spec), isa


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_path_quantizes_the_rotated_activations(bits):
    """accuracy_level=4 with a rotation: §2.1's quantization applies to A·Q, which the kernels compute bit for
    bit as the numpy spec does, so their int8 activations are the spec's exactly."""
    rng = np.random.default_rng(bits)
    K, N, bs = 512, 29, 64
    rot = Rotation(256, 12345)
    w = rotated_weight(K, N, bits, bs, rot, rng, center=False)  # §2.1 keeps a center term in float
    stored = decode(dataclasses.replace(w, seeds=with_tag(w.seeds, TAG), rotation=0, rotation_seed=0))
    stored = stored.astype(np.float64)
    cpp = kernel_weight(w)
    for M in (1, 4, 33):
        A = rng.standard_normal((M, K)).astype(np.float32)
        A[:, 5] *= 40  # an outlier channel, which the rotation spreads
        q, scale, _ = quantize_int8_spec(rot.activations(A), bs)
        dequant = (q.reshape(M, -1, bs) * scale[..., None].astype(np.float64)).reshape(M, -1)
        ref = dequant @ stored
        for isa in ALL_ISAS:
            Y = cpp.gemm(A, isa=isa, threads=2, accuracy_level=4)
            np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=isa)


@pytest.mark.parametrize("R,message", [(3, "power of two"), (48, "power of two"), (8192, "power of two"),
                                       (256, "dividing K=384"), (-2, "power of two")])
def test_bad_rotations_are_refused_by_both_decoders(R, message):
    w = rotated_weight(384, 4, 4, 64, Rotation(128, 1), np.random.default_rng(1))
    bad = dataclasses.replace(w, rotation=R, rotation_seed=1)
    with pytest.raises(FormatError, match=message):
        decode(bad)
    with pytest.raises(ValueError, match="attribute 'rotation'"):
        kernel_weight(bad)


def test_rotated_seeds_and_the_rotation_attribute_go_together():
    """A rotated node's seeds carry tag 0xB3, so a reader that drops or ignores the rotation attribute refuses
    the node instead of computing another product; 0xB2 seeds with a rotation are refused too."""
    w = rotated_weight(128, 4, 3, 64, Rotation(64, 3), np.random.default_rng(2))
    without = dataclasses.replace(w, rotation=0, rotation_seed=0)
    with pytest.raises(FormatError, match="tag 0xB3.*no 'rotation'"):
        decode(without)
    with pytest.raises(ValueError, match="tag 0xB3.*no 'rotation'"):
        kernel_weight(without)
    untagged = dataclasses.replace(w, seeds=with_tag(w.seeds, TAG))
    with pytest.raises(FormatError, match="tag 0xB2 in a node with a 'rotation'"):
        decode(untagged)
    with pytest.raises(ValueError, match="tag 0xB2 in a node with a 'rotation'"):
        kernel_weight(untagged)


def test_rotation_lowers_the_error_of_real_gpt2_weights(shared_data):
    """On the real GPT-2 attention matrices (heavy-tailed rows) a rotation lowers the 3-bit/128 coding error of
    the product, Σ ‖X·(W − Ŵ)‖², for inputs with GPT-2-like outlier channels."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2048, 768))
    X[:, rng.choice(768, 6, replace=False)] *= 20
    H = X.T @ X
    weights = real_gpt2_weights(shared_data).values()

    def product_error(rot):
        total = 0.0
        for W in weights:
            E = decode(encode_weight(W, 3, 128, H, rotation=rot)).astype(np.float64) - W
            total += float(np.einsum("kn,kn->", E, H @ E))
        return total

    plain, rotated = product_error(None), product_error(Rotation(256, 7))
    print(f"3-bit/128: plain {plain:.1f}, rotated {rotated:.1f}: {rotated / plain:.3f}x")
    assert rotated < 0.85 * plain


def _node_model(w, op_type: str = "RBEFusedGemm", **extra) -> onnx.ModelProto:
    codes = numpy_helper.from_array(w.codes, "codes")
    attrs = dict(K=w.K, N=w.N, block_size=w.block_size, bits=w.bits, scale0=float(w.scale0),
                 seeds=numpy_helper.from_array(w.seeds, "seeds"), **extra)
    if op_type == "RBEGather":
        inp = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])
        node = helper.make_node(op_type, ["ids", "codes"], ["Y"], domain="ai.rbe", name="n0", **attrs)
    else:
        inp = helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [None, w.K])
        node = helper.make_node(op_type, ["A", "codes"], ["Y"], domain="ai.rbe", name="n0", **attrs)
    graph = helper.make_graph([node], "g", [inp], [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
                              initializer=[codes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)],
                             ir_version=10)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def test_ort_op_reads_the_rotation_attributes():
    rng = np.random.default_rng(5)
    seed = 2 ** 64 - 12345  # a seed with the top bit set travels as a negative int64 attribute
    w = rotated_weight(256, 16, 4, 64, Rotation(128, seed), rng, center=False)
    signed = seed - 2 ** 64
    A = rng.standard_normal((3, 256)).astype(np.float32)
    Y = _session(_node_model(w, rotation=128, rotation_seed=signed)).run(None, {"A": A})[0]
    ref = A.astype(np.float64) @ decode(w)
    np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the same node without its rotation attributes is refused, naming the seed's tag
    with pytest.raises(Exception, match=r"RBEFusedGemm node 'n0'.*tag 0xB3"):
        _session(_node_model(w))


def test_ort_op_names_a_bad_rotation_and_a_rotated_gather():
    w = rotated_weight(96, 8, 4, 32, Rotation(32, 9), np.random.default_rng(2), center=False)
    with pytest.raises(Exception, match=r"RBEFusedGemm node 'n0'.*rotation'=64 must be 0 or a power of two"):
        _session(_node_model(w, rotation=64, rotation_seed=1))
    with pytest.raises(Exception, match=r"RBEGather node 'n0'.*RBEFusedGemm only"):
        _session(_node_model(w, "RBEGather", rotation=32, rotation_seed=1))


def test_distillation_sees_the_rotated_weight_as_decoded():
    """--distill rebuilds each weight from its trainable scales in torch; with a rotation (and a center and
    outliers) that rebuild must be the weight the op computes with, decode(w)."""
    from rbe_onnx.distill import _student_parts, _student_weight

    rng = np.random.default_rng(4)
    W = (rng.standard_normal((256, 24)) * 0.02).astype(np.float32)
    W[:, :3] += 0.05  # a shared direction, so the weight takes a center
    w = encode_weight(W, 3, 64, np.eye(256), rotation=Rotation(128, 77), outlier_fraction=0.02)
    assert w.rotation and w.center is not None and w.outliers is not None
    rebuilt = _student_weight(w, *_student_parts(w)).detach().numpy()
    np.testing.assert_allclose(rebuilt, decode(w), rtol=1e-5, atol=1e-6)


def test_rewrite_rotates_projections_and_keeps_8bit_gpt2_exact(ort_session, tmp_path, tiny_gpt2_onnx_dir):
    """`rewrite(rotate=True)` on GPT-2: every Gemm gets a rotation, the table tied to the logits (gathered as
    well) none; at 8 bits the rotated model still matches fp32 through ORT."""
    from rbe_onnx import get_library_path, read_report
    from test_rewrite import assert_matches_8bit, gpt2_logits, rewritten
    from rbe_onnx.runtime.feeds import Gpt2Shape

    out = rewritten(tiny_gpt2_onnx_dir, tmp_path, bits=8, rotate=True)
    rows = [r for r in read_report(out) if r.status == "rbe"]
    gemms = [r for r in rows if r.op_type == "Gemm"]
    assert gemms and all(r.rotation == 64 for r in gemms if r.shape.startswith("64 "))
    assert all(r.rotation == 256 for r in gemms if r.shape.startswith("256 "))
    assert all(r.rotation == 0 for r in rows if r.op_type in ("Gather", "MatMul"))
    shape = Gpt2Shape.from_dir(tiny_gpt2_onnx_dir)
    ids = np.array([[464, 2068, 7586, 21831, 18045], [464, 318, 257, 1332, 13]], dtype=np.int64)
    ref = gpt2_logits(ort_session, tiny_gpt2_onnx_dir, shape, ids)
    got = gpt2_logits(ort_session, out, shape, ids, lib=get_library_path())
    assert_matches_8bit(ref, got, "tiny GPT-2 logits, rotated")


def test_rotation_improves_calibrated_3bit_minilm(ort_session, tmp_path, minilm_onnx_dir):
    """Real weights, real text: MiniLM's projections at 3-bit/128 with error feedback (embeddings fp32),
    pooled embeddings of 64 WikiText-2 test paragraphs against fp32. The rotation must remove at least a
    quarter of the loss (measured on valid paragraphs: 1 − cos 0.065 -> 0.037)."""
    from rbe_onnx import get_library_path, rewrite
    from rbe_onnx.evaluate import wikitext_test_paragraphs
    from test_rewrite import cosine

    feeds = wikitext_test_paragraphs(str(minilm_onnx_dir / "tokenizer.json"), 64)
    m = feeds["attention_mask"][..., None]
    pooled = lambda x: (x * m).sum(1) / m.sum(1)  # noqa: E731
    ref = pooled(ort_session(minilm_onnx_dir).run(None, feeds)[0])
    loss = {}
    for rotate in (False, True):
        out = tmp_path / f"r{int(rotate)}" / "model.onnx"
        rewrite(minilm_onnx_dir / "model.onnx", out, bits=3, block_size=128, calibrate=True, calibration_tokens=2048,
                embeddings=False, progress=False, rotate=rotate)
        got = pooled(ort_session(out, custom_op_library=get_library_path()).run(None, feeds)[0])
        loss[rotate] = float(1 - cosine(ref, got).mean())
    print(f"MiniLM 3-bit/128 calibrated, 1 - cos: plain {loss[False]:.4f}, rotated {loss[True]:.4f}")
    assert loss[True] < 0.75 * loss[False]
