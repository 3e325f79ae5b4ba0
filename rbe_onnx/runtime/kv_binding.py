"""Step-by-step execution of an exported GPT-2 graph with its KV cache kept in preallocated buffers that are
bound to the session through IO binding, so no past/present tensor ever passes through `session.run`'s
numpy conversion.

Why ping-pong buffers and not one shared past/present buffer: the exported graph appends the new keys/values
with a Concat, so `present` ([b, h, past+seq, d]) is a fresh tensor whose head stride differs from `past`'s;
the two cannot alias. Each layer therefore has two flat buffers sized for the whole generation: a step reads
the past from one (bound as a [b, h, past, d] view of its start) and writes the present into the other, and
the next step swaps them. Nothing is allocated per step and the cache's memory is fixed up front
(2 x batch x heads x capacity x head_dim floats per key and per value of each layer); the remaining
per-step cost of a long past is the graph's own Concat copy.
"""
from __future__ import annotations

import numpy as np

from .feeds import Gpt2Shape


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class BoundGpt2:
    """Runs one generation at a time: `reset(batch, capacity)`, then `forward` for the prompt and for each
    new token. The cache length advances by the input length at every call."""

    def __init__(self, session, shape: Gpt2Shape):
        self.session = session
        self.shape = shape
        self._past = past_names(shape.n_layer)
        self._present = present_names(shape.n_layer)
        inputs = {i.name: i.type for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask", "position_ids", *self._past) if n not in inputs]
        missing += [n for n in ("logits", *self._present) if n not in outputs]
        if missing:
            raise ValueError(f"the model is not a KV-cache GPT-2 export: missing graph inputs/outputs "
                             f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if inputs[self._past[0]] != "tensor(float)":
            raise ValueError(f"the KV cache must be float32, the graph declares {inputs[self._past[0]]}")
        self._io = session.io_binding()
        from onnxruntime import OrtValue

        # Buffers are bound as OrtValues over numpy views: ORT reads and writes the numpy memory in place and
        # each OrtValue keeps its array alive while bound. (Raw pointers through `bind_input(..., buffer_ptr)`
        # work too but cost about twice the Python time per step: 0.36 vs 0.19 ms for 12 layers.)
        self._wrap = OrtValue.ortvalue_from_numpy
        self._cache = np.empty((2, len(self._past), 0), dtype=np.float32)
        self._decode_logits = np.empty((0, 1, shape.vocab_size), dtype=np.float32)
        self.batch = 0
        self.capacity = 0
        self.past_len = 0
        self._side = 0  # which half of `_cache` holds the current past
        # The presents bound by the last step: the same memory and shape as this step's pasts, so they are bound
        # again as they are (wrapping 48 arrays costs about 80 µs a step for 12 layers, binding them 35).
        self._presents: list | None = None

    def reset(self, batch: int, capacity: int) -> None:
        """Start a new generation for `batch` rows of at most `capacity` positions (prompt + new tokens)."""
        s = self.shape
        need = batch * s.n_head * capacity * s.head_dim
        if self._cache.shape[-1] < need:
            # np.empty maps pages lazily: memory is only committed as the cache actually grows.
            self._cache = np.empty((2, len(self._past), need), dtype=np.float32)
        if self._decode_logits.shape[0] != batch:
            self._decode_logits = np.empty((batch, 1, s.vocab_size), dtype=np.float32)
        self.batch, self.capacity, self.past_len, self._side = batch, capacity, 0, 0
        self._presents = None

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Run `input_ids` [batch, seq] after the cached past; `attention_mask` covers past + seq.

        Returns the last position's logits [batch, vocab], a view into a buffer that the next call reuses.
        """
        batch, seq = input_ids.shape
        total = self.past_len + seq
        if batch != self.batch:
            raise ValueError(f"batch of {batch} rows, but the cache was reset for {self.batch}")
        if total > self.capacity:
            raise ValueError(f"{total} positions exceed the cache capacity of {self.capacity}")
        if attention_mask.shape != (batch, total):
            raise ValueError(f"attention_mask must be [{batch}, {total}], got {list(attention_mask.shape)}")
        s, io = self.shape, self._io
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        logits = self._decode_logits if seq == 1 else np.empty((batch, seq, s.vocab_size), dtype=np.float32)
        io.bind_ortvalue_output("logits", self._wrap(logits))
        past_shape = (batch, s.n_head, self.past_len, s.head_dim)
        present_shape = (batch, s.n_head, total, s.head_dim)
        n_past, n_present = int(np.prod(past_shape)), int(np.prod(present_shape))
        src, dst = self._cache[self._side], self._cache[1 - self._side]
        pasts = self._presents or [self._wrap(src[j, :n_past].reshape(past_shape)) for j in range(len(self._past))]
        presents = [self._wrap(dst[j, :n_present].reshape(present_shape)) for j in range(len(self._present))]
        for name, value in zip(self._past, pasts):
            io.bind_ortvalue_input(name, value)
        for name, value in zip(self._present, presents):
            io.bind_ortvalue_output(name, value)
        self._presents = None  # if the run fails, the next step wraps the pasts afresh
        self.session.run_with_iobinding(io)
        self._presents = presents
        self._side = 1 - self._side
        self.past_len = total
        return logits[:, -1, :]

    def cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the cached key and value of `layer`, [batch, heads, past_len, head_dim] each."""
        s = self.shape
        n = self.batch * s.n_head * self.past_len * s.head_dim
        shape = (self.batch, s.n_head, self.past_len, s.head_dim)
        cur = self._cache[self._side]
        return cur[2 * layer, :n].reshape(shape).copy(), cur[2 * layer + 1, :n].reshape(shape).copy()
