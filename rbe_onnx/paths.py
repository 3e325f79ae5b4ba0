"""Where the shared read-only data lives (models, WikiText-2, tokenizer)."""
from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """The `shared/data` folder: $RBE_SHARED_DATA, else `../shared/data` beside the checkout or cwd."""
    env = os.environ.get("RBE_SHARED_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in (*here.parents, *Path.cwd().resolve().parents)]
    candidates += [Path.cwd() / "shared" / "data"]
    for c in candidates:
        if (c / "SOURCES.md").is_file():
            return c
    raise FileNotFoundError(
        "shared data folder not found: set RBE_SHARED_DATA to the folder holding SOURCES.md "
        "(normally ../shared/data beside the checkout)")
