"""A malformed RBEFusedGemm node gives a clear ORT error naming the node and the problem, never a crash."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rbe_onnx import get_library_path
from rbe_onnx.codec import decode, encode
from rbe_onnx.codec.seed import alpha_bits, pack_seeds

K, N = 100, 24


def build(tmp_path, *, codes_as_input=False, drop=(), inputs=None, **attr_changes):
    w = encode(np.random.default_rng(0).standard_normal((K, N)).astype(np.float32), bits=4, block_size=64)
    attrs = dict(K=K, N=N, block_size=64, bits=4, scale0=float(w.scale0),
                 seeds=numpy_helper.from_array(w.seeds, "seeds"))
    attrs.update(attr_changes)
    for name in drop:
        attrs.pop(name)
    codes = numpy_helper.from_array(attrs.pop("codes", w.codes), "codes")
    node = helper.make_node("RBEFusedGemm", inputs or ["A", "codes"], ["Y"], name="bad_node", domain="ai.rbe",
                            **attrs)
    graph_inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", "k"])]
    if codes_as_input:
        graph_inputs.append(helper.make_tensor_value_info("codes", TensorProto.UINT8, [len(w.codes)]))
    return save_one_node(tmp_path / "m.onnx", node, graph_inputs, [] if codes_as_input else [codes])


def save_one_node(path, node, graph_inputs: list, initializers: list) -> str:
    """A model of `node` alone (output "Y"), saved at `path`; returns the path as a string."""
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())
    return str(path)


def session(path):
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(drop=("seeds",)), "missing attribute 'seeds'"),
    (dict(drop=("K",)), "attribute 'K'"),
    (dict(bits=7), "bits=7 unsupported"),
    (dict(block_size=48), "block_size=48 unsupported"),
    (dict(K=0), "K=0 out of range"),
    (dict(N=-3), "N=-3 out of range"),
    (dict(K=1 << 40), "out of range"),
    (dict(scale0=float("inf")), "scale0"),
    (dict(seeds=numpy_helper.from_array(np.zeros((N, 2), np.int64), "seeds")), "tag is not 0xB2"),
    (dict(seeds=numpy_helper.from_array(pack_seeds(np.zeros((N, 2)), 0, 0, 4) ^ np.int64(0x03 << 56), "seeds")),
     "tag 0xB1: a format-1 file (its 3-bit code layout is not format 2's); re-run `rbe-onnx rewrite`"),
    (dict(seeds=numpy_helper.from_array(np.zeros((N, 2), np.int32), "seeds")), "INT64"),
    (dict(seeds=numpy_helper.from_array(pack_seeds(np.zeros((N, 3)), 0, 0, 4), "seeds")), "seeds must hold N*nb = 24*2 = 48 values, got 72"),
    (dict(seeds=numpy_helper.from_array(pack_seeds(np.zeros((N, 2)), 0, 0, 3), "seeds")), "width field"),
    (dict(codes=np.zeros(17, np.uint8)), "codes must hold 1536 bytes"),
    (dict(codes_as_input=True), "must be a constant initializer"),
    (dict(accuracy_level=7), "attribute 'accuracy_level'=7 unsupported (0 to 4)"),
])
def test_bad_node_fails_at_session_creation_with_node_name(tmp_path, kwargs, message):
    with pytest.raises(Exception) as err:
        session(build(tmp_path, **kwargs))
    assert "bad_node" in str(err.value) and message in str(err.value), str(err.value)


def seeds_input_model(tmp_path, *, attribute: bool, constant: bool = True) -> tuple[str, object]:
    """One RBEFusedGemm reading its seeds from input 4 (FORMAT.md §2.2), optionally also given the attribute."""
    w = encode(np.random.default_rng(0).standard_normal((K, N)).astype(np.float32), bits=4, block_size=64)
    attrs = dict(K=K, N=N, block_size=64, bits=4, scale0=float(w.scale0))
    if attribute:
        attrs["seeds"] = numpy_helper.from_array(w.seeds, "seeds")
    node = helper.make_node("RBEFusedGemm", ["A", "codes", "", "", "seeds"], ["Y"], name="bad_node",
                            domain="ai.rbe", **attrs)
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", "k"])]
    inits = [numpy_helper.from_array(w.codes, "codes")]
    if constant:
        inits.append(numpy_helper.from_array(w.seeds, "seeds"))
    else:
        inputs.append(helper.make_tensor_value_info("seeds", TensorProto.INT64, list(w.seeds.shape)))
    return save_one_node(tmp_path / "seeds_input.onnx", node, inputs, inits), w


def test_seeds_from_a_constant_input_give_the_attribute_result(tmp_path):
    path, w = seeds_input_model(tmp_path, attribute=False)
    a = np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)
    y = session(path).run(None, {"A": a})[0]
    y_attr = session(build(tmp_path)).run(None, {"A": a})[0]
    np.testing.assert_array_equal(y, y_attr)
    np.testing.assert_allclose(y, a @ decode(w), rtol=1e-5, atol=1e-5 * np.abs(y).max())


@pytest.mark.parametrize("kwargs,message", [
    (dict(attribute=True), "seeds given twice"),
    (dict(attribute=False, constant=False), "input 'seeds' must be a constant initializer"),
])
def test_bad_seeds_input_fails_with_node_name(tmp_path, kwargs, message):
    with pytest.raises(Exception) as err:
        session(seeds_input_model(tmp_path, **kwargs)[0])
    assert "bad_node" in str(err.value) and message in str(err.value), str(err.value)


def test_wrong_activation_width_is_a_run_time_error(tmp_path):
    s = session(build(tmp_path))
    with pytest.raises(Exception, match="last dimension is 99, expected K=100"):
        s.run(None, {"A": np.ones((2, 99), np.float32)})


def test_bias_of_wrong_length_is_rejected(tmp_path):
    path = build(tmp_path, inputs=["A", "codes", "bias"])
    import onnx

    model = onnx.load(path)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(N + 1, np.float32), "bias"))
    onnx.save(model, path)
    with pytest.raises(Exception, match=r"bias.*\[24\]"):
        session(path).run(None, {"A": np.ones((2, K), np.float32)})


def test_model_without_library_registered_names_the_op(tmp_path):
    with pytest.raises(Exception, match="RBEFusedGemm"):
        ort.InferenceSession(build(tmp_path), providers=["CPUExecutionProvider"])


# --- the optional center input (FORMAT.md §5.1): input 3, after the optional bias -------------------------

def centered_weight():
    """The weight build() encodes, with a center and a random alpha per block."""
    import dataclasses

    rng = np.random.default_rng(5)
    w = encode(np.random.default_rng(0).standard_normal((K, N)).astype(np.float32), bits=4, block_size=64)
    alpha = rng.uniform(-1.5, 1.5, w.seeds.shape).astype(np.float16)
    seeds = w.seeds.view(np.uint64) | (alpha_bits(alpha) << np.uint64(40))
    return dataclasses.replace(w, seeds=seeds.view(np.int64), center=rng.standard_normal(K).astype(np.float32))


def build_centered(tmp_path, *, center=None, center_as_input=False, seeds=None, bias=None, accuracy_level=None):
    """An RBEFusedGemm node with inputs [A, codes, bias or "", center]; center=None uses the weight's."""
    w = centered_weight()
    attrs = dict(K=K, N=N, block_size=64, bits=4, scale0=float(w.scale0),
                 seeds=numpy_helper.from_array(w.seeds if seeds is None else seeds, "seeds"))
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("RBEFusedGemm", ["A", "codes", "" if bias is None else "bias", "center"], ["Y"],
                            name="centered_node", domain="ai.rbe", **attrs)
    center = w.center if center is None else center
    inits = [numpy_helper.from_array(w.codes, "codes")]
    graph_inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)]
    if center_as_input:
        graph_inputs.append(helper.make_tensor_value_info("center", TensorProto.FLOAT, [K]))
    else:
        inits.append(numpy_helper.from_array(center, "center"))
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
    return save_one_node(tmp_path / "centered.onnx", node, graph_inputs, inits), w


def test_center_input_gives_the_numpy_product(tmp_path):
    from rbe_onnx import _kernels

    rng = np.random.default_rng(6)
    bias = rng.standard_normal(N).astype(np.float32)
    A = rng.standard_normal((3, 2, K)).astype(np.float32)
    for with_bias in (False, True):
        path, w = build_centered(tmp_path, bias=bias if with_bias else None)
        Y = session(path).run(None, {"A": A})[0]
        ref = A.astype(np.float64) @ decode(w).astype(np.float64) + (bias if with_bias else 0)
        assert Y.shape == (3, 2, N)
        np.testing.assert_allclose(Y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # accuracy_level 4 (int8 activations, the center term on the float ones): the kernels' result, which
    # test_kernels checks against the spec.
    path, w = build_centered(tmp_path, bias=bias, accuracy_level=4)
    Y = session(path).run(None, {"A": A})[0]
    cpp = _kernels.Weight(w.seeds, w.codes, K, N, 64, 4, w.scale0, center=w.center)
    want = cpp.gemm(A.reshape(-1, K), bias, isa="scalar", accuracy_level=4).reshape(3, 2, N)
    np.testing.assert_allclose(Y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _alpha_pattern(seeds: np.ndarray, pattern: int) -> np.ndarray:
    out = seeds.copy()
    u = out.view(np.uint64)
    u[1, 1] = (u[1, 1] & ~(np.uint64(0xFFFF) << np.uint64(40))) | (np.uint64(pattern) << np.uint64(40))
    return out


@pytest.mark.parametrize("kwargs,message", [
    (dict(center_as_input=True), "input 'center' must be a constant initializer"),
    (dict(center=np.ones(K + 1, np.float32)), "input 'center' must be a float32 tensor of shape [100] (K)"),
    (dict(center=np.ones((1, K), np.float32)), "input 'center' must be a float32 tensor of shape [100] (K)"),
    # The op declares center float32, so ORT's own type check rejects this one (naming the node too).
    (dict(center=np.ones(K, np.float64)), "Type 'tensor(double)' of input parameter (center)"),
    (dict(center=np.where(np.arange(K) == 7, np.nan, 1).astype(np.float32)), "center holds NaN or Inf"),
    (dict(center=np.where(np.arange(K) == 99, -np.inf, 1).astype(np.float32)), "center holds NaN or Inf"),
    (dict(seeds=_alpha_pattern(centered_weight().seeds, 0x7C00)), "seed [1, 1]: alpha is not finite"),
    (dict(seeds=_alpha_pattern(centered_weight().seeds, 0xFE00)), "seed [1, 1]: alpha is not finite"),
])
def test_bad_center_fails_at_session_creation_with_node_name(tmp_path, kwargs, message):
    path, _ = build_centered(tmp_path, **kwargs)
    with pytest.raises(Exception) as err:
        session(path)
    assert "centered_node" in str(err.value) and message in str(err.value), str(err.value)


def test_alpha_without_center_is_rejected(tmp_path):
    """A node whose seeds carry a nonzero alpha (here only -0 in one seed) but no center input."""
    w = encode(np.random.default_rng(0).standard_normal((K, N)).astype(np.float32), bits=4, block_size=64)
    with pytest.raises(Exception) as err:
        session(build(tmp_path, seeds=numpy_helper.from_array(_alpha_pattern(w.seeds, 0x8000), "seeds")))
    assert "bad_node" in str(err.value) and "seed [1, 1]: alpha nonzero but the node has no center vector" \
        in str(err.value), str(err.value)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_rbe_isa_forces_each_available_kernel(tmp_path, monkeypatch, accuracy_level):
    """`RBE_ISA` (docs/USAGE.md) picks the kernel a session runs; every available one gives the scalar
    kernel's product through ORT (M = 1 takes the GEMV, M = 9 the tiles)."""
    from rbe_onnx import _kernels

    w = encode(np.random.default_rng(1).standard_normal((K, N)).astype(np.float32), bits=3, block_size=64)
    path = build(tmp_path, bits=3, seeds=numpy_helper.from_array(w.seeds, "seeds"), codes=w.codes,
                 scale0=float(w.scale0), accuracy_level=accuracy_level)
    rng = np.random.default_rng(2)
    feeds = [{"A": rng.standard_normal((m, K)).astype(np.float32)} for m in (1, 9)]
    monkeypatch.setenv("RBE_ISA", "scalar")
    expected = [session(path).run(None, f)[0] for f in feeds]
    np.testing.assert_allclose(expected[0], feeds[0]["A"] @ decode(w), rtol=0.05 if accuracy_level else 1e-5,
                               atol=0.05 * np.abs(expected[0]).max() if accuracy_level else 1e-4)
    for isa in ("avx2", "avxvnni", "avx512", "neon"):
        if not _kernels.isa_available(isa):
            continue
        monkeypatch.setenv("RBE_ISA", isa)
        s = session(path)
        for f, y in zip(feeds, expected):
            np.testing.assert_allclose(s.run(None, f)[0], y, rtol=1e-5, atol=1e-5 * np.abs(y).max(), err_msg=isa)


@pytest.mark.parametrize("isa,message", [("sse9", "unknown kernel ISA 'sse9'"), ("missing", None)])
def test_rbe_isa_names_a_bad_or_missing_kernel(tmp_path, monkeypatch, isa, message):
    from rbe_onnx import _kernels

    if isa == "missing":
        absent = [n for n in ("avx2", "avxvnni", "avx512", "neon") if not _kernels.isa_available(n)]
        if not absent:
            pytest.skip("every kernel ISA is available on this machine")
        isa, message = absent[0], f"RBE_ISA={absent[0]} is not available on this CPU"
    monkeypatch.setenv("RBE_ISA", isa)
    with pytest.raises(Exception) as err:
        session(build(tmp_path))
    assert "bad_node" in str(err.value) and message in str(err.value), str(err.value)
