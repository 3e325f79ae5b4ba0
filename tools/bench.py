"""Decode/prefill speed and size of a GPT-2-small-shaped model (124 M, random init: speed does not depend on
values): fp32 ORT, ORT MatMulNBits int4 (block 32, accuracy_level 4, Gemm converted to MatMul+Add so every
layer is covered) and RBE, measured interleaved in one run. Writes BENCHMARKS.md.

    python tools/bench.py [--work DIR] [--tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys, time, numpy as np, psutil
from rbe_onnx.runtime import Gpt2Shape, greedy_generate, make_session
from rbe_onnx.runtime.feeds import prefill_feeds
path, shape_dir, threads, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
shape = Gpt2Shape.from_dir(shape_dir)
s = make_session(path, threads=threads)
rng = np.random.default_rng(0)
prompt = rng.integers(0, shape.vocab_size, 32).tolist()
greedy_generate(s, shape, prompt, 4)  # warm-up
res = greedy_generate(s, shape, prompt, tokens + 1)
pre = {}
for n in (32, 256):
    ids = rng.integers(0, shape.vocab_size, (1, n))
    times = []
    for _ in range(3):
        t = time.perf_counter(); s.run(["logits"], prefill_feeds(shape, ids)); times.append(time.perf_counter() - t)
    pre[n] = 1e3 * float(np.median(times))
print(json.dumps({"decode_ms": res.decode_ms_median, "decode_n": len(res.decode_ms), "prefill32_ms": pre[32],
                  "prefill256_ms": pre[256], "peak_rss_mb": psutil.Process().memory_info().rss / 1e6}))
"""


def files_mb(model: Path) -> float:
    return sum(f.stat().st_size for f in model.parent.iterdir() if f.name.startswith(model.name)) / 1e6


def build(work: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from rbe_onnx.compressor import rewrite
    from rbe_onnx.export import export_gpt2, make_random_gpt2
    from rbe_onnx.onnx_io import save_model
    from rbe_onnx.passes.gemm_to_matmul import gemm_to_matmul

    fp32 = work / "fp32" / "model.onnx"
    if not fp32.exists():
        hf = make_random_gpt2(work / "hf", n_layer=12, n_embd=768, n_head=12, n_positions=1024)
        export_gpt2(hf, fp32.parent)
    models = {"fp32 ORT": fp32}
    nbits = work / "nbits" / "model.onnx"
    if not nbits.exists():
        m = onnx.load(str(fp32))
        gemm_to_matmul(m)
        q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=False, accuracy_level=4)
        q.process()
        save_model(q.model.model, nbits)
    models["ORT MatMulNBits int4 b32 acc4"] = nbits
    for bits, block in ((4, 64), (3, 128)):
        out = work / f"rbe{bits}b{block}" / "model.onnx"
        if not out.exists():
            rewrite(fp32, out, bits=bits, block_size=block)
        models[f"RBE {bits}-bit/{block}"] = out
    return models


def kernel_bandwidth(threads: int) -> list[tuple[str, float, float]]:
    from rbe_onnx import _kernels
    from rbe_onnx.codec import encode

    rng = np.random.default_rng(0)
    rows = []
    for K, N in ((768, 3072), (3072, 768), (768, 50257)):
        w = encode((rng.standard_normal((K, N)) * 0.02).astype(np.float32), bits=4, block_size=64)
        cpp = _kernels.Weight(w.seeds, w.codes, w.K, w.N, w.block_size, w.bits, w.scale0)
        a = rng.standard_normal((1, K)).astype(np.float32)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            cpp.gemm(a, threads=threads)
            times.append(time.perf_counter() - t)
        dt = float(np.median(times))
        rows.append((f"{K}x{N}", 1e3 * dt, w.nbytes / dt / 1e9))
    return rows


def read_bandwidth() -> float:
    """Single-process read bandwidth (GB/s) of a 512 MB buffer, for the kernels' share of the limit."""
    buf = np.ones(128 * 1024 * 1024, dtype=np.float32)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.nbytes / min(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    args = ap.parse_args()
    work = Path(args.work)
    models = build(work)
    results: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, path in models.items():  # interleaved: drift hits every variant alike
            out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(models["fp32 ORT"].parent),
                                  str(args.threads), str(args.tokens)], capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {n: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for n, rs in results.items()}
    anchor = med["ORT MatMulNBits int4 b32 acc4"]["decode_ms"]
    lines = ["# Benchmarks", "", f"Command: `python tools/bench.py --tokens {args.tokens} --threads {args.threads} "
             f"--rounds {args.rounds}` (GPT-2-small shape, 124 M parameters, random init; {args.threads} threads; "
             "medians over interleaved rounds; decode = median ms/token of "
             f"{args.tokens} greedy tokens after a 32-token prompt, KV cache round-tripped through numpy).", "",
             "| model | files MB | decode ms/token | vs MatMulNBits | prefill 32 ms | prefill 256 ms | RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {files_mb(models[name]):.1f} | {m['decode_ms']:.2f} | "
                     f"{m['decode_ms'] / anchor:.2f}x | {m['prefill32_ms']:.1f} | {m['prefill256_ms']:.1f} | "
                     f"{m['peak_rss_mb']:.0f} |")
    bw = read_bandwidth()
    lines += ["", f"Kernel alone (pybind, 4-bit/64, M=1, {args.threads} threads); machine read bandwidth "
              f"(numpy sum, 1 thread) {bw:.1f} GB/s:", "", "| GEMV K x N | ms | GB/s of compressed weight |",
              "|---|---|---|"]
    for shape, ms, gbs in kernel_bandwidth(args.threads):
        lines.append(f"| {shape} | {ms:.3f} | {gbs:.1f} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
