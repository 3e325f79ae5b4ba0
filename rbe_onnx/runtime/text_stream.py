"""Turning a growing list of token ids into text pieces as they arrive, and cutting the text at stop strings.

Byte-level BPE splits a multi-byte character (é, 日, an emoji) over several tokens; decoding the tokens one by
one would print U+FFFD halves. A piece is therefore only released once the decoded text no longer ends in
U+FFFD, and it is computed as the difference between decoding a short window of tokens with and without the
new ones (the window keeps decoders that look at neighbouring tokens, such as leading-space rules, right).
Text that could be the start of a stop string is held back until it is known not to be one, so a consumer
never sees part of a stop string.
"""
from __future__ import annotations

from typing import Sequence

_INCOMPLETE = "\ufffd"


class TextStream:
    """Feed tokens with `push`; each call returns the newly printable text ('' if none yet). `finish` returns
    whatever is left. The concatenation of all pieces is `text`."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._prefix = 0   # start of the decoding window
        self._read = 0     # tokens before this index are already decoded into `_decoded`
        self._decoded = ""
        self._emitted = 0  # characters of `_decoded` already returned
        self.stopped = False
        self.done = False

    @property
    def text(self) -> str:
        return self._decoded[: self._emitted]

    def push(self, token: int) -> str:
        if self.done:
            return ""
        self._ids.append(int(token))
        window = self._decode(self._ids[self._prefix:])
        if window.endswith(_INCOMPLETE):
            return ""  # a character is still split; wait for its remaining bytes
        self._absorb(window)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, including a dangling incomplete character (as U+FFFD, like a full decode)."""
        if self.done:
            return ""
        if self._read < len(self._ids):
            self._absorb(self._decode(self._ids[self._prefix:]))
        piece = self._release(final=True)
        self.done = True
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _absorb(self, window: str) -> None:
        settled = self._decode(self._ids[self._prefix:self._read])
        self._decoded += window[len(settled):]
        self._prefix, self._read = self._read, len(self._ids)

    def _release(self, final: bool) -> str:
        start = self._emitted
        hits = [i for i in (self._decoded.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = self.done = True
            self._decoded = self._decoded[:end]
        elif final:
            end = len(self._decoded)
        else:
            end = len(self._decoded) - self._held_back(start)
        self._emitted = max(end, start)
        return self._decoded[start:self._emitted]

    def _held_back(self, start: int) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        tail = self._decoded[start:]
        for n in range(min(len(tail), max((len(s) for s in self._stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self._stop):
                return n
        return 0
