"""BENCHMARKS.md's marked sections: each tool rewrites the text between its own pair of markers and nothing else,
so the speed, breakdown, quality and generation results (and the prose between them) survive each other's runs."""
from __future__ import annotations

from pathlib import Path


def replace_section(text: str, begin: str, end: str, body: str) -> str | None:
    """`text` with what lies between `begin` and `end` replaced by `body` (the markers stay); None when `text`
    lacks either marker."""
    body = body.strip("\n")
    if begin not in text:
        return None
    head, rest = text.split(begin, 1)
    if end not in rest:
        return None
    return f"{head}{begin}\n{body}\n{end}{rest.split(end, 1)[1]}"


def write_section(path: Path, body: str, begin: str, end: str) -> None:
    """Replaces one tool's section of the file at `path`; a file without the markers gets the section after its
    title line (a new file: '# Benchmarks')."""
    body = body.strip("\n")
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    new = replace_section(old, begin, end, body)
    if new is None:
        title, _, rest = old.partition("\n")
        block = f"{begin}\n{body}\n{end}\n"
        new = f"{title}\n\n{block}\n{rest.lstrip()}" if rest.strip() else f"{title}\n\n{block}"
    path.write_text(new)
