"""The benchmarks' reference models (rbe_onnx.anchors).

matmulnbits_model: ORT's own MatMulNBits 4-bit RTN model, which tools/bench.py and tools/bench_quality.py
measure RBE against. It rests on ORT's quantizer, whose imports change between releases (1.32's needs onnx-ir and
does not declare it), so a fresh install is checked here rather than found broken by a benchmark run.

without_weight_products: the stand-in graph tools/bench.py times to split a decode token into the weight
products and the rest."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

import pytest

from rbe_onnx import get_library_path
from rbe_onnx.anchors import matmulnbits_model, without_weight_products
from rbe_onnx.runtime import greedy_generate, make_session
from rbe_onnx.runtime.feeds import Gpt2Shape
from test_rewrite import gpt2_logits, rewritten, wikitext_windows  # noqa: F401 (a fixture)


def test_matmulnbits_anchor_covers_every_layer_and_agrees_with_fp32(tmp_path, ort_session, ref_gpt2_onnx_dir,
                                                                    wikitext_windows):  # noqa: F811
    out = tmp_path / "nbits" / "model.onnx"
    bpw = matmulnbits_model(ref_gpt2_onnx_dir / "model.onnx", out, block_size=32)
    assert bpw == 4 + (32 + 4) / 32  # 4-bit codes, an fp32 scale and a 4-bit zero point per 32

    model = onnx.load(str(out), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 4 * 4 + 1, ops  # 4 projections per layer and the lm_head: every layer
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]

    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    ids = wikitext_windows[:2]
    ref = gpt2_logits(ort_session, ref_gpt2_onnx_dir, shape, ids)
    got = gpt2_logits(ort_session, out.parent, shape, ids)
    rate = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    print(f"MatMulNBits 4b/32 top-1 agreement with fp32 over {ids.size} positions: {rate:.4f}")
    assert 0.85 <= rate < 1.0  # close to fp32, and not fp32 itself


def test_stand_in_graph_keeps_everything_but_the_weight_products(tmp_path, ort_session, ref_gpt2_onnx_dir):
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    d, v = shape.n_head * shape.head_dim, shape.vocab_size
    expected = shape.n_layer * (d * 3 * d + d * d + d * 4 * d + 4 * d * d) + d * v  # 4 projections a layer, lm_head
    fp32 = ref_gpt2_onnx_dir / "model.onnx"
    models = {"fp32": fp32,
              "rbe": rewritten(ref_gpt2_onnx_dir, tmp_path / "rbe", bits=4, block_size=64)}
    matmulnbits_model(fp32, tmp_path / "nbits" / "model.onnx")
    models["nbits"] = tmp_path / "nbits" / "model.onnx"
    prompt = [464, 3290, 318, 257]
    for name, src in models.items():
        if name == "fp32":  # the shared export's folder stays as other tests expect it
            src = tmp_path / "fp32" / "model.onnx"
            src.parent.mkdir()
            onnx.save(onnx.load(str(fp32)), str(src), save_as_external_data=True, location="model.onnx.data")
        out = src.with_name("stand_in.onnx")
        assert without_weight_products(src, out) == expected, name

        graph = onnx.load(str(out), load_external_data=False).graph
        inits = {t.name for t in graph.initializer}
        left = [n.op_type for n in graph.node if n.op_type in ("RBEFusedGemm", "MatMulNBits")
                or n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
        assert not left, (name, left)
        # Everything else is still there and runs: the KV-cached loop decodes through it, and the stand-in
        # lm_head gives every token the same logit (mean of the hidden state, no bias), unlike the model.
        session = make_session(out, threads=1)
        res = greedy_generate(session, shape, prompt, 4)
        assert len(res.tokens) == 4 and len(res.decode_ms) == 3, name
        ids = np.array([prompt], dtype=np.int64)
        logits = gpt2_logits(ort_session, out, shape, ids, lib=get_library_path())
        assert logits.shape == (1, len(prompt), v) and np.isfinite(logits).all(), name
        assert np.ptp(logits, axis=-1).max() < 1e-4 * np.abs(logits).max(), name
        assert np.ptp(gpt2_logits(ort_session, src, shape, ids, lib=get_library_path()), axis=-1).min() > 1.0, name

    with pytest.raises(ValueError, match="must be in"):
        without_weight_products(models["rbe"], tmp_path / "elsewhere.onnx")
    with pytest.raises(ValueError, match="no weight products"):
        without_weight_products(models["rbe"].with_name("stand_in.onnx"), models["rbe"].with_name("again.onnx"))
