"""`rbe-onnx` command line: export, rewrite, inspect."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Reports are tables meant to be read whole: don't squeeze them to 80 columns when piped or captured.
console = Console(width=None if sys.stdout.isatty() else 160)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return str(n)


def print_report(rows, title: str) -> None:
    from .compressor import totals

    table = Table(title=title)
    for col, just in (("node", "left"), ("op", "left"), ("shape K x N", "right"), ("status", "left"),
                      ("bits/w", "right"), ("before", "right"), ("after", "right"), ("rel-RMSE", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        done = r.status == "rbe"
        table.add_row(r.node, r.op_type, r.shape, f"rbe {r.bits}b/{r.block_size}" if done else r.status,
                      f"{r.bits_per_weight:.3f}" if done else "-", _size(r.bytes_before) if done else "-",
                      _size(r.bytes_after) if done else "-", f"{r.rel_rmse:.4f}" if done else "-")
    t = totals(rows)
    table.add_section()
    ratio = t["bytes_after"] / t["bytes_before"] if t["bytes_before"] else 0.0
    table.add_row("total", "", "", f"{t['rewritten']} rewritten, {t['skipped']} skipped",
                  f"{t['bits_per_weight']:.3f}", _size(t["bytes_before"]), _size(t["bytes_after"]),
                  f"{100 * (1 - ratio):.1f}% smaller" if ratio else "")
    console.print(table)


def cmd_export(args) -> int:
    from .export import export_bert, export_gpt2

    fn = export_gpt2 if args.arch == "gpt2" else export_bert
    path = fn(args.model, args.output)
    console.print(f"exported {args.arch} -> {path}")
    return 0


def cmd_rewrite(args) -> int:
    from .compressor import rewrite

    output = Path(args.output) if args.output else Path(args.model).with_name(Path(args.model).stem + ".rbe.onnx")
    _, rows = rewrite(args.model, output, bits=args.bits, block_size=args.block_size, exclude=args.exclude,
                      progress=not args.quiet)
    print_report(rows, f"{args.model} -> {output}")
    return 0


def cmd_inspect(args) -> int:
    from .compressor import read_report

    print_report(read_report(args.model), str(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rbe-onnx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export an HF GPT-2 (with KV cache) or BERT dir to ONNX")
    e.add_argument("arch", choices=("gpt2", "bert"))
    e.add_argument("--model", required=True, help="HF model dir (local files only)")
    e.add_argument("-o", "--output", required=True, help="output dir (model.onnx + tokenizer files)")
    e.set_defaults(fn=cmd_export)

    r = sub.add_parser("rewrite", help="replace MatMul/Gemm with RBEFusedGemm")
    r.add_argument("model", help="input model.onnx")
    r.add_argument("-o", "--output", help="output .onnx (default: <input>.rbe.onnx)")
    r.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    r.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256))
    r.add_argument("--exclude", help="regex: nodes or weights whose name matches stay fp32")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_rewrite)

    i = sub.add_parser("inspect", help="print the rewrite table of a rewritten model")
    i.add_argument("model")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
