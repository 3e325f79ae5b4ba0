"""Calibration statistics for error-feedback encoding: H = Σ xᵀx of each rewritten node's input.

Only WikiText-2 **valid** is ever read here; asking for another split is an error (the test split is for
evaluation alone).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .library import get_library_path

# numpy and onnx are imported where used: the CLI reads CALIBRATION_TOKENS for its help text, and its start-up
# loads neither (about 0.13 s).
if TYPE_CHECKING:
    import numpy as np
    import onnx

CALIBRATION_SPLIT = "valid"
# Tokens of WikiText-2 valid whose activations make each H. Error feedback fits every weight to them, and with
# few tokens per input dimension it fits that text rather than the model's inputs: on MiniLM (inputs of up to
# 1536), 8192 -> 65536 tokens took 1 - cos on held-out valid paragraphs from 0.0067 to 0.0056 at
# --target-bpw 4.5 --rotate --outliers 0.005 (131072: 0.0056) and from 0.0303 to 0.0260 at --target-bpw 3.3
# --rotate (BENCHMARKS.md, session 20).
CALIBRATION_TOKENS = 65536
# Batches whose xᵀx are summed in float32 before they are added into the float64 Hessian (_add_gram_upper).
GRAM_BATCHES = 8


def _check_split(split: str) -> None:
    if split != CALIBRATION_SPLIT:
        raise ValueError(f"calibration reads WikiText-2 {CALIBRATION_SPLIT!r} only, not {split!r}: "
                         "the test split is reserved for evaluation")


def _export_info(model_dir: Path) -> dict:
    path = model_dir / "rbe_export.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: --calibrate needs a model exported by `rbe-onnx export`")
    return json.loads(path.read_text())


def _tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: calibration needs the model's tokenizer")
    return Tokenizer.from_file(str(path))


def calibration_batches(model_dir: Path, tokens: int, batch: int = 4,
                        split: str = CALIBRATION_SPLIT) -> list[tuple[dict, np.ndarray]]:
    """(feeds, real-token mask [b, seq]) batches of WikiText-2 valid, shaped as the model is used.

    GPT-2: windows of running text (no padding). BERT: single paragraphs with [CLS]/[SEP] as a sentence
    encoder sees them, padded per batch; the mask marks the padding so it stays out of the statistics.
    """
    _check_split(split)
    import numpy as np

    from .datasets import wikitext2_paragraphs, wikitext2_text

    info = _export_info(model_dir)
    tok = _tokenizer(model_dir)
    if info["model_type"] == "gpt2":
        from .runtime.feeds import Gpt2Shape, prefill_feeds

        shape = Gpt2Shape.from_dir(model_dir)
        seq = min(256, shape.n_positions)
        ids = tok.encode(wikitext2_text(split)).ids
        n = max(1, min(len(ids) // seq, -(-tokens // seq)))
        windows = np.array(ids[: n * seq], dtype=np.int64).reshape(n, seq)
        return [(prefill_feeds(shape, w), np.ones(w.shape, bool)) for w in np.split(windows,
                                                                                  range(batch, n, batch))]
    tok.enable_truncation(min(128, info.get("max_position_embeddings", 128)))
    tok.enable_padding(pad_id=info.get("pad_token_id") or 0)
    rows = wikitext2_paragraphs(split)
    batches, seen, i = [], 0, 0
    while seen < tokens and i < len(rows):
        enc = tok.encode_batch(rows[i:i + batch])
        i += batch
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        batches.append(({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
                        mask.astype(bool)))
        seen += int(mask.sum())
    return batches


def token_counts(model_dir: Path, split: str = CALIBRATION_SPLIT, skip: list | None = None) -> np.ndarray:
    """How often each vocabulary entry occurs in WikiText-2 valid, tokenized whole, [vocab size] int64: GPT-2
    as running text, BERT as the paragraphs calibration_batches feeds (with [CLS]/[SEP], not truncated).

    skip: calibration_batches(model_dir, ...) whose text (their whole windows or paragraphs, which are the
    split's first) the counts leave out, so that text stays unseen by them."""
    _check_split(split)
    import numpy as np

    from .datasets import wikitext2_paragraphs, wikitext2_text

    info = _export_info(model_dir)
    skipped = [f["input_ids"] for f, _ in skip or []]
    tok = _tokenizer(model_dir)
    tok.no_truncation()
    tok.no_padding()
    counts = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    if info["model_type"] == "gpt2":  # the skipped windows are the text's first tokens, unpadded
        np.add.at(counts, tok.encode(wikitext2_text(split)).ids[sum(x.size for x in skipped):], 1)
        return counts
    for enc in tok.encode_batch(wikitext2_paragraphs(split)[sum(len(x) for x in skipped):]):  # a row a paragraph
        np.add.at(counts, enc.ids, 1)
    return counts


def _add_gram_upper(acc: np.ndarray, x: np.ndarray) -> None:
    """acc += the upper triangle of xᵀx for rows x, in place (BLAS syrk, half a product's work, in float32 into
    a Fortran-ordered float32 acc: a few batches' sum is good to ~1e-6 relative, far inside GPTQ's 1 %
    dampening, and the caller moves it into float64 every GRAM_BATCHES batches). In float64 with a full
    product, the sums took longer than the model runs that make the activations; moved into float64 batch by
    batch, the K x K additions (with the padding copies) took a quarter of a GPT-2-small calibration."""
    import numpy as np
    from scipy.linalg.blas import ssyrk

    out = ssyrk(1.0, np.asarray(x, dtype=np.float32).T, beta=1.0, c=acc, trans=0, overwrite_c=1)
    if out is not acc:  # overwrite_c holds only for a Fortran-ordered float32 acc, which the caller gives
        acc[...] = out


def _outputs_only(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are the named tensors alone, without the nodes and initializers that
    only fed the others: ORT runs every node of a graph whatever a run asks for (ref-gpt2, asked for its
    projections' inputs alone: 0.34 s a batch whole, 0.10 s cut), and a language model's head is a large share
    of its work (GPT-2-small: 30 % of the multiply-adds, ref-gpt2 80 %) and nothing the statistics read."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node
           for a in n.attribute):
        return probe  # a subgraph may read outer names its node does not list: keep everything
    wanted, keep = set(outputs), []
    for node in reversed(graph.node):  # the nodes are in topological order
        if wanted.intersection(node.output):
            keep.append(node)
            wanted.update(i for i in node.input if i)
    kept_init = [t for t in graph.initializer if t.name in wanted]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    kept_nodes = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept_nodes)
    return probe


def activation_hessians(model: onnx.ModelProto, model_dir: Path, activations: list[str],
                        tokens: int = CALIBRATION_TOKENS,
                        batch: int = 4, threads: int | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """Σ xᵀx (float64, K x K) for each named activation tensor, over `tokens` calibration tokens."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from tqdm import tqdm

    probe = _outputs_only(model, activations)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.register_custom_ops_library(get_library_path())  # a split LM head merges its halves with RBEMergeColumns
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    from .runtime.feeds import check_kv_layout

    check_kv_layout(session)
    hessians: dict[str, np.ndarray] = {}
    partial: dict[str, np.ndarray] = {}  # float32 sums of the last GRAM_BATCHES batches

    def flush() -> None:
        for name, acc in partial.items():
            hessians.setdefault(name, np.zeros(acc.shape, np.float64))[...] += acc
            acc[...] = 0.0

    for i, (feeds, real) in enumerate(tqdm(calibration_batches(model_dir, tokens, batch), desc="calibrating",
                                           unit="batch", disable=not progress)):
        outs = session.run(activations, feeds)
        keep = real.reshape(-1)
        for name, x in zip(activations, outs):
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] == keep.size and not keep.all():
                x = x[keep]
            if name not in partial:
                partial[name] = np.zeros((x.shape[-1], x.shape[-1]), np.float32, order="F")
            _add_gram_upper(partial[name], x)
        if (i + 1) % GRAM_BATCHES == 0:
            flush()
    flush()
    for name, upper in hessians.items():
        hessians[name] = np.triu(upper) + np.triu(upper, 1).T
    return hessians
