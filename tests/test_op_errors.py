"""A malformed RBEFusedGemm node gives a clear ORT error naming the node and the problem, never a crash."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rbe_onnx import get_library_path
from rbe_onnx.codec import encode
from rbe_onnx.codec.seed import pack_seeds

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
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [] if codes_as_input else [codes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


def session(path):
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(drop=("seeds",)), "missing attribute 'seeds'"),
    (dict(drop=("K",)), "attribute 'K'"),
    (dict(bits=5), "bits=5 unsupported"),
    (dict(block_size=48), "block_size=48 unsupported"),
    (dict(K=0), "K=0 out of range"),
    (dict(N=-3), "N=-3 out of range"),
    (dict(K=1 << 40), "out of range"),
    (dict(scale0=float("inf")), "scale0"),
    (dict(seeds=numpy_helper.from_array(np.zeros((N, 2), np.int64), "seeds")), "tag is not 0xB1"),
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
