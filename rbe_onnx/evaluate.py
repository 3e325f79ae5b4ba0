"""Fidelity of exported models on WikiText-2 test.

GPT-2 protocol: the HF rows joined with blank lines (datasets.wikitext2_text), tokenized with the model's own
tokenizer, cut into non-overlapping windows of `window` tokens (default: the model's context); every
position but the first of each window is scored. The same windows for every model.

BERT protocol: the first `sentences` non-heading WikiText-2 test rows (paragraphs), truncated to 128 tokens,
mean-pooled over real tokens (sentence-transformers pooling); cosine of each pooled vector to the reference's.
"""
from __future__ import annotations

import numpy as np

from .runtime.feeds import Gpt2Shape, check_kv_layout, prefill_feeds


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
    for s in (session, reference):
        if s is not None:
            check_kv_layout(s)
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


def wikitext_test_paragraphs(tokenizer_json: str, count: int, max_len: int = 128) -> dict:
    """Feeds for `count` WikiText-2 test paragraphs, padded, as a sentence encoder sees them."""
    from tokenizers import Tokenizer

    from .datasets import wikitext2_paragraphs

    tok = Tokenizer.from_file(tokenizer_json)
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0)
    rows = wikitext2_paragraphs("test")
    enc = tok.encode_batch(rows[:count])
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def mean_pooled(session, feeds: dict, batch: int = 50) -> np.ndarray:
    out = []
    for s in range(0, len(feeds["input_ids"]), batch):
        part = {k: v[s:s + batch] for k, v in feeds.items()}
        hidden = session.run(None, part)[0]
        m = part["attention_mask"][..., None]
        out.append((hidden * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def embedding_cosine(session, reference, feeds: dict) -> dict:
    """Mean and worst cosine of mean-pooled embeddings against the reference model's."""
    a, b = mean_pooled(session, feeds), mean_pooled(reference, feeds)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "sentences": len(cos)}
