"""The rules that turn `MatMul(A, W)` / `Gemm(A, B, C)` with a constant 2-D weight into `RBEFusedGemm`, and
`Gather(E, ids)` over a constant 2-D table into `RBEGather`.

Matching and replacing are separate steps: `find_candidates` says which nodes qualify (and why the others do
not), the caller encodes the weights, and `replace_candidates` swaps the nodes. Anything not matched is left
exactly as it was.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

RBE_DOMAIN = "ai.rbe"
OP_TYPE = "RBEFusedGemm"
GATHER_OP_TYPE = "RBEGather"


@dataclass
class Candidate:
    """A MatMul/Gemm node and what the rule decided about it."""

    node: onnx.NodeProto
    index: int                   # position in graph.node
    weight_name: str = ""
    transpose: bool = False      # the stored initializer is W^T (Gemm transB=1; every Gather table)
    bias: str = ""               # Gemm's C input, passed through as the op's bias
    skip_reason: str = ""        # empty when the node will be replaced
    shape: tuple[int, int] = (0, 0)
    extra: dict = field(default_factory=dict)

    @property
    def eligible(self) -> bool:
        return not self.skip_reason

    @property
    def key(self) -> tuple[str, bool]:
        """Nodes sharing a weight (and its orientation) share one encoding."""
        return (self.weight_name, self.transpose)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_weight(c: Candidate, init: dict[str, onnx.TensorProto]) -> None:
    tensor = init.get(c.weight_name)
    if tensor is None:
        c.skip_reason = "weight is not a constant initializer"
    elif tensor.data_type != onnx.TensorProto.FLOAT:
        c.skip_reason = f"weight dtype {onnx.TensorProto.DataType.Name(tensor.data_type)} is not float32"
    elif len(tensor.dims) != 2:
        c.skip_reason = f"weight is {len(tensor.dims)}-D, not 2-D"
    else:
        rows, cols = tensor.dims
        c.shape = (cols, rows) if c.transpose else (rows, cols)


def _match(node: onnx.NodeProto, index: int, init: dict, ranks: dict[str, int], bias_ok) -> Candidate:
    c = Candidate(node=node, index=index)
    if node.op_type == "MatMul":
        c.weight_name = node.input[1]
        if ranks.get(node.input[0], 2) < 2:
            c.skip_reason = "activation is 1-D (MatMul vector semantics)"
            return c
    elif node.op_type == "Gather":
        # Entry t of the table must be column t of W, so W = tableᵀ (K = entry width, N = entries).
        c.weight_name, c.transpose = node.input[0], True
        if _attrs(node).get("axis", 0) != 0:
            c.skip_reason = "Gather axis is not 0"
            return c
    else:  # Gemm
        a = _attrs(node)
        c.weight_name, c.transpose = node.input[1], bool(a.get("transB", 0))
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            c.skip_reason = "Gemm form not supported (needs transA=0, alpha=1, beta=1)"
            return c
        c.bias = node.input[2] if len(node.input) > 2 else ""
    _check_weight(c, init)
    if c.eligible and c.bias and not bias_ok(c.bias, c.shape[1]):
        c.skip_reason = "Gemm bias C is not a 1-D vector of length N"
    return c


def find_candidates(model: onnx.ModelProto, exclude: str | None = None,
                    embeddings: bool = True) -> list[Candidate]:
    """Every MatMul/Gemm (and, with `embeddings`, Gather) of the main graph with the rule's verdict on it."""
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    ranks = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)

    def bias_ok(name: str, n: int) -> bool:
        if name in init:
            return list(init[name].dims) == [n]
        return ranks.get(name) == 1  # a computed bias must at least be known to be 1-D

    pattern = re.compile(exclude) if exclude else None
    found = []
    op_types = ("MatMul", "Gemm", "Gather") if embeddings else ("MatMul", "Gemm")
    for index, node in enumerate(graph.node):
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gather" and node.input[0] not in init:
            continue  # a Gather over activations (shapes, KV indexing): not a weight at all
        c = _match(node, index, init, ranks, bias_ok)
        if c.eligible and pattern and (pattern.search(node.name) or pattern.search(c.weight_name)):
            c.skip_reason = f"excluded by --exclude {exclude!r}"
        found.append(c)
    return found


def weight_matrix(model: onnx.ModelProto, c: Candidate) -> np.ndarray:
    """The K x N weight of a candidate, transposed back if Gemm stored it as W^T."""
    tensor = next(t for t in model.graph.initializer if t.name == c.weight_name)
    w = numpy_helper.to_array(tensor).astype(np.float32, copy=False)
    return np.ascontiguousarray(w.T if c.transpose else w)


def replace_candidates(model: onnx.ModelProto, encoded: dict[tuple[str, bool], "object"],
                       candidates: list[Candidate]) -> None:
    """Swaps each eligible candidate for an RBEFusedGemm / RBEGather reading `encoded[c.key]` (an RBEWeight, or
    for a Gather a codec.RiceTable: an RBEGather with coding=1, FORMAT.md §5.4).

    Nodes keep their names and output names; candidates mapped to the same RBEWeight object (a shared or
    tied weight) read one codes initializer and one seeds initializer; fp32 weights no node reads any more are
    dropped.
    """
    graph = model.graph
    nodes = list(graph.node)
    users = Counter(id(encoded[c.key]) for c in candidates if c.eligible)
    stored: dict[int, dict[str, str]] = {}  # per RBEWeight: its initializers' names, by role
    for c in candidates:
        if not c.eligible:
            continue
        w = encoded[c.key]
        if id(w) not in stored:
            stem = f"{c.weight_name}{'.T' if c.transpose else ''}"
            names = stored[id(w)] = {"codes": f"{stem}.rbe_codes"}
            graph.initializer.append(numpy_helper.from_array(w.codes, names["codes"]))
            rice = getattr(w, "lengths", None) is not None
            if rice:
                if any(x.eligible and encoded[x.key] is w and x.node.op_type != "Gather" for x in candidates):
                    raise ValueError(f"{c.weight_name}: a Rice-coded table can only be gathered (FORMAT.md §5.4)")
                names["lengths"] = f"{stem}.rbe_lengths"
                graph.initializer.append(numpy_helper.from_array(w.lengths, names["lengths"]))
            elif w.center is not None:
                names["center"] = f"{stem}.rbe_center"
                graph.initializer.append(numpy_helper.from_array(w.center, names["center"]))
            if not rice and w.outliers is not None:
                names["outliers"] = f"{stem}.rbe_outliers"
                graph.initializer.append(numpy_helper.from_array(w.outliers, names["outliers"]))
            if users[id(w)] > 1:
                # A tied table (wte / lm_head): one seeds initializer both nodes read (FORMAT.md §2.2), as an
                # attribute on each node would store the seeds twice.
                names["seeds"] = f"{stem}.rbe_seeds"
                graph.initializer.append(numpy_helper.from_array(w.seeds, names["seeds"]))
        names = stored[id(w)]
        attrs = dict(K=w.K, N=w.N, coding=1, scale0=float(w.scale0)) if "lengths" in names else \
            dict(K=w.K, N=w.N, block_size=w.block_size, bits=w.bits, scale0=float(w.scale0))
        if "seeds" not in names:
            attrs["seeds"] = numpy_helper.from_array(w.seeds, "seeds")
        if getattr(w, "rotation", 0):
            if c.node.op_type == "Gather":
                raise ValueError(f"{c.node.name}: a gathered table cannot carry an input rotation (FORMAT.md §5.3)")
            # The seed is a 64-bit pattern; an ONNX int attribute is int64.
            attrs["rotation"] = w.rotation
            attrs["rotation_seed"] = w.rotation_seed - (1 << 64) if w.rotation_seed >= 1 << 63 else w.rotation_seed
        # ONNX skips an absent optional input with an empty name; trailing absent ones are left off.
        if c.node.op_type == "Gather":
            optional = [names.get("center", ""), names.get("seeds", ""), names.get("outliers", ""),
                        names.get("lengths", "")]
            inputs = [c.node.input[1], names["codes"]]
            op_type = GATHER_OP_TYPE
        else:
            optional = [c.bias, names.get("center", ""), names.get("seeds", ""), names.get("outliers", "")]
            inputs = [c.node.input[0], names["codes"]]
            op_type = OP_TYPE
        while optional and not optional[-1]:
            optional.pop()
        new = helper.make_node(op_type, inputs + optional, list(c.node.output), name=c.node.name,
                               domain=RBE_DOMAIN, **attrs)
        nodes[c.index] = new
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    used |= {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(op.domain == RBE_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(RBE_DOMAIN, 1))


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Sets the `accuracy_level` attribute (FORMAT.md §2.1) of every RBEFusedGemm; 0 removes it (the default)."""
    if level not in range(5):
        raise ValueError(f"accuracy_level must be 0 to 4, got {level}")
    for node in model.graph.node:
        if node.op_type == OP_TYPE and node.domain == RBE_DOMAIN:
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(keep + ([helper.make_attribute("accuracy_level", level)] if level else []))
