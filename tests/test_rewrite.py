"""export -> rewrite -> load in a plain onnxruntime session with the op library registered."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from rbe_onnx import get_library_path, read_report, rewrite
from rbe_onnx.cli import main as cli
from rbe_onnx.datasets import wikitext2_text
from rbe_onnx.evaluate import wikitext_test_paragraphs
from rbe_onnx.compressor import NothingToRewrite, totals
from rbe_onnx.runtime.feeds import Gpt2Shape, prefill_feeds


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each last-axis vector (per position)."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_matches_8bit(ref: np.ndarray, got: np.ndarray, what: str) -> None:
    """8-bit outputs: cosine of the whole output tensor >= 0.9999, and of every single position >= 0.9995."""
    whole = cosine(ref.reshape(1, -1), got.reshape(1, -1))[0]
    worst = cosine(ref, got).min()
    print(f"{what} 8-bit vs fp32: cosine {whole:.6f}, worst position {worst:.6f}")
    assert whole >= 0.9999 and worst >= 0.9995


def rewritten(src_dir: Path, out_dir: Path, **kw) -> Path:
    out = out_dir / "model.onnx"
    if not out.exists():
        rewrite(src_dir / "model.onnx", out, progress=False, **kw)
    return out


def gpt2_logits(ort_session, model: Path, shape: Gpt2Shape, ids: np.ndarray, mask=None, lib=None):
    return ort_session(model, custom_op_library=lib).run(["logits"], prefill_feeds(shape, ids, mask))[0]


@pytest.fixture(scope="module")
def wikitext_windows(ref_gpt2_dir) -> np.ndarray:
    """12 windows x 256 tokens of WikiText-2 test (3,072 positions)."""
    ids = Tokenizer.from_file(str(ref_gpt2_dir / "tokenizer.json")).encode(wikitext2_text("test")[:60000]).ids
    return np.array(ids[: 12 * 256], dtype=np.int64).reshape(12, 256)


@pytest.fixture(scope="module")
def ref_gpt2_rbe(tmp_path_factory, ref_gpt2_onnx_dir):
    out = tmp_path_factory.mktemp("rbe")
    return {bits: rewritten(ref_gpt2_onnx_dir, out / f"b{bits}", bits=bits) for bits in (8, 4)}


def test_ref_gpt2_8bit_logits_match_fp32(ort_session, ref_gpt2_onnx_dir, ref_gpt2_rbe, wikitext_windows):
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    ids = wikitext_windows[:2]
    ref = gpt2_logits(ort_session, ref_gpt2_onnx_dir, shape, ids)
    got = gpt2_logits(ort_session, ref_gpt2_rbe[8], shape, ids, lib=get_library_path())
    assert_matches_8bit(ref, got, "ref-gpt2 logits")


def test_ref_gpt2_4bit_top1_agrees_with_fp32(ort_session, ref_gpt2_onnx_dir, ref_gpt2_rbe, wikitext_windows):
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    agree = []
    for batch in np.split(wikitext_windows, 4):
        ref = gpt2_logits(ort_session, ref_gpt2_onnx_dir, shape, batch)
        got = gpt2_logits(ort_session, ref_gpt2_rbe[4], shape, batch, lib=get_library_path())
        agree.append(ref.argmax(-1) == got.argmax(-1))
    rate = np.concatenate(agree).mean()
    print(f"ref-gpt2 4-bit top-1 agreement with fp32 over {wikitext_windows.size} positions: {rate:.4f}")
    assert rate >= 0.90


def test_every_constant_weight_matmul_is_replaced(ref_gpt2_onnx_dir, ref_gpt2_rbe):
    src = onnx.load(str(ref_gpt2_onnx_dir / "model.onnx"), load_external_data=False)
    inits = {t.name for t in src.graph.initializer}
    eligible = {n.name for n in src.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits}
    assert len(eligible) == 4 * 4 + 1  # 4 Gemm per layer + lm_head

    model = onnx.load(str(ref_gpt2_rbe[4]), load_external_data=False)
    rbe_nodes = {n.name for n in model.graph.node if n.op_type == "RBEFusedGemm"}
    assert rbe_nodes == eligible
    inits = {t.name for t in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]

    rows = read_report(ref_gpt2_rbe[4])
    assert {r.node for r in rows if r.status == "rbe"} == eligible | {"/wte/Gather", "/wpe/Gather"}
    # Attention is one MultiHeadAttention node per layer, so no activation x activation MatMul is left to skip
    # (test_skip_reasons_and_exclude covers those).
    assert [r.node for r in rows if r.status != "rbe"] == []
    t = totals(rows)
    assert t["bits_per_weight"] == pytest.approx(5.0, abs=0.01)  # 4-bit codes + 64-bit seed per 64 weights


def test_inspect_cli_prints_every_rewritten_node(ref_gpt2_rbe, capsys):
    assert cli(["inspect", str(ref_gpt2_rbe[4])]) == 0
    out = capsys.readouterr().out
    for r in read_report(ref_gpt2_rbe[4]):
        if r.status == "rbe":
            assert r.node in out, r.node
    assert "19 rewritten" in out  # 16 Gemm + lm_head + token and position embeddings


def test_tiny_models_8bit_match_fp32(ort_session, tmp_path, tiny_gpt2_onnx_dir, tiny_bert_onnx_dir):
    shape = Gpt2Shape.from_dir(tiny_gpt2_onnx_dir)
    ids = np.array([[50256, 50256, 464, 2068, 7586], [464, 318, 257, 1332, 13]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    ref = gpt2_logits(ort_session, tiny_gpt2_onnx_dir, shape, ids, mask)
    got = gpt2_logits(ort_session, rewritten(tiny_gpt2_onnx_dir, tmp_path / "g", bits=8), shape, ids, mask,
                      lib=get_library_path())
    assert_matches_8bit(ref[mask == 1], got[mask == 1], "tiny GPT-2 logits")

    feeds = bert_feeds()
    ref = ort_session(tiny_bert_onnx_dir).run(None, feeds)[0]
    got = ort_session(rewritten(tiny_bert_onnx_dir, tmp_path / "b", bits=8),
                      custom_op_library=get_library_path()).run(None, feeds)[0]
    keep = feeds["attention_mask"] == 1
    assert_matches_8bit(ref[keep], got[keep], "tiny BERT hidden states")


@pytest.mark.parametrize("bits", [5, 6])
def test_tiny_gpt2_5_and_6_bit_codes_run_in_ort(tmp_path, tiny_gpt2_onnx_dir, monkeypatch, bits):
    """5- and 6-bit codes through RBEFusedGemm and RBEGather in an ORT session: the SIMD kernels (which build
    the 8-bit path's L + 128 from each code's bits in registers) give the scalar reference's logits, with 2
    threads, in the float and int8 arithmetics, and both stay close to fp32."""
    from conftest import make_ort_session

    shape = Gpt2Shape.from_dir(tiny_gpt2_onnx_dir)
    ids = np.array([[50256, 50256, 464, 2068, 7586], [464, 318, 257, 1332, 13]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=np.int64)
    ref = make_ort_session(tiny_gpt2_onnx_dir).run(["logits"], prefill_feeds(shape, ids, mask))[0][mask == 1]
    models = [rewritten(tiny_gpt2_onnx_dir, tmp_path / f"level{level}", bits=bits, block_size=64,
                        accuracy_level=level) for level in (0, 4)]
    ops = {n.op_type for n in onnx.load(str(models[0]), load_external_data=False).graph.node}
    assert ops >= {"RBEFusedGemm", "RBEGather"}
    for path in models:
        got = {}
        for isa in ("scalar", "auto"):
            monkeypatch.setenv("RBE_ISA", isa)  # read when the session creates its kernels
            session = make_ort_session(path, custom_op_library=get_library_path())
            got[isa] = session.run(["logits"], prefill_feeds(shape, ids, mask))[0][mask == 1]
        np.testing.assert_allclose(got["auto"], got["scalar"], rtol=0, atol=1e-5 * np.abs(got["scalar"]).max())
        whole = cosine(ref.reshape(1, -1), got["auto"].reshape(1, -1))[0]
        print(f"{bits}-bit {path.parent.name} vs fp32: cosine {whole:.6f}")
        assert whole >= (0.999 if bits == 6 else 0.995)


def bert_feeds() -> dict:
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2460, 102, 0, 0, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def minilm_8bit_pooled(ort_session, tmp_path, minilm_onnx_dir, calibrate: bool, embeddings: bool = False):
    """Issue 2's setting: the MatMul/Gemm projections at 8 bits (embeddings are covered separately)."""
    feeds = wikitext_test_paragraphs(str(minilm_onnx_dir / "tokenizer.json"), 64)
    ref = ort_session(minilm_onnx_dir).run(None, feeds)[0]
    out = tmp_path / "model.onnx"
    rewrite(minilm_onnx_dir / "model.onnx", out, bits=8, calibrate=calibrate, embeddings=embeddings,
            progress=False)
    got = ort_session(out, custom_op_library=get_library_path()).run(None, feeds)[0]
    assert len([n for n in onnx.load(str(out), load_external_data=False).graph.node
                if n.op_type == "RBEFusedGemm"]) == 6 * 6
    m = feeds["attention_mask"][..., None]
    pooled = lambda x: (x * m).sum(1) / m.sum(1)  # noqa: E731  sentence-transformers mean pooling
    return pooled(ref), pooled(got)


def test_minilm_8bit_round_to_nearest_close_to_fp32(ort_session, tmp_path, minilm_onnx_dir):
    """Uncalibrated 8-bit leaves 0.55 % weight RMSE (as ORT's own 8-bit RTN) and MiniLM amplifies it:
    pooled cosine ~0.9998 today. This guards that level; the issue's 0.9999 needs calibration (below)."""
    ref, got = minilm_8bit_pooled(ort_session, tmp_path, minilm_onnx_dir, calibrate=False)
    assert cosine(ref.reshape(1, -1), got.reshape(1, -1))[0] >= 0.9997
    assert cosine(ref, got).min() >= 0.9995


def test_minilm_8bit_calibrated_matches_fp32(ort_session, tmp_path, minilm_onnx_dir):
    ref, got = minilm_8bit_pooled(ort_session, tmp_path, minilm_onnx_dir, calibrate=True)
    assert_matches_8bit(ref, got, "MiniLM mean-pooled embeddings (calibrated)")


def test_minilm_8bit_with_embeddings_close_to_fp32(ort_session, tmp_path, minilm_onnx_dir):
    """Everything at 8 bits, the word/position/type tables too (RBEGather)."""
    ref, got = minilm_8bit_pooled(ort_session, tmp_path, minilm_onnx_dir, calibrate=True, embeddings=True)
    assert cosine(ref.reshape(1, -1), got.reshape(1, -1))[0] >= 0.9998


RSS_PROBE = """
import json, sys, psutil, onnxruntime as ort
from rbe_onnx import get_library_path
p = psutil.Process()
def session(path):
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
warm = session(sys.argv[1])  # pays ORT's one-off start-up costs (environment, pools, registries)
before = p.memory_info().rss
big = session(sys.argv[2])
print(json.dumps({"growth": p.memory_info().rss - before}))
"""


def single_gemm_model(path: Path, K: int, N: int, bits: int = 8, block_size: int = 256) -> int:
    """A one-node RBEFusedGemm model with random (valid) codes, saved with aligned external data."""
    from onnx import TensorProto, helper, numpy_helper

    from rbe_onnx.codec.seed import pack_seeds
    from rbe_onnx.onnx_io import save_model

    nb = -(-K // block_size)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, N * nb * block_size * bits // 8, dtype=np.uint8)
    seeds = pack_seeds(rng.integers(0, 1000, (N, nb)), 4, 0, bits)
    node = helper.make_node("RBEFusedGemm", ["A", "codes"], ["Y"], name="big", domain="ai.rbe", K=K, N=N,
                            block_size=block_size, bits=bits, scale0=1e-3,
                            seeds=numpy_helper.from_array(seeds, "seeds"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(codes, "codes")])
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("ai.rbe", 1)]), path)
    return codes.nbytes


def test_codes_are_memory_mapped_not_copied(tmp_path):
    """Session creation must not read the codes in: RSS grows by far less than their size."""
    small = tmp_path / "small.onnx"
    single_gemm_model(small, 64, 64)
    big = tmp_path / "big.onnx"
    codes = single_gemm_model(big, 4096, 32768)
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(small), str(big)], capture_output=True,
                         text=True, check=True)
    growth = json.loads(out.stdout)["growth"]
    print(f"codes {codes / 1e6:.1f} MB, RSS growth at session creation {growth / 1e6:.1f} MB")
    assert growth < 0.25 * codes  # what remains is the seeds (in the graph) and their decoded tables


def test_skip_reasons_and_exclude(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    inits = [w(64, 32), w(32, 64), w(16, 64), w(64, 16)]
    for t, name in zip(inits, ("W0", "W1", "W2", "W3")):
        t.name = name
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["y0"], name="keep_matmul"),
        helper.make_node("Gemm", ["y0", "W1"], ["y1"], name="gemm_transB", transB=1),
        helper.make_node("Gemm", ["y1", "W2"], ["y2"], name="gemm_alpha", alpha=0.5),
        helper.make_node("MatMul", ["y2", "W3"], ["y3"], name="excluded_matmul"),
        helper.make_node("MatMul", ["y3", "y3"], ["y4"], name="dynamic_matmul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y4", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, rows = rewrite(model, tmp_path / "m.onnx", bits=8, exclude="^excluded", progress=False)
    status = {r.node: r.status for r in rows}
    assert status["keep_matmul"] == "rbe" and status["gemm_transB"] == "rbe"
    assert "alpha" in status["gemm_alpha"]
    assert "excluded" in status["excluded_matmul"]
    assert "not a constant initializer" in status["dynamic_matmul"]


def test_rewrite_without_eligible_nodes_fails_clearly(tmp_path, capsys):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(NothingToRewrite, match="no MatMul or Gemm node"):
        rewrite(path, progress=False)
    assert cli(["rewrite", str(path), "-o", str(tmp_path / "out.onnx")]) == 2
    assert "no MatMul/Gemm node" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"this is not protobuf at all", b"\x08\x07\x12"])
def test_bad_files_give_clear_errors(tmp_path, capsys, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    for command in (["rewrite", str(path)], ["inspect", str(path)]):
        assert cli(command) == 2
        assert "bad.onnx" in capsys.readouterr().out


def test_cli_start_up_loads_neither_numpy_nor_onnx():
    """`rbe-onnx --help` or a mistyped flag answers at once: the heavy modules load with the command that
    needs them (the calibration default the help text shows comes from a module that defers them too)."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, rbe_onnx.cli; rbe_onnx.cli.build_parser(); "
                             "print(sorted({'numpy', 'onnx', 'onnxruntime'} & set(sys.modules)))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
