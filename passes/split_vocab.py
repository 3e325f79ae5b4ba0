"""Token tables split by how often their rows are read: the rows of the tokens that make up most of a text in
one table, the rest in another, so that `--target-bpw` can give the two different code widths.

A text reads few rows of a large vocabulary table, and those mostly: on WikiText-2 valid, 4000 of MiniLM's
30522 WordPiece tokens make up 91 % of the text, 8000 make up 97 %. The rows that are rarely read can be
coded coarsely at almost no cost, so the frequent ones can be coded finely. On MiniLM, with every other weight
left in fp32:
- the whole table at 2 bits/128 (2.50 bits/weight) gives a mean cosine of 0.971 on 300 valid paragraphs;
- split at 4000 rows, 4 bits/64 and 2 bits/256 (2.61 bits/weight), gives 0.995;
- the whole table at 3 bits/128 (3.50 bits/weight) gives 0.994.

The split happens in the graph, with standard ops around two plain Gathers. Those Gathers then become
RBEGathers like any other table:

    is_hot = Cast(mask, bool)                                  mask: uint8 [V], 1 for the frequent rows
    hot_index  = Where(is_hot, CumSum(mask) − 1, 0)            row of each token in the hot table
    cold_index = Where(is_hot, 0, CumSum(1 − mask) − 1)        ... and in the cold one
    rows = Where(Unsqueeze(Gather(is_hot, ids), −1),
                 Gather(hot_table, Gather(hot_index, ids)), Gather(cold_table, Gather(cold_index, ids)))

Everything left of the per-call Gathers is constant, and ONNX Runtime folds it when it loads the session.
The file adds only the mask, one byte per row, counted with the tables. Negative and out-of-range ids behave
as in the original Gather, since every index goes through a [V] table.

A table tied to an LM head (GPT-2's `logits = h · wteᵀ`, the head a MatMul on its own initializer holding
wteᵀ) is split on both sides, so the tie still stores each half once:

    logits = RBEMergeColumns(h · hotᵀ, h · coldᵀ, mask)     column v from the first input where mask[v] = 1

That op (FORMAT.md §2.3) is the op library's: ONNX's own way, a Gather along the last axis of the two products'
Concat, copies one element at a time and took 0.4 ms a token on GPT-2's 50257 logits (140 ms for a 256-token
prefill), more than a whole ref-gpt2 decode step.

The rare rows are rarely read and, as logits, carry little of the next-token distribution, so both uses
tolerate a coarse code there. On ref-gpt2 at `--target-bpw 3.3` (64 WikiText-2 test windows), the whole table
at 3 bits/256 gave a KL to fp32 of 0.00488; split, its 8952 frequent rows at 4 bits/128 and 41305 rare ones at
2 bits/128 leave the projections 4 to 9 bits instead of 2.5 to 5, and the KL is 0.00261 (BENCHMARKS.md).

The split is skipped for:
- tables below SPLIT_MIN_ROWS rows (position and segment tables);
- tables read by more than one node;
- tables tied to anything but one MatMul whose weight only it reads (a Gemm head, two heads).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fused_gemm import RBE_DOMAIN

SPLIT_MIN_ROWS = 4096
# Fraction of the calibration text the hot rows cover (WikiText-2 valid; the cut was chosen there).
HOT_COVERAGE = 0.95
METADATA_KEY = "rbe_vocab_splits"


@dataclass
class VocabSplit:
    """One split table: the original initializer's name and the three that replace it."""

    table: str
    hot: str
    cold: str
    mask: str
    rows: int
    hot_rows: int
    head: str = ""  # the tied LM head's weight initializer ([D, V]), split into f"{head}.hot" and ".cold"


def hot_rows(counts: np.ndarray, coverage: float = HOT_COVERAGE) -> np.ndarray:
    """Bool [V]: the most frequent tokens that together make up `coverage` of the counted text (tokens never
    seen are never hot; at most half of the rows, at least one)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"token counts must be a 1-D array over the vocabulary, got shape {counts.shape}")
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    covered = np.cumsum(counts[order]) / max(total, 1)
    n = int(np.searchsorted(covered, coverage) + 1)
    n = max(1, min(n, int((counts > 0).sum()), counts.size // 2))
    hot = np.zeros(counts.size, bool)
    hot[order[:n]] = True
    return hot


def _tied_heads(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """MatMul/Gemm nodes by the digest of their weight in the [V, D] orientation a table would have if tied
    to it."""
    init = {t.name: t for t in graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for name in node.input[1:2]:
            if name in init and len(init[name].dims) == 2:
                W = numpy_helper.to_array(init[name]).astype(np.float32, copy=False)
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                digest = hashlib.sha256(np.ascontiguousarray(W if trans_b else W.T).tobytes()).hexdigest()
                out.setdefault(digest, []).append(node)
    return out


def split_vocab_tables(model: onnx.ModelProto, counts: np.ndarray, coverage: float = HOT_COVERAGE,
                       exclude: str | None = None) -> list[VocabSplit]:
    """Splits every eligible Gather over a [V, D] table with V = len(counts) (a token table: its rows are the
    vocabulary the counts are over), and the LM head tied to it if any, in place; returns what it split and
    records it in the model's metadata (rbe_onnx.distill reassembles the tables from it). exclude: the
    rewrite's regex; a table it excludes stays whole (and in fp32)."""
    pattern = re.compile(exclude) if exclude else None
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    heads = None
    splits: list[VocabSplit] = []
    replaced: dict[str, list[onnx.NodeProto]] = {}  # by the output of the node they replace
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" and node.domain in ("", "ai.onnx") else ""
        t = init.get(table)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        eligible = (t is not None and len(t.dims) == 2 and t.dims[0] == len(counts) >= SPLIT_MIN_ROWS
                    and axis == 0 and readers.get(table) == 1 and t.data_type == TensorProto.FLOAT
                    and not (pattern and (pattern.search(node.name) or pattern.search(table))))
        head = None
        if eligible:
            E = numpy_helper.to_array(t)
            heads = _tied_heads(graph) if heads is None else heads
            tied = heads.get(hashlib.sha256(np.ascontiguousarray(E).tobytes()).hexdigest(), [])
            if tied:
                head = tied[0]
                eligible = (len(tied) == 1 and head.op_type == "MatMul" and readers.get(head.input[1]) == 1
                            and init[head.input[1]].data_type == TensorProto.FLOAT
                            and not (pattern and (pattern.search(head.name) or pattern.search(head.input[1]))))
        if not eligible:
            continue
        hot = hot_rows(counts, coverage)
        split = VocabSplit(table, f"{table}.hot", f"{table}.cold", f"{table}.hot_mask", int(E.shape[0]),
                           int(hot.sum()), head=head.input[1] if head is not None else "")
        replaced[node.output[0]] = _split_nodes(node, split)
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(E[hot]), split.hot),
                                  numpy_helper.from_array(np.ascontiguousarray(E[~hot]), split.cold),
                                  numpy_helper.from_array(hot.astype(np.uint8), split.mask)])
        if head is not None:
            W = init[split.head]
            replaced[head.output[0]] = _head_nodes(head, split)
            graph.initializer.remove(W)
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(E[hot].T), f"{split.head}.hot"),
                                      numpy_helper.from_array(np.ascontiguousarray(E[~hot].T),
                                                              f"{split.head}.cold")])
        splits.append(split)
    if splits:
        nodes = [n for node in graph.node for n in replaced.get(node.output[0], [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        _record(model, splits)
        if any(s.head for s in splits) and not any(op.domain == RBE_DOMAIN for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid(RBE_DOMAIN, 1))
    return splits


def _split_nodes(node: onnx.NodeProto, s: VocabSplit) -> list[onnx.NodeProto]:
    ids, out, p = node.input[1], node.output[0], (node.name or s.table) + "/split"

    def name(suffix: str) -> str:
        return f"{p}/{suffix}"

    one = helper.make_tensor(name("one"), TensorProto.INT64, [], [1])
    zero = helper.make_tensor(name("zero"), TensorProto.INT64, [], [0])
    last = helper.make_tensor(name("last_axis"), TensorProto.INT64, [1], [-1])
    return [
        helper.make_node("Constant", [], [name("one")], name=name("one"), value=one),
        helper.make_node("Constant", [], [name("zero")], name=name("zero"), value=zero),
        helper.make_node("Constant", [], [name("last_axis")], name=name("last_axis"), value=last),
        helper.make_node("Cast", [s.mask], [name("mask64")], name=name("mask64"), to=TensorProto.INT64),
        helper.make_node("Cast", [s.mask], [name("is_hot")], name=name("is_hot"), to=TensorProto.BOOL),
        helper.make_node("CumSum", [name("mask64"), name("zero")], [name("hot_count")], name=name("hot_count")),
        helper.make_node("Sub", [name("hot_count"), name("one")], [name("hot_rank")], name=name("hot_rank")),
        helper.make_node("Sub", [name("one"), name("mask64")], [name("cold64")], name=name("cold64")),
        helper.make_node("CumSum", [name("cold64"), name("zero")], [name("cold_count")], name=name("cold_count")),
        helper.make_node("Sub", [name("cold_count"), name("one")], [name("cold_rank")], name=name("cold_rank")),
        helper.make_node("Where", [name("is_hot"), name("hot_rank"), name("zero")], [name("hot_index")],
                         name=name("hot_index")),
        helper.make_node("Where", [name("is_hot"), name("zero"), name("cold_rank")], [name("cold_index")],
                         name=name("cold_index")),
        # per call
        helper.make_node("Gather", [name("is_hot"), ids], [name("ids_hot")], name=name("ids_hot")),
        helper.make_node("Gather", [name("hot_index"), ids], [name("hot_ids")], name=name("hot_ids")),
        helper.make_node("Gather", [name("cold_index"), ids], [name("cold_ids")], name=name("cold_ids")),
        helper.make_node("Gather", [s.hot, name("hot_ids")], [name("hot_rows")], name=f"{p}/hot"),
        helper.make_node("Gather", [s.cold, name("cold_ids")], [name("cold_rows")], name=f"{p}/cold"),
        helper.make_node("Unsqueeze", [name("ids_hot"), name("last_axis")], [name("row_hot")],
                         name=name("row_hot")),
        helper.make_node("Where", [name("row_hot"), name("hot_rows"), name("cold_rows")], [out], name=p),
    ]


def _head_nodes(node: onnx.NodeProto, s: VocabSplit) -> list[onnx.NodeProto]:
    """The tied head `h · Wᵀ` as its hot and cold halves' products, merged back into vocabulary order."""
    h, out, p = node.input[0], node.output[0], (node.name or s.head) + "/split"
    return [
        helper.make_node("MatMul", [h, f"{s.head}.hot"], [f"{p}/hot_logits"], name=f"{p}/hot"),
        helper.make_node("MatMul", [h, f"{s.head}.cold"], [f"{p}/cold_logits"], name=f"{p}/cold"),
        helper.make_node("RBEMergeColumns", [f"{p}/hot_logits", f"{p}/cold_logits", s.mask], [out], name=p,
                         domain=RBE_DOMAIN),
    ]


def _record(model: onnx.ModelProto, splits: list[VocabSplit]) -> None:
    value = json.dumps([asdict(s) for s in recorded_splits(model) + splits])
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = value
            return
    model.metadata_props.add(key=METADATA_KEY, value=value)


def recorded_splits(model: onnx.ModelProto) -> list[VocabSplit]:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return [VocabSplit(**s) for s in json.loads(prop.value)]
    return []


def assemble(split: VocabSplit, hot_table: np.ndarray, cold_table: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The [V, D] table the split came from (or its decoded approximation, given decoded halves)."""
    hot = np.asarray(mask).astype(bool)
    out = np.empty((split.rows, hot_table.shape[1]), dtype=np.float32)
    out[hot], out[~hot] = hot_table, cold_table
    return out
