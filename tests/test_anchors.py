"""The benchmarks' anchor, rbe_onnx.anchors.matmulnbits_model: ORT's own MatMulNBits 4-bit RTN model, which
tools/bench.py and tools/bench_quality.py measure RBE against. It rests on ORT's quantizer, whose imports change
between releases (1.32's needs onnx-ir and does not declare it), so a fresh install is checked here rather than
found broken by a benchmark run."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from rbe_onnx.anchors import matmulnbits_model
from rbe_onnx.runtime.feeds import Gpt2Shape
from test_rewrite import gpt2_logits, wikitext_windows  # noqa: F401 (a fixture)


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
