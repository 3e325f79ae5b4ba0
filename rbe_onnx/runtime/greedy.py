"""`greedy_generate`: batch-1 greedy token generation from a session, the entry point of tools/demo.py and
tools/bench.py, running on the same KV-bound loop as `Generator` (no tokenizer needed)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .feeds import Gpt2Shape
from .kv_binding import BoundGpt2
from .sampling import Sampler, SamplingConfig
from .token_loop import TokenLoop


@dataclass
class GreedyResult:
    tokens: list[int]  # ends with the EOS id if the model produced it
    prefill_ms: float
    decode_ms: list[float] = field(default_factory=list)

    @property
    def decode_ms_median(self) -> float:
        return float(np.median(self.decode_ms)) if self.decode_ms else float("nan")


def greedy_generate(session, shape: Gpt2Shape, prompt_ids: list[int], max_new_tokens: int) -> GreedyResult:
    """Up to `max_new_tokens` argmax tokens after `prompt_ids`, stopping at the model's EOS."""
    prompts = [list(prompt_ids)]
    loop = TokenLoop(BoundGpt2(session, shape), prompts, max_new_tokens=max_new_tokens,
                     sampler=Sampler(SamplingConfig.greedy(), prompts, shape.vocab_size),
                     eos_token_id=shape.eos_token_id)
    tokens = [int(step[0]) for step, _ in loop]
    return GreedyResult(tokens=tokens, prefill_ms=loop.prefill_ms, decode_ms=loop.decode_ms)
