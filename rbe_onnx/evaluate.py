"""Perplexity and fidelity of exported GPT-2 models on WikiText-2 test.

Protocol: the HF rows joined with blank lines (datasets.wikitext2_text), tokenized with the model's own
tokenizer, cut into non-overlapping windows of `window` tokens (default: the model's context); every
position but the first of each window is scored. The same windows for every model.
"""
from __future__ import annotations

import numpy as np

from .runtime.feeds import Gpt2Shape, prefill_feeds


def wikitext_test_windows(tokenizer_json: str, window: int, max_windows: int | None = None) -> np.ndarray:
    from tokenizers import Tokenizer

    from .datasets import wikitext2_text

    ids = Tokenizer.from_file(tokenizer_json).encode(wikitext2_text("test")).ids
    n = len(ids) // window if max_windows is None else min(max_windows, len(ids) // window)
    return np.array(ids[: n * window], dtype=np.int64).reshape(n, window)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(session, shape: Gpt2Shape, windows: np.ndarray, reference=None, batch: int = 4) -> dict:
    """PPL of `session`; with a reference session also mean KL(ref || model) and top-1 agreement."""
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logp = _log_softmax(session.run(["logits"], prefill_feeds(shape, ids))[0][:, :-1])
        targets = ids[:, 1:]
        nll -= np.take_along_axis(logp, targets[..., None], -1).sum()
        count += targets.size
        if reference is not None:
            ref = _log_softmax(reference.run(["logits"], prefill_feeds(shape, ids))[0][:, :-1])
            kl += (np.exp(ref) * (ref - logp)).sum()
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    out = {"ppl": float(np.exp(nll / count)), "positions": count}
    if reference is not None:
        out.update(kl=float(kl / count), top1=agree / count)
    return out
