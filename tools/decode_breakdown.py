"""Where a decode step's time goes, measured inside the full graph: the RBE weight products (time spent inside
RBEFusedGemm calls) against everything else, for tools/bench.py's GPT-2-small-shaped models.

    python tools/decode_breakdown.py [--library PATH] [--work out/bench] [--models rbe3b256,rbe4b128]
        [--rounds 8] [--tokens 64] [--threads 2] [--no-write]

tools/bench.py splits a step with a stand-in graph whose products are near-free nodes. That stand-in runs the
rest of the step with warm caches; in the real step every token streams all the weights, which evicts the rest's
working set (KV cache, activations, ORT's own state) in between, so the stand-in's `outside` undercounts the
rest and the bench's `products` column carries the difference. Here the op library itself keeps the time: it
must be a diagnostic build, `cmake -S custom_ops -B B -DRBE_OP_TIMING=ON` (without --library this tool builds
one into build/op-timing). Per round and model, on one session: greedy decoding with the products (each step's
wall time and time inside the op), then with RBE_SKIP_PRODUCTS=1 (the op writes zeros: the same graph with the
rest running on warm caches); ORT's MatMulNBits model runs in the same rounds as the anchor. Medians over rounds
of each round's median step. Writes its section of BENCHMARKS.md unless --no-write.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_libraries import bench_models, library_session  # noqa: E402
from bench import read_bandwidth, read_probe  # noqa: E402
from benchmarks_md import write_section  # noqa: E402

BEGIN, END = "<!-- breakdown:begin -->", "<!-- breakdown:end -->"


def build_timing_library(build: Path) -> Path:
    """librbe_ops.so configured with RBE_OP_TIMING=ON in `build` (incremental after the first time)."""
    def run(cmd: list[str]) -> str:
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({out.returncode}):\n"
                             f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
        return out.stdout

    include = run(["bash", str(ROOT / "tools" / "fetch_ort_headers.sh")]).strip()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", str(ROOT / "custom_ops"), "-B", str(build), *generator, "-DCMAKE_BUILD_TYPE=Release",
         "-DRBE_BUILD_PYTHON=OFF", "-DRBE_OP_TIMING=ON", f"-DONNXRUNTIME_INCLUDE_DIR={include}"])
    run(["cmake", "--build", str(build), "--target", "rbe_ops"])
    return build / "librbe_ops.so"


class OpTiming:
    """Reads the totals a RBE_OP_TIMING build of the library keeps (dlopen returns ORT's handle to the same file)."""

    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        if not hasattr(lib, "RbeOpTiming"):
            raise SystemExit(f"{library} has no RbeOpTiming: build it with -DRBE_OP_TIMING=ON")
        self._read = lib.RbeOpTiming
        self._read.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]

    def ms(self) -> float:
        ns, calls = ctypes.c_int64(), ctypes.c_int64()
        self._read(ctypes.byref(ns), ctypes.byref(calls))
        return ns.value / 1e6


def product_weight_bytes(model: Path) -> int:
    """Bytes every decode step streams for the RBE products: codes, 8 bytes per seed and outlier records, over the
    RBEFusedGemm nodes."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}

    def nbytes(name: str) -> int:
        t = inits.get(name)
        if t is None:
            return 0
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return int(ExternalDataInfo(t).length)
        return len(t.raw_data)

    total = 0
    for node in m.graph.node:
        if node.op_type != "RBEFusedGemm":
            continue
        # codes, then seeds and outliers where they are inputs (FORMAT.md §2.2: a tied lm_head shares its
        # table's seeds initializer), or seeds as the node attribute
        total += sum(nbytes(node.input[i]) for i in (1, 4, 5) if i < len(node.input) and node.input[i])
        total += 8 * sum(len(a.t.int64_data) or len(a.t.raw_data) // 8 for a in node.attribute if a.name == "seeds")
    return total


def decode_steps(session, shape, prompt: list[int], tokens: int, timing: OpTiming | None) -> tuple[float, float]:
    """Median wall ms of a greedy decode step and median ms of it spent inside RBEFusedGemm (nan without timing)."""
    from rbe_onnx.runtime.kv_binding import BoundGpt2
    from rbe_onnx.runtime.sampling import Sampler, SamplingConfig
    from rbe_onnx.runtime.token_loop import TokenLoop

    prompts = [list(prompt)]
    loop = TokenLoop(BoundGpt2(session, shape), prompts, max_new_tokens=tokens + 1,
                     sampler=Sampler(SamplingConfig.greedy(), prompts, shape.vocab_size), eos_token_id=None)
    inside = [timing.ms() if timing else 0.0 for _ in loop]  # one reading per yielded token
    wall = np.array(loop.decode_ms)
    if not timing:
        return float(np.median(wall)), float("nan")
    return float(np.median(wall)), float(np.median(np.diff(inside)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", help="a librbe_ops.so built with -DRBE_OP_TIMING=ON (default: build one)")
    ap.add_argument("--work", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--models", default="rbe3b256,rbe4b128", help="tools/bench.py model folders in --work")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    from rbe_onnx.runtime import Gpt2Shape

    work = Path(args.work)
    models, anchor = bench_models(work, args.models)
    library = Path(args.library) if args.library else build_timing_library(ROOT / "build" / "op-timing")
    if not library.is_file():
        raise SystemExit(f"{library}: no such library")
    timing = OpTiming(library.resolve())

    shape = Gpt2Shape.from_dir(work / "fp32")
    prompt = np.random.default_rng(0).integers(0, shape.vocab_size, 32).tolist()
    # the timing build, not the installed library, for the RBE models
    sessions = {name: library_session(path, str(library.resolve()), args.threads) for name, path in models.items()}
    anchor_session = library_session(anchor, None, args.threads)
    probe = read_probe(work, [args.threads])[args.threads]
    read_bandwidth(probe)  # the first pass maps the probe's 463 MB in
    bandwidth = 0.0
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in models}
    anchor_ms = []
    for _ in range(args.rounds):
        anchor_ms.append(decode_steps(anchor_session, shape, prompt, args.tokens, None)[0])
        for name, s in sessions.items():
            os.environ.pop("RBE_SKIP_PRODUCTS", None)
            wall, inside = decode_steps(s, shape, prompt, args.tokens, timing)
            os.environ["RBE_SKIP_PRODUCTS"] = "1"
            skipped, _ = decode_steps(s, shape, prompt, args.tokens, timing)
            os.environ.pop("RBE_SKIP_PRODUCTS")
            rows[name].append((wall, inside, skipped))
        # The best of a few samples a round, as this VM's bandwidth drifts within minutes.
        bandwidth = max(bandwidth, *(read_bandwidth(probe) for _ in range(3)))
    anchor_med = float(np.median(anchor_ms))
    cmd = (f"python tools/decode_breakdown.py --models {args.models} --rounds {args.rounds} --tokens {args.tokens} "
           f"--threads {args.threads}")
    lines = ["## Decode step breakdown, measured inside the graph", "",
             f"Command: `{cmd}` (tools/bench.py's models, int8 path; op library built with `-DRBE_OP_TIMING=ON`; "
             f"{args.threads} threads; medians over {args.rounds} interleaved rounds of each round's median step). "
             "`products` is the time inside the RBEFusedGemm calls (activation quantization, thread hand-off and "
             "kernel), `rest` the step's other time; `rest, products skipped` is the same graph with the products "
             "writing zeros, so the rest runs without the weight stream between its nodes (warm caches). GB/s: "
             f"compressed weight bytes over `products`, against the read bandwidth measured in the same run "
             f"({bandwidth:.1f} GB/s, ORT's fp32 GEMV, tools/bench.py). MatMulNBits int4 b32 acc4 in the same rounds: "
             f"{anchor_med:.2f} ms/token.", "",
             "| model | decode ms/token | vs MatMulNBits | products ms | rest ms | rest, products skipped, ms | "
             "products GB/s (share of read) |",
             "|---|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        wall, inside, skipped = (float(np.median([r[i] for r in rs])) for i in range(3))
        rest = float(np.median([r[0] - r[1] for r in rs]))
        gbs = product_weight_bytes(models[name]) / (inside * 1e-3) / 1e9
        lines.append(f"| {name} | {wall:.2f} | {wall / anchor_med:.2f}x | {inside:.2f} | {rest:.2f} | {skipped:.2f} | "
                     f"{gbs:.1f} ({100 * gbs / bandwidth:.0f} %) |")
    text = "\n".join(lines) + "\n"
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", text, BEGIN, END)
    print(text)


if __name__ == "__main__":
    main()
