"""WikiText-2 raw from the shared data folder (formats in shared/data/SOURCES.md).

`test` is for evaluation only, `valid` for calibration only; nothing here mixes them.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .paths import shared_data_dir

FILES = {"test": "test.hf_rows_newline_joined.txt", "valid": "valid.nonempty_rows_blankline_sep.txt"}


def _path(split: str) -> Path:
    if split not in FILES:
        raise ValueError(f"unknown WikiText-2 split {split!r} (test or valid)")
    return shared_data_dir() / "wikitext-2-raw" / FILES[split]


def _parse_hf_rows(text: str) -> list[str]:
    """Inverts `"\\n".join(rows)` for HF rows that are either '' or end in ' \\n' (SOURCES.md)."""
    rows, i = [], 0
    while i < len(text):
        if text[i] == "\n":
            rows.append("")
            i += 1
            continue
        j = text.index("\n", i) + 1
        rows.append(text[i:j])
        i = j + 1  # the separator after a row
    if i == len(text):  # the text ended on a separator: one more (empty) row follows it
        rows.append("")
    return rows


@lru_cache(maxsize=2)
def wikitext2_rows(split: str) -> tuple[str, ...]:
    text = _path(split).read_text(encoding="utf-8")
    if split == "test":
        return tuple(_parse_hf_rows(text))
    return tuple(r + "\n" for r in text.split("\n\n") if r.strip())


def wikitext2_paragraphs(split: str) -> list[str]:
    """The split's article paragraphs as a sentence encoder sees them: rows over 40 characters that are not
    headings (`= Title =`), stripped."""
    return [r.strip() for r in wikitext2_rows(split) if len(r.strip()) > 40 and not r.strip().startswith("=")]


def wikitext2_text(split: str) -> str:
    """The split as one string: HF rows joined with blank lines (the usual HF perplexity input)."""
    return "\n\n".join(wikitext2_rows(split))
