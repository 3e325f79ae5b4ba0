"""Choosing the next token from logits: greedy, or sampling with temperature / top-k / top-p, plus a
repetition penalty. The filters follow Hugging Face's processors (same order, same tie and boundary rules)
so settings carry over between the two."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Top-p first sorts this many of the most likely tokens and only falls back to sorting more (doubling) when
# their mass is below p: a trained model's nucleus is nearly always small, and a full argsort of a 50k
# vocabulary costs about as much as a decode step of a small model.
_NUCLEUS_PROBE = 64


@dataclass(frozen=True)
class SamplingConfig:
    """`do_sample=False` is greedy decoding (argmax after the repetition penalty); `top_k=0` and `top_p=1`
    switch those filters off; `seed` makes sampling reproducible (numpy `default_rng`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got "
                             f"{self.repetition_penalty}")

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.0) -> "SamplingConfig":
        return cls(do_sample=False, repetition_penalty=repetition_penalty)


class Sampler:
    """Picks one token per row of a batch and remembers every row's tokens for the repetition penalty."""

    def __init__(self, config: SamplingConfig, prompts: Sequence[Sequence[int]], vocab_size: int):
        self.config = config
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(config.seed)
        self._seen = None
        if config.repetition_penalty != 1.0:
            # A dense [batch, vocab] flag matrix: updating it is O(batch) per step and applying it one
            # vectorised `where`, whereas per-row Python sets would cost a gather per row and step.
            self._seen = np.zeros((len(prompts), vocab_size), dtype=bool)
            for row, ids in enumerate(prompts):
                self._seen[row, np.asarray(ids, dtype=np.int64)] = True

    def sample(self, logits: np.ndarray) -> np.ndarray:
        """Next token of every row, int64 [batch], from the last-position logits [batch, vocab]."""
        scores = self._penalised(logits)
        if self.config.do_sample:
            probs = self.distribution_from_scores(scores)
            cdf = np.cumsum(probs, axis=-1)
            u = self._rng.random(len(probs))[:, None] * cdf[:, -1:]
            tokens = np.minimum((cdf <= u).sum(axis=-1), self.vocab_size - 1)
        else:
            tokens = scores.argmax(axis=-1)
        tokens = tokens.astype(np.int64)
        if self._seen is not None:
            self._seen[np.arange(len(tokens)), tokens] = True
        return tokens

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `sample` draws from (float64 [batch, vocab], filtered tokens at 0) for the current
        history; exposed so it can be checked against other implementations."""
        return self.distribution_from_scores(self._penalised(logits))

    def distribution_from_scores(self, scores: np.ndarray) -> np.ndarray:
        cfg = self.config
        scores = scores.astype(np.float64) / cfg.temperature
        if 0 < cfg.top_k < scores.shape[-1]:
            # Ties with the k-th score are kept, as in HF's TopKLogitsWarper.
            kth = np.partition(scores, -cfg.top_k, axis=-1)[:, -cfg.top_k, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        if cfg.top_p < 1.0:
            for row in probs:
                _keep_nucleus(row, cfg.top_p)
            probs /= probs.sum(axis=-1, keepdims=True)
        return probs

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[-1] != self.vocab_size:
            raise ValueError(f"expected logits [batch, {self.vocab_size}], got shape {logits.shape}")
        if self._seen is None:
            return logits
        # CTRL's rule (as HF): shrink the logits of tokens already present towards "less likely" whatever
        # their sign, dividing positive and multiplying negative ones.
        r = np.float32(self.config.repetition_penalty)
        return np.where(self._seen, np.where(logits > 0, logits / r, logits * r), logits)


def _keep_nucleus(probs: np.ndarray, top_p: float) -> None:
    """Zero (in place) every token outside the smallest set of most likely tokens whose mass reaches `top_p`:
    a token is kept when the mass of the tokens ranked above it is still below `top_p` (HF's TopPLogitsWarper
    keeps the same set)."""
    n = min(_NUCLEUS_PROBE, probs.size)
    while True:
        top = np.argpartition(-probs, n - 1)[:n] if n < probs.size else np.arange(probs.size)
        top = top[np.argsort(-probs[top], kind="stable")]
        mass_above = np.cumsum(probs[top]) - probs[top]
        if n == probs.size or mass_above[-1] + probs[top[-1]] >= top_p:
            break
        n = min(2 * n, probs.size)
    kept = top[mass_above < top_p]
    mask = np.zeros(probs.size, dtype=bool)
    mask[kept] = True
    probs[~mask] = 0.0
