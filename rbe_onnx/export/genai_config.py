"""onnxruntime-genai support for GPT-2 exports: `genai_config.json`, the tokenizer files genai reads, and a copy
of the op library, so that `onnxruntime_genai.Model(folder)` runs the export (fp32 or RBE-rewritten) as it is.

What onnxruntime-genai 0.18 needs, and why the file looks the way it does:
- `model.type` is "decoder", genai's generic decoder-only model: it feeds input_ids, attention_mask,
  position_ids and one past tensor per layer for key and for value (names from the `%d` templates), exactly the
  Optimum layout `export_gpt2` writes. genai's own "gpt2" type is the legacy layout with one combined
  `past_%d` [2, batch, heads, past, head_dim] tensor per layer and fails on this graph (tests/test_integration.py
  pins the error).
- `past_present_share_buffer` is true: the graph's past and present are one max-length buffer per layer that
  its attention (ORT MultiHeadAttention with past_sequence_length) writes the new positions into, and genai
  then binds the same buffer to both, as Generator does.
- `custom_ops_library` names the op library relative to the folder, and the folder holds a copy: genai refuses a
  library outside the model folder or the working directory (symlinks are resolved before the check).
  `rewrite` passes a fresh copy on to the rewritten model's folder (compressor.copy_sidecar_files).
- genai's tokenizer (onnxruntime-extensions) reads tokenizer.json and tokenizer_config.json only; a checkpoint
  that has just vocab.json + merges.txt gets both written from its transformers tokenizer.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# HF generation_config.json keys that map one to one onto genai's search options.
_SEARCH_FROM_HF = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams")


def search_defaults(info: dict, generation_config: dict) -> dict:
    """Greedy decoding up to the context length, unless the checkpoint's generation_config.json says otherwise."""
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": info["n_positions"],
              "min_length": 0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
              "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
              "past_present_share_buffer": True}
    search.update({k: generation_config[k] for k in _SEARCH_FROM_HF if generation_config.get(k) is not None})
    return search


def genai_config(info: dict, *, library: str | None, generation_config: dict | None = None,
                 filename: str = "model.onnx") -> dict:
    """The genai_config.json content for a GPT-2 export described by its rbe_export.json `info`."""
    if info.get("model_type") != "gpt2":
        raise ValueError(f"genai_config.json is written for GPT-2 exports, not {info.get('model_type')!r}")
    n_layer = info["n_layer"]
    session_options: dict = {"log_id": "rbe-onnx", "provider_options": []}
    if library is not None:
        session_options["custom_ops_library"] = library
    decoder = {
        "filename": filename, "session_options": session_options,
        "head_size": info["head_dim"], "hidden_size": info["n_embd"], "num_attention_heads": info["n_head"],
        "num_key_value_heads": info["n_head"], "num_hidden_layers": n_layer,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    model: dict = {"type": "decoder", "context_length": info["n_positions"], "vocab_size": info["vocab_size"],
                   "decoder": decoder}
    # GPT-2 has no pad token; like HF generate, pad with EOS (genai pads batched prompts with it).
    eos, bos = info.get("eos_token_id"), info.get("bos_token_id")
    if eos is not None:
        model["eos_token_id"] = model["pad_token_id"] = eos
    if bos is not None:
        model["bos_token_id"] = bos
    return {"model": model, "search": search_defaults(info, generation_config or {})}


def ensure_tokenizer_files(out_dir: Path, model_dir: Path | None) -> list[str]:
    """Write tokenizer.json / tokenizer_config.json into `out_dir` where missing, from `model_dir`'s tokenizer
    as transformers loads it (e.g. from vocab.json + merges.txt); returns the names written."""
    missing = [name for name in GENAI_TOKENIZER_FILES if not (out_dir / name).is_file()]
    if not missing:
        return []
    source = model_dir if model_dir is not None else out_dir
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"onnxruntime-genai needs {', '.join(missing)} in {out_dir}, and no tokenizer "
                                f"could be loaded from {source} to write them: {exc}") from exc
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        for name in missing:
            if not (Path(scratch) / name).is_file():
                raise FileNotFoundError(f"the tokenizer of {source} saved no {name} (is it a fast tokenizer?)")
            shutil.copyfile(Path(scratch) / name, out_dir / name)
    return missing


def write_genai_config(out_dir: str | Path, model_dir: str | Path | None = None) -> Path:
    """Make the GPT-2 export in `out_dir` (model.onnx + rbe_export.json) loadable by onnxruntime-genai: write
    genai_config.json, the tokenizer files genai reads (from `model_dir`, the HF checkpoint, where missing) and a
    copy of the op library. Returns the config's path."""
    from ..api import bundle_library

    out_dir = Path(out_dir)
    info = json.loads((out_dir / "rbe_export.json").read_text())
    gen_path = out_dir / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    ensure_tokenizer_files(out_dir, Path(model_dir) if model_dir is not None else None)
    library = bundle_library(out_dir).name
    path = out_dir / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(info, library=library, generation_config=generation_config),
                               indent=2) + "\n")
    return path
