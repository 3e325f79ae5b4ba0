"""The reference models the benchmarks measure against: ORT's own MatMulNBits 4-bit RTN model, and any model's graph
with its weight products stubbed out (what a token costs besides them)."""
from __future__ import annotations

from pathlib import Path


def matmulnbits_model(src: Path, out: Path, block_size: int = 32) -> float:
    """Writes `out` (once: an existing file is reused) as ORT's MatMulNBits int4 RTN quantization of `src`,
    accuracy_level 4, with Gemm converted to MatMul+Add first so it covers every layer; returns its bits per
    weight over the quantized weights (codes + fp32 scale + 4-bit zero point per block)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .compressor import copy_sidecar_files
    from .onnx_io import save_model
    from .passes.gemm_to_matmul import gemm_to_matmul

    if not out.exists():
        m = onnx.load(str(src))
        gemm_to_matmul(m)
        q = MatMulNBitsQuantizer(m, bits=4, block_size=block_size, is_symmetric=False, accuracy_level=4)
        q.process()
        save_model(q.model.model, out)
        copy_sidecar_files(src.parent, out.parent)
    return 4 + (32 + 4) / block_size


# The nodes that multiply activations by a stored weight, and where each keeps its output width N: an attribute,
# or the weight initializer's last dimension (MatMul / Gemm, which the exports emit without transB).
_PRODUCT_OPS = {"RBEFusedGemm": "N", "MatMulNBits": "N", "MatMul": None, "Gemm": None}
# The input that holds each product's bias, where it has one (MatMulNBits: A, B, scales, zero_points, g_idx, bias).
_BIAS_INPUT = {"RBEFusedGemm": 2, "MatMulNBits": 5, "Gemm": 2}


def without_weight_products(src: Path, out: Path) -> int:
    """Writes `out`, a copy of the graph at `src` whose weight products (RBEFusedGemm, MatMulNBits, and MatMul or
    Gemm against a weight initializer) are each replaced by a near-free stand-in of the same output shape,
    mean(A) + bias (or + 0): decoding it costs what a token costs outside the weight products (attention,
    LayerNorm, the other nodes, ORT's and the generation loop's own work), so tools/bench.py can split a decode
    step in two by measurement rather than from a profiler's per-node figures, which inflate small nodes several
    fold. `out` shares `src`'s external data (same folder). Returns the number of weights the replaced products
    held (Σ K·N), and raises ValueError if `src` has none."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if out.parent.resolve() != src.parent.resolve():
        raise ValueError(f"{out} must be in {src.parent}: it reads that folder's external data")
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    nodes, zeros, weights = [], {}, 0
    for node in graph.node:
        if node.op_type not in _PRODUCT_OPS or not (node.op_type in ("RBEFusedGemm", "MatMulNBits")
                                                    or node.input[1] in inits):
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if _PRODUCT_OPS[node.op_type]:
            k, n = int(attrs["K"]), int(attrs["N"])
        else:
            k, n = (int(d) for d in inits[node.input[1]].dims)
        weights += k * n
        y = node.output[0]
        at = _BIAS_INPUT.get(node.op_type)
        bias = node.input[at] if at is not None and len(node.input) > at and node.input[at] else None
        if bias is None:
            bias = zeros.setdefault(n, f"{y}__stand_in_zeros")
        if opset >= 18:
            axes = f"{y}__stand_in_axes"
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
            nodes.append(helper.make_node("ReduceMean", [node.input[0], axes], [f"{y}__mean"], keepdims=1))
        else:
            nodes.append(helper.make_node("ReduceMean", [node.input[0]], [f"{y}__mean"], axes=[-1], keepdims=1))
        nodes.append(helper.make_node("Add", [f"{y}__mean", bias], [y], name=f"{node.name}__stand_in"))
    if weights == 0:
        raise ValueError(f"{src} has no weight products (RBEFusedGemm, MatMulNBits, MatMul/Gemm with a weight)")
    for n, name in zeros.items():
        graph.initializer.append(numpy_helper.from_array(np.zeros(n, np.float32), name))
    del graph.node[:]
    graph.node.extend(nodes)
    # Drop what only the products read (codes, scales, fp32 weights), so ORT neither maps nor warns about it.
    used = {i for nd in graph.node for i in nd.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save(model, str(out))
    return weights
