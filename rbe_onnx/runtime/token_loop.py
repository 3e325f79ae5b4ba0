"""The token-level generation loop: a left-padded batch is prefilled once, then every step feeds one token per
row back through the bound KV cache, until each row has finished (EOS, a caller's stop) or the budget is spent."""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from .kv_binding import BoundGpt2
from .sampling import Sampler

EOS, STOP, LENGTH = "eos", "stop", "length"


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, n_positions: int,
                  vocab_size: int) -> None:
    """ValueError naming the first prompt that cannot be generated from within the model's context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, ids in enumerate(prompts):
        name = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        if len(ids) == 0:
            raise ValueError(f"{name} is empty: at least one token is needed")
        if len(ids) > n_positions:
            raise ValueError(f"{name} has {len(ids)} tokens, longer than the model's context of "
                             f"{n_positions} positions")
        if len(ids) + max_new_tokens > n_positions:
            raise ValueError(f"{name} ({len(ids)} tokens) + max_new_tokens {max_new_tokens} = "
                             f"{len(ids) + max_new_tokens} exceeds the model's context of {n_positions} positions")
        bad = [t for t in ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [batch, longest]: every prompt ends at the last column, so the
    next token of every row is appended at the same cache position."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids that count real tokens only, so a left-padded row gets the positions it would have alone."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


class TokenLoop:
    """Iterate to generate: each step yields `(tokens, live)`, the int64 [batch] tokens of the step and the bool
    [batch] rows for which they are real (rows finished earlier get the pad token, which nobody reads).

    Between steps the caller may end a row with `stop(row)` (e.g. on a stop string). A row that produced EOS is
    already marked finished when its step is yielded; its EOS token is part of the step. Rows still running
    when `max_new_tokens` are reached finish with reason "length".
    """

    def __init__(self, model: BoundGpt2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampler: Sampler, eos_token_id: int | None, pad_token_id: int | None = None):
        shape = model.shape
        check_prompts(prompts, max_new_tokens, shape.n_positions, shape.vocab_size)
        self.model = model
        self.prompts = [list(map(int, p)) for p in prompts]
        self.max_new_tokens = int(max_new_tokens)
        self.sampler = sampler
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        self.finished = np.zeros(len(prompts), dtype=bool)
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.prefill_ms = 0.0
        self.decode_ms: list[float] = []
        self._started = False

    def stop(self, row: int, reason: str = STOP) -> None:
        if not self.finished[row]:
            self.finished[row] = True
            self.finish_reasons[row] = reason

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._started:
            raise RuntimeError("a TokenLoop runs once: make a new one for the next generation")
        self._started = True
        ids, mask = left_pad(self.prompts, self.pad_token_id)
        batch = len(ids)
        self.model.reset(batch, ids.shape[1] + self.max_new_tokens)
        t0 = time.perf_counter()
        tokens, live = self._next(self.model.forward(ids, mask, positions(mask)))
        self.prefill_ms = 1e3 * (time.perf_counter() - t0)
        for step in range(self.max_new_tokens):
            yield tokens, live
            if self.finished.all() or step == self.max_new_tokens - 1:
                break
            # Finished rows keep running with a visible pad token: dropping them would mean compacting every
            # layer's cache, and their outputs cannot leak into other rows (attention is per row).
            t0 = time.perf_counter()
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits = self.model.forward(tokens[:, None], mask, positions(mask)[:, -1:])
            tokens, live = self._next(logits)
            self.decode_ms.append(1e3 * (time.perf_counter() - t0))
        for row in np.flatnonzero(~self.finished):
            self.stop(int(row), LENGTH)

    def _next(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        live = ~self.finished
        tokens = self.sampler.sample(logits)
        tokens[~live] = self.pad_token_id
        if self.eos_token_id is not None:
            for row in np.flatnonzero(live & (tokens == self.eos_token_id)):
                self.stop(int(row), EOS)
        return tokens, live
