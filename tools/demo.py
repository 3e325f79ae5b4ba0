"""The main job, end to end: export the reference GPT-2, rewrite it with RBE, generate, and print the
size / perplexity / speed table.  Run by `make demo`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rbe_onnx.cli import print_report
from rbe_onnx.compressor import rewrite, totals
from rbe_onnx.evaluate import compare, wikitext_test_windows
from rbe_onnx.export import export_gpt2
from rbe_onnx.paths import shared_data_dir
from rbe_onnx.runtime import Gpt2Shape, greedy_generate, make_session

PROMPT = "The history of the city begins"


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out", help="working folder")
    ap.add_argument("--windows", type=int, default=64, help="WikiText-2 test windows of 256 tokens to score")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    console = Console(width=160)
    out = Path(args.out)
    fp32_dir = out / "ref-gpt2-fp32"
    export_gpt2(shared_data_dir() / "ref-gpt2", fp32_dir)
    console.print(f"exported -> {fp32_dir / 'model.onnx'}")

    variants = {"fp32": (fp32_dir, None)}
    for bits, block, calibrate in ((4, 64, False), (4, 128, True), (3, 256, True)):
        name = f"rbe {bits}b/{block}" + (" calibrated" if calibrate else "")
        rbe_dir = out / name.replace(" ", "-").replace("/", "b")
        _, rows = rewrite(fp32_dir / "model.onnx", rbe_dir / "model.onnx", bits=bits, block_size=block,
                          calibrate=calibrate)
        if calibrate and bits == 4:
            print_report(rows, f"rewrite {name}")
        variants[name] = (rbe_dir, rows)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(fp32_dir / "tokenizer.json"))
    shape = Gpt2Shape.from_dir(fp32_dir)
    windows = wikitext_test_windows(str(fp32_dir / "tokenizer.json"), shape.n_positions, args.windows)
    reference = make_session(fp32_dir, threads=args.threads)
    table = Table(title=f"ref-gpt2 on WikiText-2 test ({windows.size} tokens), {args.threads} threads")
    for col in ("model", "files", "weights bpw", "PPL", "KL vs fp32", "top-1 vs fp32", "prefill ms",
                "decode ms/token"):
        table.add_column(col, justify="right")
    for name, (path, rows) in variants.items():
        session = reference if rows is None else make_session(path, threads=args.threads)
        q = compare(session, shape, windows, None if rows is None else reference)
        gen = greedy_generate(session, shape, tok.encode(PROMPT).ids, 32)
        console.print(f"[bold]{name}[/]: {PROMPT}[cyan]{tok.decode(gen.tokens)}[/]")
        table.add_row(name, f"{dir_size(path) / 1e6:.1f} MB",
                      "32" if rows is None else f"{totals(rows)['bits_per_weight']:.2f}", f"{q['ppl']:.2f}",
                      f"{q.get('kl', 0.0):.2e}", f"{q.get('top1', 1.0):.4f}", f"{gen.prefill_ms:.1f}",
                      f"{gen.decode_ms_median:.2f}")
    console.print(table)
    console.print("bpw counts codes + seeds + scale0 over every compressed tensor: the MatMul/Gemm weights and the "
                  "token/position embeddings (RBEGather; the tied lm_head shares the token table's codes).")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
