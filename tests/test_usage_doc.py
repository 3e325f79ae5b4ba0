"""docs/USAGE.md cannot rot: its `python` blocks run, in order, the way the page says to run them, and its
`rbe-onnx` command lines parse.

The page's convention: everything runs in one folder holding a Hugging Face GPT-2 checkpoint in `gpt2-hf/`;
blocks are copy-pasted in order (each is self-contained code, but may use the folders earlier blocks wrote).
Here the folder is a temporary one and `gpt2-hf/` a small random GPT-2, so the page runs in seconds.
"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from rbe_onnx.cli import build_parser
from rbe_onnx.compressor import read_report

USAGE = Path(__file__).resolve().parents[1] / "docs" / "USAGE.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)


def code_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(USAGE.read_text()) if lang == language]


def command_lines(prefix: str) -> list[str]:
    """Lines of the sh blocks that run `prefix`, with comments and backslash continuations resolved."""
    lines = []
    for block in code_blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == prefix:
                lines.append(words)
    return lines


@pytest.fixture(scope="module")
def ran_page(tmp_path_factory, tiny_gpt2_dir):
    """Run every python block in a fresh folder with `gpt2-hf/`; returns (folder, namespaces, stdout per block)."""
    work = tmp_path_factory.mktemp("usage-doc")
    (work / "gpt2-hf").symlink_to(tiny_gpt2_dir, target_is_directory=True)
    namespaces, outputs = [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for i, block in enumerate(code_blocks("python")):
            namespace: dict = {"__name__": f"usage_block_{i}"}
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    exec(compile(block, f"{USAGE.name} python block {i}", "exec"), namespace)
                except Exception as exc:
                    pytest.fail(f"docs/USAGE.md python block {i} failed: {exc!r}\n--- block ---\n{block}")
            namespaces.append(namespace)
            outputs.append(out.getvalue())
    return work, namespaces, outputs


def defined(namespaces: list[dict], name: str):
    hits = [ns[name] for ns in namespaces if name in ns]
    assert hits, f"no python block in docs/USAGE.md defines {name!r}"
    return hits[-1]


def test_page_has_examples_for_every_entry_point():
    python = "\n".join(code_blocks("python"))
    for api in ("export_gpt2(", "rewrite(", "session_options(", "InferenceSession(", "Generator(",
                "onnxruntime_genai"):
        assert api in python, f"docs/USAGE.md has no python example using {api}"
    commands = {words[1] for words in command_lines("rbe-onnx")}
    assert {"export", "rewrite", "inspect", "generate"} <= commands
    assert "examples/cpp_generate" in "\n".join(code_blocks("sh"))


def test_python_blocks_run(ran_page):
    work, namespaces, outputs = ran_page
    assert (work / "gpt2-onnx" / "genai_config.json").is_file()
    rows = read_report(work / "gpt2-rbe" / "model.onnx")
    assert any(r.status == "rbe" and r.bits == 4 for r in rows)
    # The session example really ran the rewritten graph: logits over the vocabulary for the 3 prompt tokens,
    # and a present per layer for key and value.
    logits, presents = defined(namespaces, "logits"), defined(namespaces, "presents")
    shape = defined(namespaces, "shape")
    assert logits.shape == (1, 3, shape.vocab_size) and np.isfinite(logits).all()
    assert len(presents) == 2 * shape.n_layer and presents[0].shape == (1, shape.n_head, 8, shape.head_dim)
    assert np.isfinite(presents[0][:, :, :3]).all() and np.abs(presents[0][:, :, :3]).sum() > 0
    # Every block that prints printed something (generated text included).
    for block, out in zip(code_blocks("python"), outputs):
        if "print(" in block:
            assert out.strip(), f"block printed nothing:\n{block}"


@pytest.mark.parametrize("words", command_lines("rbe-onnx"), ids=lambda words: " ".join(words[:2]))
def test_cli_lines_parse(words):
    """Each documented command names a real subcommand with real options (argparse exits on anything else)."""
    args = build_parser().parse_args(words[1:])
    assert callable(args.fn)
