"""A minimal KV-cached greedy loop (batch 1): prefill once, then one token per step feeding the presents back."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .feeds import Gpt2Shape, prefill_feeds


@dataclass
class GreedyResult:
    tokens: list[int]
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)

    @property
    def decode_ms_median(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else float("nan")


def greedy_generate(session, shape: Gpt2Shape, prompt_ids: list[int], max_new_tokens: int) -> GreedyResult:
    if not prompt_ids:
        raise ValueError("prompt is empty: at least one token is needed")
    if len(prompt_ids) + max_new_tokens > shape.n_positions:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + {max_new_tokens} new tokens exceeds the "
                         f"model's context of {shape.n_positions} positions")
    outputs = [o.name for o in session.get_outputs()]
    feeds = prefill_feeds(shape, np.array([prompt_ids], dtype=np.int64))
    t0 = time.perf_counter()
    result = dict(zip(outputs, session.run(outputs, feeds)))
    out = GreedyResult(tokens=[], prefill_ms=1e3 * (time.perf_counter() - t0))
    length = len(prompt_ids)
    for step in range(max_new_tokens):
        token = int(result["logits"][0, -1].argmax())
        out.tokens.append(token)
        if token == shape.eos_token_id or step == max_new_tokens - 1:
            break
        feeds = {"input_ids": np.array([[token]], dtype=np.int64),
                 "attention_mask": np.ones((1, length + 1), dtype=np.int64),
                 "position_ids": np.array([[length]], dtype=np.int64)}
        for i in range(shape.n_layer):
            feeds[f"past_key_values.{i}.key"] = result[f"present.{i}.key"]
            feeds[f"past_key_values.{i}.value"] = result[f"present.{i}.value"]
        t0 = time.perf_counter()
        result = dict(zip(outputs, session.run(outputs, feeds)))
        out.decode_ms.append(1e3 * (time.perf_counter() - t0))
        length += 1
    return out
