"""Decode speed of two or more builds of the op library in ONE process, their rounds alternated.

On a noisy machine (this VM: the same build varies by up to 30 % between processes) a kernel change of a few
percent shows only when both builds run side by side. Each session here registers its own copy of the
library (ORT loads every path with its own handle), so builds from different commits coexist.

    python tools/ab_libraries.py A=build-a/custom_ops/librbe_ops.so B=build-b/custom_ops/librbe_ops.so \\
        [--rounds 16] [--tokens 64] [--threads 2] [--work out/bench] [--models rbe3b256,rbe4b128]

The models are tools/bench.py's (GPT-2-small shape, random init; run it once to build them in --work); the
int8 (accuracy_level 4) graph of each. ORT's MatMulNBits model runs in the same rounds as the anchor. Prints,
per model and build, the median decode ms/token over the rounds (each round: the median of --tokens greedy
steps after a 32-token prompt) and, per model, in how many rounds each build beat the first one.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def library_session(model: Path, library: str | None, threads: int):
    import onnxruntime as ort

    from rbe_onnx.api import session_options

    if library is None:  # the anchor needs no RBE op
        so = session_options(threads)
    else:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.register_custom_ops_library(library)
    return ort.InferenceSession(str(model), sess_options=so, providers=["CPUExecutionProvider"])


def bench_models(work: Path, names: str) -> tuple[dict[str, Path], Path]:
    """tools/bench.py's int8 model of each comma-separated folder name in `work`, and its MatMulNBits model;
    stops with the missing paths when bench.py has not built them there."""
    models = {name: work / name / "model_acc4.onnx" for name in names.split(",")}
    anchor = work / "nbits" / "model.onnx"
    missing = [str(p) for p in [*models.values(), anchor, work / "fp32"] if not p.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `python tools/bench.py --work {work}` first")
    return models, anchor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", metavar="LABEL=LIBRARY", help="at least two, the first is the baseline")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--models", default="rbe3b256,rbe4b128", help="tools/bench.py model folders in --work")
    args = ap.parse_args()
    builds = {}
    for item in args.builds:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            ap.error(f"'{item}': expected LABEL=PATH to an existing librbe_ops.so")
        builds[label] = os.path.abspath(path)
    if len(builds) < 2:
        ap.error("give at least two builds")
    work = Path(args.work)
    models, anchor = bench_models(work, args.models)

    from rbe_onnx.runtime import Gpt2Shape, greedy_generate

    shape = Gpt2Shape.from_dir(work / "fp32")
    sessions = {("MatMulNBits", "-"): library_session(anchor, None, args.threads)}
    for name, path in models.items():
        for label, library in builds.items():
            sessions[(name, label)] = library_session(path, library, args.threads)
    prompt = np.random.default_rng(0).integers(0, shape.vocab_size, 32).tolist()
    for s in sessions.values():
        greedy_generate(s, shape, prompt, 4)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
    keys = list(sessions)
    for r in range(args.rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:  # neither build always runs first
            times[key].append(greedy_generate(sessions[key], shape, prompt, args.tokens + 1).decode_ms_median)
    base = next(iter(builds))
    for (name, label), t in times.items():
        line = f"{name:12s} {label:8s} median {np.median(t):.3f} ms/token"
        if label not in ("-", base):
            wins = sum(a < b for a, b in zip(t, times[(name, base)]))
            line += f"  faster than {base} in {wins} of {len(t)} rounds"
        print(line)


if __name__ == "__main__":
    main()
