"""The op library's diagnostic build (CMake -DRBE_OP_TIMING=ON, what tools/decode_breakdown.py drives): it computes
the same products as the shipped library, counts the time inside RBEFusedGemm calls through RbeOpTiming, and
writes zeros instead of the product under RBE_SKIP_PRODUCTS=1; the shipped library exports no such hook."""
from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cmake_build import cmake_build
from rbe_onnx import get_library_path
from rbe_onnx.codec import encode

REPO = Path(__file__).resolve().parents[1]
K, N = 200, 48


@pytest.fixture(scope="module")
def timing_library(tmp_path_factory) -> Path:
    include = subprocess.run(["bash", str(REPO / "tools" / "fetch_ort_headers.sh")], capture_output=True,
                             text=True, check=True).stdout.strip()
    build = tmp_path_factory.mktemp("op-timing-build")
    cmake_build(REPO / "custom_ops", build, "-DCMAKE_BUILD_TYPE=Release", "-DRBE_BUILD_PYTHON=OFF",
                "-DRBE_OP_TIMING=ON", f"-DONNXRUNTIME_INCLUDE_DIR={include}", target="rbe_ops")
    return build / "librbe_ops.so"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    w = encode(np.random.default_rng(0).standard_normal((K, N)).astype(np.float32), bits=4, block_size=64)
    node = helper.make_node("RBEFusedGemm", ["A", "codes", "bias"], ["Y"], domain="ai.rbe", K=K, N=N,
                            block_size=64, bits=4, scale0=float(w.scale0),
                            seeds=numpy_helper.from_array(w.seeds, "seeds"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w.codes, "codes"),
                               numpy_helper.from_array(np.linspace(-1, 1, N, dtype=np.float32), "bias")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    m.ir_version = 10
    path = tmp_path_factory.mktemp("op-timing") / "m.onnx"
    path.write_bytes(m.SerializeToString())
    return str(path)


def session(model: str, library: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def totals(library: Path) -> tuple[int, int]:
    fn = ctypes.CDLL(str(library)).RbeOpTiming
    ns, calls = ctypes.c_int64(), ctypes.c_int64()
    fn(ctypes.byref(ns), ctypes.byref(calls))
    return ns.value, calls.value


def test_timing_build_counts_calls_and_computes_the_same_product(timing_library, model):
    a = {"A": np.random.default_rng(1).standard_normal((3, K)).astype(np.float32)}
    shipped = session(model, Path(get_library_path())).run(None, a)[0]
    timed = session(model, timing_library)
    ns0, calls0 = totals(timing_library)
    for _ in range(4):
        y = timed.run(None, a)[0]
    ns1, calls1 = totals(timing_library)
    np.testing.assert_array_equal(y, shipped)
    assert calls1 - calls0 == 4
    assert ns1 > ns0


def test_skip_products_writes_zeros_and_is_still_counted(timing_library, model, monkeypatch):
    a = {"A": np.random.default_rng(2).standard_normal((2, K)).astype(np.float32)}
    timed = session(model, timing_library)
    assert np.abs(timed.run(None, a)[0]).max() > 0
    monkeypatch.setenv("RBE_SKIP_PRODUCTS", "1")
    _, calls0 = totals(timing_library)
    y = timed.run(None, a)[0]
    assert y.shape == (2, N) and not y.any()
    assert totals(timing_library)[1] == calls0 + 1
    monkeypatch.delenv("RBE_SKIP_PRODUCTS")
    assert np.abs(timed.run(None, a)[0]).max() > 0


def test_shipped_library_has_no_timing_hook(monkeypatch, model):
    assert not hasattr(ctypes.CDLL(get_library_path()), "RbeOpTiming")
    # and ignores the switch: the product is computed
    monkeypatch.setenv("RBE_SKIP_PRODUCTS", "1")
    a = {"A": np.ones((1, K), np.float32)}
    assert np.abs(session(model, Path(get_library_path())).run(None, a)[0]).max() > 0
