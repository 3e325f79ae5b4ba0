"""Exact outliers (FORMAT.md §5.2): the numpy codec, the C++ decoder and kernels, the ops, and what they buy."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rbe_onnx import _kernels, get_library_path
from rbe_onnx.codec import FormatError, decode
from rbe_onnx.codec.gptq import encode_gptq
from rbe_onnx.codec.outliers import BITS_PER_OUTLIER, pack_records, unpack_records
from rbe_onnx.codec.seed import unpack_seeds
from rbe_onnx.compressor import encode_weight
from test_codec import real_gpt2_weights
from test_kernels import SIMD, center_term, kernel_weight, with_center

SEED_COUNT_SHIFT = np.uint64(32)


def heavy_tailed(K: int, N: int, seed: int) -> np.ndarray:
    """Student-t weights with a few extreme values, like trained FFN output matrices."""
    rng = np.random.default_rng(seed)
    W = rng.standard_t(3, size=(K, N)) * 0.02
    W[rng.integers(0, K, 5), rng.integers(0, N, 5)] = 1.5
    return W.astype(np.float32)


def without_outliers(w):
    """The same codes and seeds with the outlier counts cleared: what the codes alone decode to."""
    u = w.seeds.view(np.uint64) & ~(np.uint64(0xFF) << SEED_COUNT_SHIFT)
    return dataclasses.replace(w, seeds=u.view(np.int64), outliers=None)


def test_records_round_trip():
    rows = np.array([0, 7, 255], np.uint8)
    values = np.array([1.5, -0.0009765625, 65504.0], np.float32)
    data = pack_records(rows, values)
    assert data.dtype == np.uint8 and data.tolist()[:3] == [0, 0x00, 0x3E]  # 1.5 = 0x3E00, little-endian
    got_rows, got_values = unpack_records(data)
    assert got_rows.tolist() == [0, 7, 255] and np.array_equal(got_values, values)


def test_real_gpt2_weights_keep_their_outliers_exactly(shared_data):
    """On real GPT-2 attention weights: the chosen weights decode to their binary16 values, the bits are
    counted (24 per outlier), and the error falls (0.182 -> 0.169 measured: GPT-2's attention weights are not
    very heavy-tailed, so about what 0.12 bits/weight more of codes would buy)."""
    W = real_gpt2_weights(shared_data)["decoder1/att.proj.w.dat"]
    H = np.eye(W.shape[0])
    plain = encode_gptq(W, H, bits=3, block_size=128)
    w = encode_gptq(W, H, bits=3, block_size=128, outlier_fraction=0.005)
    counts = unpack_seeds(w.seeds)["outliers"]
    n = int(counts.sum())
    assert abs(n - 0.005 * W.size) <= 0.001 * W.size and counts.max() <= 255
    assert w.outliers.size == 3 * n
    assert w.bits_per_weight == pytest.approx(plain.bits_per_weight + BITS_PER_OUTLIER * n / W.size)
    D, D0 = decode(w), decode(plain)
    kept = D != decode(without_outliers(w))
    assert kept.sum() >= 0.95 * n  # an outlier may land exactly on a level
    # Plain rounding (identity Hessian): an outlier is the weight itself, to binary16 precision.
    np.testing.assert_array_equal(D[kept], W[kept].astype(np.float16).astype(np.float32))
    err = lambda x: np.linalg.norm(x - W) / np.linalg.norm(W)  # noqa: E731
    # The kept weights are the tails (chosen per column block, so not strictly the largest overall).
    assert np.abs(W[kept]).mean() > 3 * np.abs(W).mean()
    assert err(D) < 0.95 * err(D0), (err(D), err(D0))


def test_outliers_cut_the_calibrated_error_of_a_heavy_tailed_weight():
    W = heavy_tailed(256, 96, 1)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((2048, 256)) * np.linspace(0.2, 3, 256)
    H = X.T @ X
    out_err = lambda w: np.linalg.norm(X @ (decode(w) - W)) / np.linalg.norm(X @ W)  # noqa: E731
    base = out_err(encode_gptq(W, H, bits=3, block_size=64))
    with_exact = out_err(encode_gptq(W, H, bits=3, block_size=64, outlier_fraction=0.01))
    assert with_exact < 0.8 * base, (with_exact, base)


@pytest.mark.parametrize("bits,block_size", [(2, 64), (3, 128), (3, 256), (4, 32), (8, 64)])
@pytest.mark.parametrize("K,N", [(300, 45), (77, 19)])
@pytest.mark.parametrize("center", [False, True])
def test_cpp_decoder_with_outliers_is_bit_exact_with_numpy(bits, block_size, K, N, center):
    rng = np.random.default_rng(bits * 100 + block_size + K)
    w = encode_weight(heavy_tailed(K, N, K + N), bits, block_size, outlier_fraction=0.03, center=False)
    if center:
        w = with_center(w, rng)
    assert w.outliers is not None
    got, want = kernel_weight(w).decode(), decode(w)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [32, 64, 256])
@pytest.mark.parametrize("K,N", [(256, 48), (77, 19), (1000, 33)])
def test_gemm_with_outliers_matches_numpy_decode(bits, block_size, K, N):
    """Float path: A · decode(w), outliers and center included. int8 path (§2.1, §5.2): the int8 product of
    what the codes decode to, plus the center term and the outliers' corrections on the float activations."""
    rng = np.random.default_rng(bits * 1000 + block_size + K + 3)
    w = with_center(encode_weight(heavy_tailed(K, N, K), bits, block_size, outlier_fraction=0.02, center=False),
                    rng)
    codes_only = without_outliers(w)
    cpp = kernel_weight(w)
    D = decode(w).astype(np.float64)
    D0 = decode(dataclasses.replace(codes_only, center=None, seeds=without_center(codes_only.seeds)))
    C = center_term(w)
    delta = D - decode(codes_only).astype(np.float64)
    bias = rng.standard_normal(N).astype(np.float32)
    for M in (1, 3, 7, 64):
        A = rng.standard_normal((M, K)).astype(np.float32)
        ref = A.astype(np.float64) @ D + bias
        q, scale, _ = _kernels.quantize_int8(A, block_size)
        nb = scale.shape[1]
        dequant = (q.reshape(M, nb, block_size) * scale[..., None].astype(np.float64)).reshape(M, -1)[:, :K]
        ref_int8 = dequant @ D0 + A.astype(np.float64) @ (C + delta)
        for isa in ("scalar", *SIMD):
            Y = cpp.gemm(A, bias, isa=isa, threads=2)
            np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f"{isa} M={M}")
            Y = cpp.gemm(A, None, isa=isa, threads=2, accuracy_level=4)
            np.testing.assert_allclose(Y, ref_int8, rtol=1e-5, atol=1e-5 * np.abs(ref_int8).max(),
                                       err_msg=f"int8 {isa} M={M}")


def without_center(seeds: np.ndarray) -> np.ndarray:
    return (seeds.view(np.uint64) & ~(np.uint64(0xFFFF) << np.uint64(40))).view(np.int64)


def bad_variants(w):
    """(description, seeds, records, message) for each §6 rule on outliers."""
    u = w.seeds.view(np.uint64)
    counts = unpack_seeds(w.seeds)["outliers"].reshape(-1)
    first = int(np.argmax(counts >= 2))  # a block with two outliers at least
    start = 3 * int(counts[:first].sum())
    n, b = divmod(first, w.seeds.shape[1])
    out = []
    data = w.outliers.copy()
    out.append(("short records", w.seeds, data[:-3], "outliers must hold"))
    data = w.outliers.copy()
    data[start] = 255
    out.append(("row past the block", w.seeds, data, "row past" if w.block_size < 256 else "ascending"))
    data = w.outliers.copy()
    data[start + 3] = data[start]
    out.append(("repeated row", w.seeds, data, "not strictly ascending"))
    data = w.outliers.copy()
    data[start + 1:start + 3] = [0x00, 0x7C]  # +Inf
    out.append(("infinite value", w.seeds, data, "not finite"))
    seeds = w.seeds.copy()
    seeds.view(np.uint64).reshape(-1)[first] = u.reshape(-1)[first] + (np.uint64(1) << SEED_COUNT_SHIFT)
    out.append(("count one too many", seeds, w.outliers, "outliers must hold"))
    return out, (n, b)


def test_bad_outliers_are_rejected_naming_the_problem():
    w = encode_weight(heavy_tailed(200, 30, 5), 4, 64, outlier_fraction=0.03, center=False)
    variants, _ = bad_variants(w)
    for what, seeds, data, message in variants:
        bad = dataclasses.replace(w, seeds=seeds, outliers=data)
        with pytest.raises(FormatError, match=message):
            bad.validate()
        with pytest.raises(ValueError, match=message):
            kernel_weight(bad)
    with pytest.raises(ValueError, match=r"outlier count nonzero but the node has no outliers input"):
        _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
    with pytest.raises(FormatError, match="outlier count nonzero but the node has no outliers input"):
        dataclasses.replace(w, outliers=None).validate()


def test_outlier_in_a_tail_position_is_rejected():
    w = encode_weight(heavy_tailed(70, 4, 6), 4, 64, outlier_fraction=0.05, center=False)  # K=70: tail of 6
    nb = w.seeds.shape[1]
    seeds = w.seeds.copy()
    u = seeds.view(np.uint64)
    u[:, :] &= ~(np.uint64(0xFF) << SEED_COUNT_SHIFT)
    u[0, nb - 1] |= np.uint64(1) << SEED_COUNT_SHIFT
    bad = dataclasses.replace(w, seeds=seeds, outliers=pack_records(np.array([10]), np.array([0.5])))
    with pytest.raises(FormatError, match="row past K = 70"):
        bad.validate()
    with pytest.raises(ValueError, match="row past K"):
        kernel_weight(bad)


def one_node_model(w, op: str, tmp_path):
    """RBEFusedGemm (A -> Y) or RBEGather (indices -> rows) over `w`, its outliers as the last input."""
    inits = [numpy_helper.from_array(w.codes, "codes"), numpy_helper.from_array(w.outliers, "outliers")]
    attrs = dict(K=w.K, N=w.N, block_size=w.block_size, bits=w.bits, scale0=w.scale0,
                 seeds=numpy_helper.from_array(w.seeds, "seeds"))
    if op == "RBEFusedGemm":
        node = helper.make_node(op, ["A", "codes", "", "", "", "outliers"], ["Y"], name="gemm", domain="ai.rbe",
                                **attrs)
        io = ([helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, w.K])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, w.N])])
    else:
        node = helper.make_node(op, ["ids", "codes", "", "", "outliers"], ["Y"], name="gather", domain="ai.rbe",
                                **attrs)
        io = ([helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, w.K])])
    model = helper.make_model(helper.make_graph([node], "g", *io, inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    model.ir_version = 10
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    return path


def test_ops_read_the_outliers_input(ort_session, tmp_path, shared_data):
    W = real_gpt2_weights(shared_data)["decoder12/att.value.w.dat"][:, :200]
    w = encode_weight(W, 3, 128, outlier_fraction=0.01, center=False)
    D = decode(w)
    A = np.random.default_rng(3).standard_normal((2, w.K)).astype(np.float32)
    gemm = ort_session(one_node_model(w, "RBEFusedGemm", tmp_path), custom_op_library=get_library_path())
    ref = A.astype(np.float64) @ D
    np.testing.assert_allclose(gemm.run(None, {"A": A})[0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    gather = ort_session(one_node_model(w, "RBEGather", tmp_path), custom_op_library=get_library_path())
    ids = np.array([0, 17, 199], np.int64)
    assert np.array_equal(gather.run(None, {"ids": ids})[0], D.T[ids])


def test_op_with_bad_outliers_fails_naming_the_node(tmp_path):
    import onnxruntime as ort

    w = encode_weight(heavy_tailed(128, 16, 9), 4, 64, outlier_fraction=0.03, center=False)
    bad = dataclasses.replace(w, outliers=w.outliers[:-3])
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    with pytest.raises(Exception, match=r"RBEFusedGemm.*gemm.*outliers must hold"):
        ort.InferenceSession(str(one_node_model(bad, "RBEFusedGemm", tmp_path)), so,
                             providers=["CPUExecutionProvider"])


def test_outliers_bring_3bit_minilm_closer_to_fp32(minilm_onnx_dir, tmp_path):
    """all-MiniLM-L6-v2's FFN outputs are heavy-tailed (layers.0.out: max/std 175). 3-bit/256 calibrated, mean
    cosine of the pooled embeddings of 64 WikiText-2 test paragraphs against fp32, with and without 0.5 %
    exact outliers (0.12 bits/weight more)."""
    from rbe_onnx import rewrite
    from rbe_onnx.compressor import totals
    from rbe_onnx.evaluate import embedding_cosine, wikitext_test_paragraphs
    from rbe_onnx.runtime import make_session

    feeds = wikitext_test_paragraphs(str(minilm_onnx_dir / "tokenizer.json"), 64)
    reference = make_session(minilm_onnx_dir, threads=2)
    cos, bpw = {}, {}
    for fraction in (0.0, 0.005):
        out = tmp_path / f"o{fraction}" / "model.onnx"
        _, rows = rewrite(minilm_onnx_dir / "model.onnx", out, bits=3, block_size=256, calibrate=True,
                          outlier_fraction=fraction, progress=False)
        cos[fraction] = embedding_cosine(make_session(out, threads=2), reference, feeds)["cos_mean"]
        bpw[fraction] = totals(rows)["bits_per_weight"]
    print(f"MiniLM 3b/256, 64 test paragraphs: mean cosine {cos} at bits/weight {bpw}")
    assert bpw[0.005] - bpw[0.0] == pytest.approx(0.005 * BITS_PER_OUTLIER, rel=0.05)
    assert 1 - cos[0.005] < 0.8 * (1 - cos[0.0])


def test_distillation_leaves_the_outliers_as_encoded(tiny_gpt2_onnx_dir, tmp_path):
    """Distillation trains block scales; an outlier's value is the weight itself and must not move."""
    from rbe_onnx import rewrite

    def outlier_tables(steps):
        out = tmp_path / f"d{steps}" / "model.onnx"
        rewrite(tiny_gpt2_onnx_dir / "model.onnx", out, bits=3, block_size=64, calibrate=True, outlier_fraction=0.01,
                distill_steps=steps, progress=False)
        model = onnx.load(str(out))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.name: inits[n.input[-1]] for n in model.graph.node
                if n.domain == "ai.rbe" and n.input[-1].endswith(".rbe_outliers")}

    before, after = outlier_tables(0), outlier_tables(3)
    assert before and before.keys() == after.keys()
    for name in before:
        assert np.array_equal(before[name], after[name]), name


def test_bad_outlier_fraction_is_refused(tiny_gpt2_onnx_dir, tmp_path):
    from rbe_onnx import rewrite

    for fraction in (-0.1, 0.2):
        with pytest.raises(ValueError, match=r"outlier fraction must be in \[0, 0.1\]"):
            rewrite(tiny_gpt2_onnx_dir / "model.onnx", tmp_path / "model.onnx", outlier_fraction=fraction,
                    progress=False)
    with pytest.raises(ValueError, match="leaves nothing for the codes"):
        rewrite(tiny_gpt2_onnx_dir / "model.onnx", tmp_path / "model.onnx", target_bpw=2.0, calibrate=True,
                outlier_fraction=0.1, progress=False)
