"""Export a Hugging Face `BertModel` encoder to ONNX (inputs ids/mask/token types, output last_hidden_state).

As for GPT-2, the forward pass is re-implemented over the HF parameters: HF's mask helpers and attention
dispatch are not needed for a plain bidirectional encoder and trace less predictably than an explicit graph.
Every linear layer becomes a Gemm on an [in, out] initializer, the same pattern as GPT-2's Conv1D projections,
so later compiler passes see one kind of projection for both model families; as there, hidden states are 2-D
rows between the attention blocks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.onnx.operators import reshape_from_tensor_shape

from .gpt2 import copy_model_files, export_to_onnx, gemm_linear, masked_attention, merge_heads, split_heads, \
    token_shape, write_export_info

BERT_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


class GemmDense(nn.Module):
    """An `nn.Linear` whose weight is stored transposed ([in, out]) so it exports as Gemm with transB=0."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return gemm_linear(x, self.weight, self.bias)


class _BertLayer(nn.Module):
    """One encoder layer on hidden-state rows [batch * seq, hidden]."""

    def __init__(self, hf_layer: nn.Module, n_head: int):
        super().__init__()
        attn = hf_layer.attention
        self.query = GemmDense(attn.self.query)
        self.key = GemmDense(attn.self.key)
        self.value = GemmDense(attn.self.value)
        self.width = self.query.weight.shape[1]
        self.scale = 1.0 / (self.width // n_head) ** 0.5
        self.attn_out = GemmDense(attn.output.dense)
        self.attn_ln = attn.output.LayerNorm
        self.intermediate = GemmDense(hf_layer.intermediate.dense)
        self.act = hf_layer.intermediate.intermediate_act_fn
        self.out = GemmDense(hf_layer.output.dense)
        self.out_ln = hf_layer.output.LayerNorm

    def forward(self, x, keep, heads_shape):
        q, k, v = (split_heads(proj(x), heads_shape) for proj in (self.query, self.key, self.value))
        context = merge_heads(masked_attention(q, k, v, keep, self.scale), self.width)
        x = self.attn_ln(x + self.attn_out(context))
        return self.out_ln(x + self.out(self.act(self.intermediate(x))))


class BertEncoderGraph(nn.Module):
    """BERT embeddings + encoder over the parameters of a HF `BertModel` (the pooler is not exported)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        cfg = hf_model.config
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {cfg.position_embedding_type}")
        if getattr(cfg, "is_decoder", False):
            raise ValueError("BERT decoders are not supported")
        emb = hf_model.embeddings
        self.word, self.position, self.token_type = emb.word_embeddings, emb.position_embeddings, \
            emb.token_type_embeddings
        self.emb_ln = emb.LayerNorm
        self.n_head, self.hidden = cfg.num_attention_heads, cfg.hidden_size
        self.layers = nn.ModuleList(_BertLayer(layer, cfg.num_attention_heads) for layer in hf_model.encoder.layer)

    def forward(self, input_ids, attention_mask, token_type_ids):
        # Positions come from the dynamic sequence length, not a sliced buffer of the traced length.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)[None]
        x = self.emb_ln(x).reshape(-1, self.hidden)
        keep = attention_mask.bool()[:, None, None, :]
        heads_shape = token_shape(input_ids, self.n_head, self.hidden // self.n_head)
        for layer in self.layers:
            x = layer(x, keep, heads_shape)
        return reshape_from_tensor_shape(x, token_shape(input_ids, self.hidden))


def load_bert(model_dir: str | Path) -> nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32).eval()


def export_bert(model_dir: str | Path, out_dir: str | Path, *, opset: int = 17,
                external_data: bool | None = None) -> Path:
    """Export a local HF `BertModel` folder to `out_dir/model.onnx` (plus tokenizer, config and
    `rbe_export.json`). `external_data=None` stores weights in `model.onnx.data` only when they exceed ~2 GB."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf_model = load_bert(model_dir)
    cfg = hf_model.config
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in [*names, "last_hidden_state"]}
    example = (torch.randint(0, cfg.vocab_size, (2, 7)), torch.ones(2, 7, dtype=torch.int64),
               torch.zeros(2, 7, dtype=torch.int64))
    out_path = export_to_onnx(BertEncoderGraph(hf_model).eval(), example, out_dir / "model.onnx",
                              input_names=names, output_names=["last_hidden_state"], dynamic_axes=axes,
                              opset=opset, external_data=external_data)
    copy_model_files(model_dir, out_dir, BERT_FILES)
    write_export_info(out_dir, {
        "model_type": "bert", "n_layer": cfg.num_hidden_layers, "n_head": cfg.num_attention_heads,
        "hidden_size": cfg.hidden_size, "head_dim": cfg.hidden_size // cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "type_vocab_size": cfg.type_vocab_size, "pad_token_id": cfg.pad_token_id})
    return out_path
