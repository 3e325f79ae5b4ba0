"""`rbe-onnx` command line: export, rewrite, inspect."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .calibration import CALIBRATION_TOKENS

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
        setting = "rbe rice" if r.coding == "rice" else \
            f"rbe {r.bits}b/{r.block_size}" + (f" rot{r.rotation}" if r.rotation else "")
        table.add_row(r.node, r.op_type, r.shape, setting if done else r.status,
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
                      embeddings=not args.keep_embeddings, progress=not args.quiet,
                      calibrate=args.calibrate or args.target_bpw is not None or args.distill > 0,
                      calibration_tokens=args.calib_tokens, target_bpw=args.target_bpw, center=not args.no_center,
                      accuracy_level=args.accuracy_level, distill_steps=args.distill,
                      outlier_fraction=args.outliers, split_vocab=not args.no_split_vocab, rotate=args.rotate,
                      rice_tables=not args.fixed_tables)
    print_report(rows, f"{args.model} -> {output}")
    return 0


def cmd_inspect(args) -> int:
    from .compressor import read_report

    print_report(read_report(args.model), str(args.model))
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import compare, embedding_cosine, wikitext_test_paragraphs, wikitext_test_windows
    from .runtime import Gpt2Shape, make_session

    model_dir = Path(args.model_dir)
    info_path = model_dir / "rbe_export.json"
    if not info_path.is_file():
        raise ValueError(f"{info_path} missing: eval needs a folder made by `rbe-onnx export` (or a rewrite of one)")
    kind = json.loads(info_path.read_text())["model_type"]
    session = make_session(model_dir, threads=args.threads)
    reference = make_session(args.reference, threads=args.threads) if args.reference else None
    if kind == "bert":
        if reference is None:
            raise ValueError("BERT eval compares embeddings: give the fp32 export with --reference")
        feeds = wikitext_test_paragraphs(str(model_dir / "tokenizer.json"), args.sentences)
        result = embedding_cosine(session, reference, feeds)
    else:
        shape = Gpt2Shape.from_dir(model_dir)
        windows = wikitext_test_windows(str(model_dir / "tokenizer.json"), args.window or shape.n_positions,
                                        args.windows)
        result = compare(session, shape, windows, reference)
    console.print_json(data={"model": str(model_dir), "dataset": args.dataset, **result})
    return 0


def cmd_generate(args) -> int:
    from .runtime.generator import Generator
    from .runtime.sampling import SamplingConfig

    sampling_flags = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p}
    given = [flag for flag, value in sampling_flags.items() if value is not None]
    if args.greedy and given:
        raise ValueError(f"--greedy cannot be combined with {', '.join(given)}")
    sampling = SamplingConfig(do_sample=bool(given), temperature=args.temperature or 1.0, top_k=args.top_k or 0,
                              top_p=1.0 if args.top_p is None else args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    gen = Generator(args.model_dir, threads=args.threads)
    # Plain print, not the rich console: generated text must not be parsed as markup, and it is flushed
    # piece by piece so it appears as it is produced.
    print(args.prompt, end="", flush=True)
    result = gen.generate(args.prompt, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          stop=args.stop or (), on_text=lambda _, piece: print(piece, end="", flush=True))
    done = result.completions[0]
    n_prompt = result.prefill_tokens
    print(f"\n[{len(done.tokens)} new tokens, stopped by {done.finish_reason}] prefill {n_prompt} tokens: "
          f"{result.prefill_ms:.1f} ms ({result.prefill_ms / n_prompt:.2f} ms/token); decode: "
          f"{result.decode_ms_per_token:.2f} ms/token (median of {len(result.decode_ms)} steps)")
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
    r.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 5, 6, 8))
    r.add_argument("--block-size", type=int, default=64, choices=(32, 64, 128, 256))
    r.add_argument("--exclude", help="regex: nodes or weights whose name matches stay fp32")
    r.add_argument("--keep-embeddings", action="store_true",
                   help="leave Gather tables (token/position embeddings) fp32 instead of RBEGather")
    r.add_argument("--calibrate", action="store_true",
                   help="error-feedback rounding from WikiText-2 valid activations (never the test split)")
    r.add_argument("--calib-tokens", type=int, default=CALIBRATION_TOKENS,
                   help=f"calibration tokens of WikiText-2 valid (default {CALIBRATION_TOKENS})")
    r.add_argument("--target-bpw", type=float,
                   help="average bits/weight over all rewritten weights (seeds included); each weight's width and "
                        "block size are chosen by its measured sensitivity (implies --calibrate; overrides "
                        "--bits/--block-size)")
    r.add_argument("--distill", type=int, default=0, metavar="N",
                   help="fine-tune block scales, center coefficients and LayerNorms against the fp32 model for N "
                        "steps on WikiText-2 valid (GPT-2: KL of the logits on 4 windows a step; BERT: error of "
                        "the last hidden states on 8 paragraphs a step; implies --calibrate)")
    r.add_argument("--accuracy-level", type=int, default=0, choices=range(5),
                   help="RBEFusedGemm arithmetic: 0 = float activations (exact, default), 4 = int8 activations per "
                        "block (faster; FORMAT.md §2.1), as MatMulNBits' attribute")
    r.add_argument("--outliers", type=float, default=0.0, metavar="FRACTION",
                   help="keep this fraction of each weight's values exactly, as binary16 (FORMAT.md §5.2; 24 bits "
                        "each, so 0.005 costs 0.12 bits/weight): per block, those farthest from the block's bulk. "
                        "For heavy-tailed weights such as BERT's FFN outputs (default 0)")
    r.add_argument("--rotate", action="store_true",
                   help="code each MatMul/Gemm weight after a seeded Hadamard rotation of its inputs, which the op "
                        "applies to the activations (FORMAT.md §5.3): heavy rows and outlier input channels are "
                        "spread over blocks of up to 256 rows. For quality (MiniLM at 3.3 bits/weight: pooled cosine "
                        "0.961 -> 0.971); costs about 2 %% of GPT-2-small decode time (BENCHMARKS.md)")
    r.add_argument("--no-split-vocab", action="store_true",
                   help="with --target-bpw, keep each token table whole instead of splitting it into the rows that "
                        "make up 95 %% of the calibration text and the rest, each coded at its own width "
                        "(tables of at least 4096 rows; GPT-2's table tied to its logits is split on both sides)")
    r.add_argument("--fixed-tables", action="store_true",
                   help="with --target-bpw, code the tables that are only gathered (BERT's embeddings, GPT-2's "
                        "positions) with fixed-width codes instead of Rice codes (FORMAT.md §5.4), e.g. for "
                        "readers of the older format")
    r.add_argument("--no-center", action="store_true",
                   help="never give a weight a center vector (FORMAT.md §5.1), e.g. for readers of the older format")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_rewrite)

    i = sub.add_parser("inspect", help="print the rewrite table of a rewritten model")
    i.add_argument("model")
    i.set_defaults(fn=cmd_inspect)

    v = sub.add_parser("eval", help="WikiText-2 test perplexity (GPT-2) or embedding cosine (BERT)")
    v.add_argument("model_dir", help="export folder (fp32 or rewritten)")
    v.add_argument("--dataset", default="wikitext2-test", choices=("wikitext2-test",))
    v.add_argument("--reference", help="fp32 export folder: adds KL and top-1 agreement (GPT-2), required for BERT")
    v.add_argument("--windows", type=int, help="GPT-2: score only the first N windows (default: all)")
    v.add_argument("--window", type=int, help="GPT-2: window length (default: the model's context)")
    v.add_argument("--sentences", type=int, default=500, help="BERT: paragraphs to embed (default 500)")
    v.add_argument("--threads", type=int)
    v.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate text from an exported (fp32 or rewritten) GPT-2 folder")
    g.add_argument("model_dir", help="export folder (model.onnx, rbe_export.json, tokenizer.json)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true",
                   help="argmax decoding (the default unless a sampling option is given)")
    g.add_argument("--temperature", type=float, help="sample, dividing the logits by T")
    g.add_argument("--top-k", type=int, help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding mass P")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    g.add_argument("--seed", type=int, help="sampling seed (reproducible output)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not printed")
    g.add_argument("--threads", type=int, help="ORT intra-op threads (default: ORT's choice)")
    g.set_defaults(fn=cmd_generate)
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
