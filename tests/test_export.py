"""ONNX exports of GPT-2 and BERT checked against HF transformers (torch) on padded batches and KV-cache decoding."""
from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

GPT2_TEXTS = ["The tower is 324 metres tall, about the same height as an 81-storey building",
              "Robert Boulter is an English actor"]
BERT_PAIRS = [("A man is playing a guitar on the stage.", "Someone performs music."),
              ("Hello world", "Hi")]
GPT2_MODELS = ["tiny_gpt2", "ref_gpt2"]
BERT_MODELS = ["tiny_bert", "minilm"]


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def hf_gpt2(model_dir: str):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def hf_bert(model_dir: str):
    from transformers import BertModel

    return BertModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()


def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, rel: float = 1e-3) -> None:
    """Max abs difference within `rel` of the reference's largest magnitude."""
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = rel * float(np.abs(expected).max()) + 1e-6
    diff = float(np.abs(actual - expected).max())
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded ids, mask, and the caller-side position ids (cumsum(mask) - 1, clipped at 0)."""
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    return ids, mask, positions_for(mask, width)


def positions_for(mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Position ids of the last `seq_len` tokens of a (past + new) attention mask."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, -seq_len:].astype(np.int64)


class Gpt2Onnx:
    """Runs the exported decoder, feeding presents back as the next call's past (plain `session.run`: ORT copies
    each KV buffer into a fresh present instead of writing it in place)."""

    def __init__(self, session, info: dict):
        self.session, self.info = session, info

    def empty_past(self, batch: int, capacity: int) -> list[np.ndarray]:
        """KV buffers with room for `capacity` positions, filled with NaN: positions the graph has not written
        must never be read."""
        shape = (batch, self.info["n_head"], capacity, self.info["head_dim"])
        return [np.full(shape, np.nan, np.float32) for _ in range(2 * self.info["n_layer"])]

    def run(self, ids, mask, positions, past) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for i in range(self.info["n_layer"]):
            feeds[f"past_key_values.{i}.key"] = past[2 * i]
            feeds[f"past_key_values.{i}.value"] = past[2 * i + 1]
        logits, *presents = self.session.run(None, feeds)
        return logits, presents


def hf_gpt2_row(model, tokens: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """HF logits [n, vocab] and per-layer [key, value, ...] caches [heads, n, head_dim] of one unpadded row."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=True)
    cache = []
    for layer in out.past_key_values.layers:
        cache += [layer.keys[0].numpy(), layer.values[0].numpy()]
    return out.logits[0].numpy(), cache


def check_presents(presents, mask: np.ndarray, rows: list[list[int]], model, what: str) -> None:
    """Presents at each row's non-padded (right-aligned) positions of the cached span (the mask's width) equal
    HF's cache of that row."""
    total = mask.shape[1]
    for r, row in enumerate(rows):
        _, cache = hf_gpt2_row(model, row)
        for j, (ours, ref) in enumerate(zip(presents, cache)):
            assert_close(ours[r, :, total - len(row):total], ref, f"{what} row {r} present {j}")


def gpt2_setup(request, name: str):
    model_dir = request.getfixturevalue(f"{name}_dir")
    onnx_dir = request.getfixturevalue(f"{name}_onnx_dir")
    info = json.loads((onnx_dir / "rbe_export.json").read_text())
    runner = Gpt2Onnx(request.getfixturevalue("ort_session")(onnx_dir), info)
    rows = [tokenizer(onnx_dir)(t)["input_ids"] for t in GPT2_TEXTS]
    return hf_gpt2(str(model_dir)), runner, rows, info


def prefill(runner: Gpt2Onnx, rows, pad_id: int, room: int = 5):
    """The prompt rows through KV buffers with `room` positions to spare for `extend`."""
    ids, mask, positions = left_pad(rows, pad_id)
    logits, presents = runner.run(ids, mask, positions, runner.empty_past(len(rows), ids.shape[1] + room))
    return mask, logits, presents


def extend(runner: Gpt2Onnx, mask, presents, new_tokens: list[list[int]]):
    """Feed `new_tokens` (same count per row) on top of the cache; returns the new mask, logits and presents."""
    ids = np.asarray(new_tokens, dtype=np.int64)
    mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
    logits, presents = runner.run(ids, mask, positions_for(mask, ids.shape[1]), presents)
    return mask, logits, presents


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def assert_plain_gemms(model: onnx.ModelProto, expected_count: int) -> None:
    """Every Gemm is x @ W + b with W a constant 2-D initializer and b a 1-D one, no transposes or scaling."""
    inits = initializers(model)
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == expected_count
    for node in gemms:
        weight, bias = inits.get(node.input[1]), inits.get(node.input[2])
        assert weight is not None and len(weight.dims) == 2, f"{node.name}: weight is not a 2-D initializer"
        assert bias is not None and list(bias.dims) == [weight.dims[1]], f"{node.name}: bias is not 1-D [out]"
        assert attr(node, "transA", 0) == 0 and attr(node, "transB", 0) == 0
        assert attr(node, "alpha", 1.0) == 1.0 and attr(node, "beta", 1.0) == 1.0


def assert_lean_shape_ops(model: onnx.ModelProto, reshapes_per_layer: int, n_layer: int) -> None:
    """Layers reshape with constant shapes or with a shape tensor computed once per graph, so the shape reads
    (Shape, Gather over activations, Unsqueeze: the causal mask and positions) do not grow with depth; every
    one of them costs a kernel launch per decode step."""
    inits = initializers(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    shape_gathers = sum(n.op_type == "Gather" and n.input[0] not in inits for n in model.graph.node)
    assert ops["Shape"] + shape_gathers + ops["Unsqueeze"] <= 12, dict(ops)
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == reshapes_per_layer * n_layer + 2  # plus rows in, [batch, seq, ...] out
    constants = set(inits) | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    shared = {n.input[1] for n in reshapes} - constants
    assert len(shared) <= 2, f"reshapes read {len(shared)} computed shapes, not the graph's shared ones"


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ----------------------------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", GPT2_MODELS)
def test_gpt2_prefill_then_decode_matches_hf(request, name):
    hf, runner, rows, info = gpt2_setup(request, name)
    assert len(rows[0]) != len(rows[1]), "the batch must need left padding"
    mask, logits, presents = prefill(runner, rows, info["eos_token_id"])
    for r, row in enumerate(rows):
        ref_logits, _ = hf_gpt2_row(hf, row)
        assert_close(logits[r, -len(row):], ref_logits, f"prefill logits row {r}")
    check_presents(presents, mask, rows, hf, "prefill")

    # One greedy decode step on the returned cache, compared with HF recomputing each whole row.
    next_tokens = [[int(logits[r, -1].argmax())] for r in range(len(rows))]
    mask, logits, presents = extend(runner, mask, presents, next_tokens)
    rows = [row + tok for row, tok in zip(rows, next_tokens)]
    assert logits.shape == (len(rows), 1, info["vocab_size"])
    for r, row in enumerate(rows):
        ref_logits, _ = hf_gpt2_row(hf, row)
        assert_close(logits[r], ref_logits[-1:], f"decode logits row {r}")
    check_presents(presents, mask, rows, hf, "decode")


@pytest.mark.parametrize("name", GPT2_MODELS)
def test_gpt2_multi_token_with_past_matches_hf(request, name):
    hf, runner, rows, info = gpt2_setup(request, name)
    prompt_rows = [row[:-3] for row in rows]  # the last 3 tokens of each row arrive in one call with past > 0
    mask, _, presents = prefill(runner, prompt_rows, info["eos_token_id"])
    mask, logits, presents = extend(runner, mask, presents, [row[-3:] for row in rows])
    assert mask.shape[1] == max(map(len, prompt_rows)) + 3
    assert presents[0].shape[2] == max(map(len, prompt_rows)) + 5, "the present is the past's buffer"
    for r, row in enumerate(rows):
        ref_logits, _ = hf_gpt2_row(hf, row)
        assert_close(logits[r], ref_logits[-3:], f"multi-token logits row {r}")
    check_presents(presents, mask, rows, hf, "multi-token")


def test_gpt2_batch_one_without_padding(request):
    """The graph traced at batch 2 must also serve batch 1 with no padding and a long prompt."""
    hf, runner, rows, info = gpt2_setup(request, "ref_gpt2")
    row = (rows[0] * 4)[:info["n_positions"]]
    _, logits, _ = prefill(runner, [row], info["eos_token_id"])
    ref_logits, _ = hf_gpt2_row(hf, row)
    assert_close(logits[0], ref_logits, "long prefill logits")


@pytest.mark.parametrize("name", GPT2_MODELS)
def test_gpt2_graph_structure(request, name):
    onnx_dir = request.getfixturevalue(f"{name}_onnx_dir")
    info = json.loads((onnx_dir / "rbe_export.json").read_text())
    model = onnx.load(str(onnx_dir / "model.onnx"))
    assert model.ir_version == 10
    n = info["n_layer"]
    assert_plain_gemms(model, expected_count=4 * n)  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert_lean_shape_ops(model, reshapes_per_layer=2, n_layer=n)  # split heads of q/k/v together, merge heads
    concats = sum(node.op_type == "Concat" for node in model.graph.node)
    assert concats == 2, "two shape tensors per graph; the KV buffers are appended to in place"
    attention = [node for node in model.graph.node if node.op_type == "MultiHeadAttention"]
    assert len(attention) == n and all(node.domain == "com.microsoft" for node in attention)
    # past_sequence_length (input 8) is what makes ORT write the new positions into the past's buffer.
    assert all(len(node.input) == 9 and node.input[8] for node in attention)

    inits = initializers(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    head = producer["logits"]
    assert head.op_type == "MatMul"
    assert list(inits[head.input[1]].dims) == [info["n_embd"], info["vocab_size"]]

    inputs = {v.name: dims(v) for v in model.graph.input}
    outputs = {v.name: dims(v) for v in model.graph.output}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    kv = [info["n_head"], info["head_dim"]]
    for i in range(n):
        for part in ("key", "value"):
            past = inputs[f"past_key_values.{i}.{part}"]
            present = outputs[f"present.{i}.{part}"]
            assert [past[1], past[3]] == kv and [present[1], present[3]] == kv
            assert isinstance(past[2], str) and isinstance(present[2], str), "cache length must be dynamic"
    assert outputs["logits"] == ["batch_size", "sequence_length", info["vocab_size"]]
    for v in model.graph.input:
        expected = onnx.TensorProto.INT64 if v.name in ("input_ids", "attention_mask", "position_ids") \
            else onnx.TensorProto.FLOAT
        assert v.type.tensor_type.elem_type == expected, v.name


def test_gpt2_export_files_and_info(ref_gpt2_dir, ref_gpt2_onnx_dir):
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "config.json",
                 "generation_config.json"):
        assert (ref_gpt2_onnx_dir / name).is_file(), name
    assert not (ref_gpt2_onnx_dir / "model.onnx.data").exists(), "small models are a single file"
    info = json.loads((ref_gpt2_onnx_dir / "rbe_export.json").read_text())
    assert info == {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256, "head_dim": 64,
                    "n_positions": 256, "vocab_size": 50257, "eos_token_id": 50256, "bos_token_id": 50256}


def test_gpt2_external_data_export(tiny_gpt2_dir, tiny_gpt2_onnx_dir, tmp_path, ort_session):
    """The >2 GB path (weights in model.onnx.data), forced on a small model, gives the same outputs."""
    from rbe_onnx.export import export_gpt2

    path = export_gpt2(tiny_gpt2_dir, tmp_path, external_data=True)
    assert (tmp_path / "model.onnx.data").is_file()
    assert path.stat().st_size < 1_000_000, "weights should live in the data file"
    info = json.loads((tmp_path / "rbe_export.json").read_text())
    rows = [[464, 3290, 318], [15496]]
    external = prefill(Gpt2Onnx(ort_session(tmp_path), info), rows, 50256)[1]
    inline = prefill(Gpt2Onnx(ort_session(tiny_gpt2_onnx_dir), info), rows, 50256)[1]
    np.testing.assert_array_equal(external, inline)


# ----------------------------------------------------------------------------------------------------------------
# BERT
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BERT_MODELS)
def test_bert_matches_hf_with_padding(request, ort_session, name):
    model_dir = request.getfixturevalue(f"{name}_dir")
    onnx_dir = request.getfixturevalue(f"{name}_onnx_dir")
    firsts, seconds = zip(*BERT_PAIRS)
    batch = tokenizer(onnx_dir)(list(firsts), list(seconds), padding=True, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    assert feeds["attention_mask"].min() == 0 and feeds["token_type_ids"].max() == 1, "need padding and pairs"
    (hidden,) = ort_session(onnx_dir).run(None, feeds)
    with torch.no_grad():
        ref = hf_bert(str(model_dir))(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    for r, length in enumerate(feeds["attention_mask"].sum(axis=1)):
        assert_close(hidden[r, :length], ref[r, :length].numpy(), f"last_hidden_state row {r}")


@pytest.mark.parametrize("name", BERT_MODELS)
def test_bert_graph_structure(request, name):
    onnx_dir = request.getfixturevalue(f"{name}_onnx_dir")
    info = json.loads((onnx_dir / "rbe_export.json").read_text())
    assert info["model_type"] == "bert"
    model = onnx.load(str(onnx_dir / "model.onnx"))
    assert model.ir_version == 10
    assert_plain_gemms(model, expected_count=6 * info["n_layer"])  # q, k, v, attn out, intermediate, out
    assert_lean_shape_ops(model, reshapes_per_layer=4, n_layer=info["n_layer"])  # split q, k, v; merge heads
    assert [v.name for v in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(dims(v) == ["batch_size", "sequence_length"] for v in model.graph.input)
    (out,) = model.graph.output
    assert out.name == "last_hidden_state"
    assert dims(out) == ["batch_size", "sequence_length", info["hidden_size"]]
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (onnx_dir / name).is_file(), name
