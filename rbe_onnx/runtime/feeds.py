"""Input feeds for exported GPT-2 graphs (Optimum names; KV buffers written in place, see rbe_onnx.export.gpt2)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The name export_gpt2 gives the position axis of the past/present KV buffers. Exports from before the buffers
# were written in place named it past_sequence_length / total_sequence_length, so the runtime tells them apart.
KV_CAPACITY_AXIS = "kv_capacity"


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


def check_kv_layout(session) -> None:
    """ValueError if a GPT-2 session's graph has the KV layout of older exports (Concat presents, past axis named
    past_sequence_length), which would read `prefill_feeds`' KV buffers as a cached past. No-op without a cache."""
    for value in session.get_inputs():
        cached = value.name.startswith("past_key_values.") and len(value.shape) == 4
        if cached and value.shape[2] != KV_CAPACITY_AXIS:
            raise ValueError(f"the graph's KV cache axis is {value.shape[2]!r}, not {KV_CAPACITY_AXIS!r}: an export by "
                             "an older rbe-onnx, whose presents are Concat copies; export it again with "
                             "`rbe-onnx export gpt2` (and rewrite that)")


def prefill_feeds(shape: Gpt2Shape, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                  capacity: int | None = None) -> dict:
    """Feeds for a forward pass with no past: position ids follow the mask (left padding allowed). The KV
    buffers hold `capacity` positions (default: just the input's), and the presents come back as those
    buffers with the input's positions filled, ready to be fed back as the next call's past."""
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)}
    capacity = ids.shape[1] if capacity is None else capacity
    if capacity < ids.shape[1]:
        raise ValueError(f"a KV capacity of {capacity} positions cannot hold the {ids.shape[1]} input tokens")
    room = np.zeros((ids.shape[0], shape.n_head, capacity, shape.head_dim), dtype=np.float32)
    for i in range(shape.n_layer):
        feeds[f"past_key_values.{i}.key"] = room
        feeds[f"past_key_values.{i}.value"] = room
    return feeds
