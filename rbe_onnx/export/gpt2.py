"""Export a Hugging Face GPT-2 LM head model to ONNX with a KV cache held in buffers written in place.

The forward pass is re-implemented on top of the HF parameters instead of tracing HF's own forward: HF's cache
classes, SDPA dispatch and mask helpers trace into graphs with baked-in sequence lengths or `is_causal` flags,
whereas here every mask is built from the dynamic input shapes inside the graph. Hidden states travel as 2-D
rows [batch * seq, width], so each projection is a bare Gemm, and the only reshapes per layer use a constant
shape or one shape tensor computed per graph: a decode step runs no per-layer shape arithmetic.

This module also holds the file handling shared with `bert.py` (saving, copying tokenizer files, metadata).
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.onnx.operators import reshape_from_tensor_shape, shape_as_tensor

from ..runtime.feeds import KV_CAPACITY_AXIS

# onnxruntime 1.31 loads IR <= 13, while onnx 1.23 stamps 14 on anything it saves.
ONNX_IR_VERSION = 10
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD = 1_900_000_000

GPT2_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "config.json", "generation_config.json")


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers (also used by bert.py)
# ----------------------------------------------------------------------------------------------------------------

def token_shape(input_ids: torch.Tensor, *trailing: int) -> torch.Tensor:
    """The int64 tensor [batch, seq, *trailing], one Shape + Concat per graph that every layer's reshape reads.

    Tracing `x.view(batch, seq, ...)` instead exports the sizes it reads as a Shape/Gather/Unsqueeze/Concat chain
    at every call, dozens of tiny nodes per layer that each cost a kernel launch per decode step.
    """
    return torch.cat([shape_as_tensor(input_ids), torch.tensor(trailing, dtype=torch.int64)])


def gemm_linear(rows: torch.Tensor, weight_in_out: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`rows @ W + b` on [tokens, in] rows, as `addmm` so it exports as a single ONNX Gemm (transA=0, transB=0,
    1-D bias) whose weight is the [in, out] initializer itself.

    The models keep their hidden states as 2-D rows [batch * seq, width] between attention blocks, because
    Gemm takes 2-D inputs only: 3-D activations would need a reshape on each side of every projection.
    """
    return torch.addmm(bias, rows, weight_in_out)


def split_heads(rows: torch.Tensor, heads_shape: torch.Tensor) -> torch.Tensor:
    """Rows [batch * seq, n * head_dim] -> [batch, n, seq, head_dim], `heads_shape` = [batch, seq, n, head_dim]."""
    return reshape_from_tensor_shape(rows, heads_shape).transpose(1, 2)


def merge_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, n_head, seq, head_dim] -> rows [batch * seq, width = n_head * head_dim].

    `width` comes from the config: read off `x.shape` under tracing, it would export as Shape/Gather ops."""
    return x.transpose(1, 2).reshape(-1, width)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Softmax attention where `keep` (bool, broadcastable to the score shape) selects visible keys.

    Hidden scores get the most negative finite float rather than -inf so that rows with no visible key (queries
    at left-padding positions) give a harmless uniform average instead of NaN, as HF does.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def export_to_onnx(module: nn.Module, args: tuple, out_path: Path, *, input_names: list[str],
                   output_names: list[str], dynamic_axes: dict, opset: int,
                   external_data: bool | None) -> Path:
    """Trace `module` with the TorchScript exporter and write a file onnxruntime 1.31 accepts.

    The TorchScript exporter is used because it maps `addmm` to Gemm one to one and constant-folds the weight
    preprocessing; it traces shape reads (`x.shape[i]`) as Shape/Gather ops, so everything derived from shapes
    stays dynamic. The traced file goes to a scratch folder first: for >2 GB models torch writes one external
    file per tensor, which we then regroup into a single `model.onnx.data`.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as scratch:
        traced = Path(scratch) / "traced.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notice of the TorchScript exporter, tracer warnings
            example_outputs = module(*args)
            torch.onnx.export(module, args, str(traced), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True, custom_opsets={"com.microsoft": 1})
        model = onnx.load(str(traced))
    undo_initializer_dedup(model)
    set_static_output_dims(model, example_outputs, dynamic_axes)
    save_onnx(model, out_path, external_data=external_data)
    return out_path


def set_static_output_dims(model: onnx.ModelProto, example_outputs, dynamic_axes: dict) -> None:
    """Give every graph-output axis that is not a dynamic axis its traced size.

    The exporter infers no sizes through a Reshape whose shape is computed (`token_shape`) and names the ones it
    does not know (`..._dim_2`); those axes are static, e.g. BERT's hidden size.
    """
    examples = example_outputs if isinstance(example_outputs, (tuple, list)) else (example_outputs,)
    for value, example in zip(model.graph.output, examples):
        dynamic = dynamic_axes.get(value.name, {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis not in dynamic:
                dim.dim_value = example.shape[axis]


def undo_initializer_dedup(model: onnx.ModelProto) -> None:
    """Give back each weight its own initializer.

    The TorchScript exporter merges initializers with equal values (e.g. the all-zero biases of a freshly
    initialised model) and re-creates the duplicates as `Identity(initializer)` nodes. Compression passes look
    for Gemm/MatMul weights that are initializers and rewrite them per node, so a weight hidden behind an
    Identity or shared between nodes would be missed or clobbered; copies restore the one-weight-per-node form.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def save_onnx(model: onnx.ModelProto, out_path: Path, *, external_data: bool | None = None) -> None:
    """Save with the IR version ORT accepts; weights go to `<name>.data` when asked or when over ~2 GB."""
    model.ir_version = ONNX_IR_VERSION
    if external_data is None:
        external_data = _initializer_bytes(model) > _EXTERNAL_DATA_THRESHOLD
    data_path = out_path.with_name(out_path.name + ".data")
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file
    if external_data:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
        onnx.checker.check_model(str(out_path))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(out_path))


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def copy_model_files(model_dir: Path, out_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Copy the tokenizer/config files that exist in `model_dir`; returns the names copied."""
    copied = []
    for name in names:
        src = model_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied


def write_export_info(out_dir: Path, info: dict) -> None:
    (out_dir / "rbe_export.json").write_text(json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# GPT-2
# ----------------------------------------------------------------------------------------------------------------

def causal_padding_keep(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool [batch, 1, seq, past+seq]: key j is visible to query i iff it is not padding and j <= past + i.

    Both lengths come from tensor shapes, so under tracing they become Shape ops and the mask follows the
    runtime sizes (prefill, one-token decode and multi-token decode all use the same graph).
    """
    total_len = attention_mask.shape[1]
    key_pos = torch.arange(total_len, device=attention_mask.device)
    query_pos = torch.arange(seq_len, device=attention_mask.device) + (total_len - seq_len)
    causal = key_pos[None, :] <= query_pos[:, None]
    return causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]


class CacheAttention(torch.autograd.Function):
    """Attention that appends this step's keys/values into a KV buffer in place: one ORT
    `com.microsoft.MultiHeadAttention` node with `past_sequence_length`.

    past_key/past_value are [batch, heads, capacity, head_dim] buffers whose first `past_len` positions hold
    the cache; the new keys/values go to positions past_len .. past_len+seq and the buffer comes back as the
    present, same shape. When the caller binds past and present to the same memory, ORT writes only the new
    positions, so a decode step copies nothing of the past: the Concat form of the cache copied all of it at
    every step and every layer (about 5 µs per cached position per step on a GPT-2-small shape).
    `bias` is the additive mask [batch, 1, seq, past+seq]; `past_len` is int32 [1].

    The forward is what ORT computes, for tracing and for checking the export against the HF model.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, past_key, past_value, past_len, n_head: int, scale: float):
        batch, seq, width = q.shape
        start = int(past_len[0])
        end = start + seq
        if end > past_key.shape[2]:
            raise ValueError(f"KV buffer of {past_key.shape[2]} positions cannot take {start} + {seq}")

        def heads(x):
            return x.reshape(batch, seq, n_head, width // n_head).transpose(1, 2)

        key, value = past_key.clone(), past_value.clone()
        key[:, :, start:end] = heads(k)
        value[:, :, start:end] = heads(v)
        scores = torch.matmul(heads(q), key[:, :, :end].transpose(-1, -2)) * scale + bias
        context = torch.matmul(torch.softmax(scores, dim=-1), value[:, :, :end])
        return context.transpose(1, 2).reshape(batch, seq, width), key, value

    @staticmethod
    def symbolic(g, q, k, v, bias, past_key, past_value, past_len, n_head: int, scale: float):
        from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor as absent

        outputs = g.op("com.microsoft::MultiHeadAttention", q, k, v, absent(g), absent(g), bias, past_key,
                       past_value, past_len, num_heads_i=n_head, scale_f=scale, outputs=3)
        for out, like in zip(outputs, (q, past_key, past_value)):
            out.setType(like.type())  # torch has no shape inference for contrib ops
        return outputs


def additive_mask(keep: torch.Tensor) -> torch.Tensor:
    """0 where `keep`, else the most negative finite float: a query whose keys are all hidden (a left-padding
    position) then averages them uniformly instead of giving NaN, as HF does."""
    hidden = torch.full((), torch.finfo(torch.float32).min)
    return torch.where(keep, torch.zeros(()), hidden)


class Gpt2KvGraph(nn.Module):
    """GPT-2 forward over a KV buffer written in place (`CacheAttention`), sharing the parameters of a
    `GPT2LMHeadModel`."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 models with cross-attention are not supported")
        body = hf_model.transformer
        self.wte, self.wpe, self.h, self.ln_f = body.wte, body.wpe, body.h, body.ln_f
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.scales = [self._attention_scale(cfg, i) for i in range(cfg.n_layer)]
        # A separate [n_embd, vocab] copy of the (usually tied) head weight: the graph then has a plain
        # MatMul on a constant initializer instead of MatMul(Transpose(wte)).
        head = hf_model.lm_head.weight.detach().t().contiguous()
        self.lm_head_weight = nn.Parameter(head, requires_grad=False)

    @staticmethod
    def _attention_scale(cfg, layer_idx: int) -> float:
        scale = 1.0 / math.sqrt(cfg.n_embd // cfg.n_head) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        return scale

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = (self.wte(input_ids) + self.wpe(position_ids)).reshape(-1, self.n_embd)
        bias = additive_mask(causal_padding_keep(attention_mask, input_ids.shape[1]))
        # The cached length: the mask covers past + new positions, the KV buffers may be longer.
        past_len = (shape_as_tensor(attention_mask)[1:] - shape_as_tensor(input_ids)[1:]).to(torch.int32)
        qkv_shape = token_shape(input_ids, 3 * self.n_embd)
        presents = []
        for i, block in enumerate(self.h):
            x, key, value = self._block(block, x, past[2 * i], past[2 * i + 1], bias, past_len, qkv_shape,
                                        self.scales[i])
            presents += [key, value]
        x = reshape_from_tensor_shape(self.ln_f(x), token_shape(input_ids, self.n_embd))
        logits = torch.matmul(x, self.lm_head_weight)
        return (logits, *presents)

    def _block(self, block, x, past_key, past_value, bias, past_len, qkv_shape, scale):
        attn = block.attn
        qkv = gemm_linear(block.ln_1(x), attn.c_attn.weight, attn.c_attn.bias)
        q, k, v = reshape_from_tensor_shape(qkv, qkv_shape).split(self.n_embd, dim=2)
        context, key, value = CacheAttention.apply(q, k, v, bias, past_key, past_value, past_len, self.n_head,
                                                   scale)
        x = x + gemm_linear(context.reshape(-1, self.n_embd), attn.c_proj.weight, attn.c_proj.bias)
        mlp = block.mlp
        hidden = mlp.act(gemm_linear(block.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias))
        x = x + gemm_linear(hidden, mlp.c_proj.weight, mlp.c_proj.bias)
        return x, key, value


def gpt2_io_names(n_layer: int) -> tuple[list[str], list[str], dict]:
    """Optimum's input/output names and the dynamic axes of each."""
    past_names, present_names = [], []
    for i in range(n_layer):
        past_names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present_names += [f"present.{i}.key", f"present.{i}.value"]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    # One buffer shape for past and present: the present is the past buffer with this step's positions filled.
    axes.update({n: {0: "batch_size", 2: KV_CAPACITY_AXIS} for n in past_names + present_names})
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names]
    return inputs, ["logits", *present_names], axes


def _tracing_inputs(cfg, batch: int = 2, past_len: int = 5, seq_len: int = 3, capacity: int = 11) -> tuple:
    """Example inputs with distinct, non-trivial sizes so no size is mistaken for a broadcastable 1."""
    head_dim = cfg.n_embd // cfg.n_head
    input_ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), dtype=torch.int64)
    attention_mask = torch.ones(batch, past_len + seq_len, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq_len, dtype=torch.int64).expand(batch, -1)
    past = [torch.zeros(batch, cfg.n_head, capacity, head_dim) for _ in range(2 * cfg.n_layer)]
    return (input_ids, attention_mask, position_ids, *past)


def load_gpt2(model_dir: str | Path) -> nn.Module:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()


def export_gpt2(model_dir: str | Path, out_dir: str | Path, *, opset: int = 17,
                external_data: bool | None = None) -> Path:
    """Export a local HF `GPT2LMHeadModel` folder to `out_dir/model.onnx` (plus tokenizer, config and
    `rbe_export.json`). `external_data=None` stores weights in `model.onnx.data` only when they exceed ~2 GB."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf_model = load_gpt2(model_dir)
    cfg = hf_model.config
    inputs, outputs, axes = gpt2_io_names(cfg.n_layer)
    out_path = export_to_onnx(Gpt2KvGraph(hf_model).eval(), _tracing_inputs(cfg), out_dir / "model.onnx",
                              input_names=inputs, output_names=outputs, dynamic_axes=axes, opset=opset,
                              external_data=external_data)
    copy_model_files(model_dir, out_dir, GPT2_FILES)
    write_export_info(out_dir, {
        "model_type": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "head_dim": cfg.n_embd // cfg.n_head, "n_positions": cfg.n_positions, "vocab_size": cfg.vocab_size,
        "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id})
    from .genai_config import write_genai_config  # onnxruntime-genai: config, tokenizer files, op library copy
    write_genai_config(out_dir, model_dir)
    return out_path
