"""RBEGather: embedding rows decoded on demand, equal to the numpy decoder's table; tied with the lm_head."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rbe_onnx import get_library_path
from rbe_onnx.codec import decode, encode
from rbe_onnx.codec.seed import alpha_bits


def gather_session(tmp_path, table: np.ndarray, bits: int = 4, center: bool = False, center_value=None,
                   center_as_input: bool = False):
    """A session of one RBEGather node over `table` and the table's numpy decode. center: the weight gets a
    center (input 2, FORMAT.md §5.1) and a random alpha per block; center_value replaces the center
    initializer's value, center_as_input makes it a graph input instead."""
    import dataclasses

    w = encode(np.ascontiguousarray(table.T), bits=bits, block_size=64)  # entry t = column t of W = tableᵀ
    inputs, inits = ["ids", "codes"], [numpy_helper.from_array(w.codes, "codes")]
    graph_inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, None)]
    if center:
        rng = np.random.default_rng(w.K)
        alpha = rng.uniform(-2, 2, w.seeds.shape).astype(np.float16)
        seeds = w.seeds.view(np.uint64) | (alpha_bits(alpha) << np.uint64(40))
        w = dataclasses.replace(w, seeds=seeds.view(np.int64), center=rng.standard_normal(w.K).astype(np.float32))
        inputs.append("center")
        if center_as_input:
            graph_inputs.append(helper.make_tensor_value_info("center", TensorProto.FLOAT, [w.K]))
        else:
            inits.append(numpy_helper.from_array(w.center if center_value is None else center_value, "center"))
    node = helper.make_node("RBEGather", inputs, ["rows"], name="emb", domain="ai.rbe", K=w.K, N=w.N,
                            block_size=64, bits=bits, scale0=w.scale0, seeds=numpy_helper.from_array(w.seeds, "s"))
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]
    graph = helper.make_graph([node], "g", graph_inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    model.ir_version = 10
    path = tmp_path / "gather.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), decode(w).T


def test_rows_equal_numpy_decode_for_any_index_shape(tmp_path):
    table = np.random.default_rng(0).standard_normal((300, 100)).astype(np.float32)  # K=100: a tail block
    session, decoded = gather_session(tmp_path, table)
    ids = np.array([[0, 299, 17], [5, -1, -300]], dtype=np.int64)
    rows = session.run(None, {"ids": ids})[0]
    assert rows.shape == (2, 3, 100)
    assert np.array_equal(rows, decoded[ids])


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_rows_with_center_equal_numpy_decode_bit_for_bit(tmp_path, bits):
    """Each row is d·(L+o) + α·c per block (§5.1), the same float32 bits as the numpy decoder's."""
    table = np.random.default_rng(bits).standard_normal((300, 100)).astype(np.float32)  # K=100: a tail block
    session, decoded = gather_session(tmp_path, table, bits=bits, center=True)
    ids = np.array([[0, 299, 17], [5, -1, -300]], dtype=np.int64)
    rows = session.run(None, {"ids": ids})[0]
    assert rows.shape == (2, 3, 100)
    assert np.array_equal(rows.view(np.uint32), np.ascontiguousarray(decoded[ids]).view(np.uint32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(center_as_input=True), "input 'center' must be a constant initializer"),
    (dict(center_value=np.ones(99, np.float32)), "input 'center' must be a float32 tensor of shape [100] (K)"),
    (dict(center_value=np.full(100, np.nan, np.float32)), "center holds NaN or Inf"),
])
def test_bad_center_is_an_error_naming_the_node(tmp_path, kwargs, message):
    table = np.random.default_rng(0).standard_normal((30, 100)).astype(np.float32)
    with pytest.raises(Exception) as err:
        gather_session(tmp_path, table, center=True, **kwargs)
    assert "RBEGather node 'emb'" in str(err.value) and message in str(err.value), str(err.value)


def test_out_of_range_index_is_an_error(tmp_path):
    session, _ = gather_session(tmp_path, np.ones((10, 64), np.float32))
    with pytest.raises(Exception, match=r"RBEGather node 'emb': index 10 out of range \[-10, 9\]"):
        session.run(None, {"ids": np.array([10], dtype=np.int64)})


def test_tied_gpt2_embedding_is_stored_once(ref_gpt2_onnx_dir, tmp_path):
    from rbe_onnx import rewrite

    out = tmp_path / "model.onnx"
    rewrite(ref_gpt2_onnx_dir / "model.onnx", out, bits=4, progress=False)
    model = onnx.load(str(out), load_external_data=False)
    gathers = [n for n in model.graph.node if n.op_type == "RBEGather"]
    assert {n.name for n in gathers} == {"/wte/Gather", "/wpe/Gather"}
    assert not [n for n in model.graph.node if n.op_type == "Gather" and n.input[0].endswith(".weight")]
    lm_head = [n for n in model.graph.node if n.op_type == "RBEFusedGemm" and n.input[0] and
               next(a for a in n.attribute if a.name == "N").i == 50257]
    wte = next(n for n in gathers if n.name == "/wte/Gather")
    assert len(lm_head) == 1 and lm_head[0].input[1] == wte.input[1]  # one codes initializer for both
    codes = [t for t in model.graph.initializer if t.name.endswith(".rbe_codes")]
    assert sum(1 for t in codes if t.dims[0] == 50257 * 4 * 32) == 1
    # ... and one seeds initializer (FORMAT.md §2.2): RBEFusedGemm input 4, RBEGather input 3, no attribute.
    assert lm_head[0].input[4] == wte.input[3] and wte.input[3].endswith(".rbe_seeds")
    assert not [a for n in (lm_head[0], wte) for a in n.attribute if a.name == "seeds"]
    seeds = [t for t in model.graph.initializer if t.name.endswith(".rbe_seeds")]
    assert len(seeds) == 1 and list(seeds[0].dims) == [50257, 256 // 64]
    wpe = next(n for n in gathers if n.name == "/wpe/Gather")
    assert any(a.name == "seeds" for a in wpe.attribute)  # a table only one node reads keeps the attribute
    assert not [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1e6]
