"""Input feeds for exported GPT-2 graphs (Optimum names, see rbe_onnx.export.gpt2)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Gpt2Shape:
    n_layer: int
    n_head: int
    head_dim: int
    n_positions: int
    vocab_size: int
    eos_token_id: int | None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Gpt2Shape":
        path = Path(model_dir) / "rbe_export.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: export the model with `rbe-onnx export gpt2` first")
        info = json.loads(path.read_text())
        if info.get("model_type") != "gpt2":
            raise ValueError(f"{model_dir} holds a {info.get('model_type')} export, not gpt2")
        return cls(info["n_layer"], info["n_head"], info["head_dim"], info["n_positions"], info["vocab_size"],
                   info.get("eos_token_id"))


def prefill_feeds(shape: Gpt2Shape, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict:
    """Feeds for a forward pass with no past: position ids follow the mask (left padding allowed)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)}
    empty = np.zeros((ids.shape[0], shape.n_head, 0, shape.head_dim), dtype=np.float32)
    for i in range(shape.n_layer):
        feeds[f"past_key_values.{i}.key"] = empty
        feeds[f"past_key_values.{i}.value"] = empty
    return feeds
