"""Decode/prefill speed and size of a GPT-2-small-shaped model (124 M, random init: speed does not depend on
values): fp32 ORT, ORT MatMulNBits int4 (block 32, accuracy_level 4, Gemm converted to MatMul+Add so every
layer is covered) and RBE variants, measured interleaved in one run, each beside a stand-in of its graph
without the weight products (so a token's time splits into products and the rest by measurement); then the RBE
GEMV kernels alone against the machine's measured read bandwidth. Writes BENCHMARKS.md and docs/speed.png.

    python tools/bench.py [--work DIR] [--tokens 64] [--threads 2] [--rounds 2] [--only REGEX]

RBE variants: `int8` rows carry the node attribute accuracy_level=4 (activations quantized to int8 per block,
as MatMulNBits' accuracy_level 4; FORMAT.md §2.1), the others run the exact float path (accuracy_level 0).
bpw = bits per weight of the rewritten MatMul/Gemm weights, everything counted (codes + 64-bit seeds;
MatMulNBits: 4-bit codes + fp32 scale + 4-bit zero point per 32).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"  # its section of BENCHMARKS.md

PROBE = r"""
import json, sys, time, numpy as np, psutil
from rbe_onnx.runtime import Gpt2Shape, greedy_generate, make_session
from rbe_onnx.runtime.feeds import prefill_feeds
path, shape_dir, threads, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
decode_only = len(sys.argv) > 5 and sys.argv[5] == "decode-only"
shape = Gpt2Shape.from_dir(shape_dir)
s = make_session(path, threads=threads)
rng = np.random.default_rng(0)
prompt = rng.integers(0, shape.vocab_size, 32).tolist()
greedy_generate(s, shape, prompt, 4)  # warm-up
res = greedy_generate(s, shape, prompt, tokens + 1)
pre = {32: float("nan"), 256: float("nan")}
for n in (() if decode_only else (32, 256)):
    ids = rng.integers(0, shape.vocab_size, (1, n))
    times = []
    for _ in range(3):
        t = time.perf_counter(); s.run(["logits"], prefill_feeds(shape, ids)); times.append(time.perf_counter() - t)
    pre[n] = 1e3 * float(np.median(times))
print(json.dumps({"decode_ms": res.decode_ms_median, "decode_n": len(res.decode_ms), "prefill32_ms": pre[32],
                  "prefill256_ms": pre[256], "peak_rss_mb": psutil.Process().memory_info().rss / 1e6}))
"""

NBITS = "ORT MatMulNBits int4 b32 acc4"
# label, bits, block_size, accuracy_level, input rotation (FORMAT.md §5.3: what --rotate costs at decode)
RBE_VARIANTS = [
    ("RBE 4-bit/64", 4, 64, 0, False),
    ("RBE 4-bit/64 int8", 4, 64, 4, False),
    ("RBE 4-bit/128 int8", 4, 128, 4, False),
    ("RBE 3-bit/256 int8", 3, 256, 4, False),
    ("RBE 3-bit/256 int8 --rotate", 3, 256, 4, True),
    ("RBE 2-bit/128 int8", 2, 128, 4, False),
    ("RBE 5-bit/128 int8", 5, 128, 4, False),  # the width --target-bpw gives sensitive projections
]


def files_mb(model: Path) -> float:
    """model.onnx plus the external data files it references."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    m = onnx.load(str(model), load_external_data=False)
    files = {model}
    for t in _get_all_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            files.add(model.parent / ExternalDataInfo(t).location)
    return sum(f.stat().st_size for f in files) / 1e6


def with_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    """A copy of the graph with accuracy_level set on every RBEFusedGemm (what `rewrite --accuracy-level` does),
    sharing src's external data so that one encoding serves both arithmetics."""
    import onnx

    from rbe_onnx.passes import set_accuracy_level

    m = onnx.load(str(src), load_external_data=False)
    set_accuracy_level(m, level)
    onnx.save(m, str(dst))
    return dst


def build(work: Path, only: str | None) -> tuple[dict[str, Path], dict[str, float]]:
    from rbe_onnx.anchors import matmulnbits_model
    from rbe_onnx.compressor import rewrite
    from rbe_onnx.export import export_gpt2, make_random_gpt2

    fp32 = work / "fp32" / "model.onnx"
    if not fp32.exists():
        hf = make_random_gpt2(work / "hf", n_layer=12, n_embd=768, n_head=12, n_positions=1024)
        export_gpt2(hf, fp32.parent)
    models, bpw = {"fp32 ORT": fp32}, {"fp32 ORT": 32.0}
    nbits = work / "nbits" / "model.onnx"
    models[NBITS], bpw[NBITS] = nbits, matmulnbits_model(fp32, nbits, block_size=32)
    for label, bits, block, level, rotate in RBE_VARIANTS:
        if only and not re.search(only, label):
            continue
        base = work / f"rbe{bits}b{block}{'r' if rotate else ''}" / "model.onnx"
        if not base.exists():
            rewrite(fp32, base, bits=bits, block_size=block, rotate=rotate)
        path = base if level == 0 else with_accuracy_level(base, base.with_name(f"model_acc{level}.onnx"), level)
        models[label], bpw[label] = path, bits + 64 / block
    return models, bpw


def read_probe(work: Path, threads: list[int]) -> dict:
    """Sessions (by thread count) of the read-bandwidth reference: ORT's own fp32 GEMV (MLAS) against three
    768 x 50257 float32 matrices, 463 MB, far past any cache, in an external data file that the sessions map
    rather than copy. The fastest plain stream we know on the machine; numpy's float32 sum, used before, is
    held to ~21 GB/s a thread by its own arithmetic on this CPU and read 41 GB/s with two threads in a minute
    where MLAS read 60-67."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    path = work / "read_probe" / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        weights = [numpy_helper.from_array(rng.random((768, 50257), dtype=np.float32), f"w{i}") for i in range(3)]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", f"w{i}"], [f"y{i}"]) for i in range(3)], "read_probe",
            [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, 768])],
            [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [1, 50257]) for i in range(3)],
            initializer=weights)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    sessions = {}
    for t in threads:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = t, 1
        # No spinning after a sample: the probes' workers must not compete with the next timed process.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[t] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sessions


def read_bandwidth(session) -> float:
    """GB/s of one pass of the read probe's weights."""
    a = {"a": np.ones((1, 768), np.float32)}
    t = time.perf_counter()
    session.run(None, a)
    return 3 * 768 * 50257 * 4 / (time.perf_counter() - t) / 1e9


# The GEMV shapes reported one by one (K x N): the MLP's two projections and the lm_head.
SHAPES_REPORTED = [(768, 3072), (3072, 768), (768, 50257)]


def kernel_bandwidth(sample_bandwidth: Callable[[], None], threads: int, rounds: int) -> list[dict]:
    """The decode step's GEMVs alone (M = 1, the 49 matrices of GPT-2 small in graph order, every weight
    distinct so each is streamed from memory as in the model): ms per step and GB/s of compressed weight
    (codes + seeds) for the whole step and for each of SHAPES_REPORTED (all its instances in the step),
    medians over interleaved repetitions, each GEMV timed inside the binding (activation quantization, thread
    hand-off and kernel; Python's few microseconds per call left out). Calls `sample_bandwidth` (a read-probe
    sample) between those repetitions: the machine's bandwidth drifts within minutes, and a share of it means
    most when both are read together."""
    from rbe_onnx import _kernels
    from rbe_onnx.codec.seed import pack_seeds

    rng = np.random.default_rng(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]
    configs = [(4, 64, 0), (4, 64, 4), (4, 128, 4), (3, 256, 4), (2, 128, 4)]
    sets = {}
    for bits, block, _ in configs:
        if (bits, block) in sets:
            continue
        # Random valid seeds and codes (speed does not depend on the values), distinct memory per matrix.
        ws, nbytes = [], []
        for K, N in shapes:
            nb = -(-K // block)
            seeds = pack_seeds(rng.integers(0, 2000, (N, nb)), rng.integers(0, 16, (N, nb)),
                               rng.integers(-8, 8, (N, nb)), bits)
            codes = rng.integers(0, 256, N * nb * block * bits // 8, dtype=np.uint8)
            ws.append(_kernels.Weight(seeds, codes, K, N, block, bits, 1e-3))
            nbytes.append(codes.nbytes + seeds.nbytes)
        sets[bits, block] = (ws, np.array(nbytes))
    acts = {K: rng.standard_normal((1, K)).astype(np.float32) for K in (768, 3072)}
    runs = [(c, t) for c in configs for t in sorted({1, threads})]
    times: dict = {r: [] for r in runs}
    for _ in range(max(10, 5 * rounds)):
        sample_bandwidth()
        for (bits, block, level), nthreads in runs:
            ws, _ = sets[bits, block]
            times[(bits, block, level), nthreads].append(
                [w.gemm_seconds(acts[K], threads=nthreads, accuracy_level=level) for w, (K, _) in zip(ws, shapes)])
    groups = {"step": np.ones(len(shapes), bool), **{s: np.array([x == s for x in shapes]) for s in SHAPES_REPORTED}}
    rows = []
    for (bits, block, level), nthreads in runs:
        per_call = np.array(times[(bits, block, level), nthreads])  # [repetitions, 49]
        nbytes = sets[bits, block][1]
        row = {"label": f"{bits}-bit/{block} {'int8' if level == 4 else 'float'}", "threads": nthreads}
        for name, pick in groups.items():
            dt = float(np.median(per_call[:, pick].sum(1)))
            row[name] = (1e3 * dt, nbytes[pick].sum() / dt / 1e9)  # ms, GB/s
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    ap.add_argument("--only", default=None, help="regex: only the RBE variants whose label matches")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    work = Path(args.work)
    models, bpw = build(work, args.only)
    from rbe_onnx.anchors import without_weight_products

    # Each model's stand-in: the same graph with its weight products replaced by near-free nodes. Decoding it
    # measures what a token costs outside the products; the difference is the products' share.
    stand_ins = {name: path.with_name(f"{path.stem}_stand_in.onnx") for name, path in models.items()}
    weights = {name: without_weight_products(path, stand_ins[name]) for name, path in models.items()}

    def probe(path: Path, *extra: str) -> dict:
        # cwd: the work folder, so that `python -c` imports the installed package (with its compiled op
        # library), not the source tree's rbe_onnx/ that the repository root would put first on sys.path.
        out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(models["fp32 ORT"].parent),
                              str(args.threads), str(args.tokens), *extra], capture_output=True, text=True,
                             check=True, cwd=work)
        return json.loads(out.stdout.strip().splitlines()[-1])

    # The read bandwidth by thread count: the best of samples taken all through the run (between the models'
    # probes and the kernels' rounds), as this VM's bandwidth drifts by a third within minutes.
    bandwidth = {t: 0.0 for t in sorted({1, args.threads})}
    probes = read_probe(work, list(bandwidth))

    def sample_bandwidth() -> None:
        for t in bandwidth:
            bandwidth[t] = max(bandwidth[t], read_bandwidth(probes[t]))

    results: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, path in models.items():  # interleaved: drift hits every variant alike
            r = probe(path)
            r["outside_ms"] = probe(stand_ins[name], "decode-only")["decode_ms"]
            results[name].append(r)
            sample_bandwidth()
    med = {n: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for n, rs in results.items()}
    anchor = med[NBITS]
    kernels = kernel_bandwidth(sample_bandwidth, args.threads, args.rounds)
    cmd = f"python tools/bench.py --tokens {args.tokens} --threads {args.threads} --rounds {args.rounds}"
    if args.only:
        cmd += f" --only '{args.only}'"
    lines = ["## Speed", "", f"Command: `{cmd}` (GPT-2-small shape, 124 M parameters, random init; "
             f"{args.threads} threads; medians over interleaved rounds; decode = median ms/token of "
             f"{args.tokens} greedy tokens after a 32-token prompt; bpw = bits per weight of the MatMul/Gemm "
             "weights, everything counted; `int8` = accuracy_level 4, int8 activations per block like "
             "MatMulNBits acc4, FORMAT.md §2.1).", "",
             "| model | bpw | files MB | decode ms/token | vs MatMulNBits | prefill 32 ms | prefill 256 ms "
             "| prefill 256 vs MatMulNBits | RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {bpw[name]:.2f} | {files_mb(models[name]):.1f} | {m['decode_ms']:.2f} | "
                     f"{m['decode_ms'] / anchor['decode_ms']:.2f}x | {m['prefill32_ms']:.1f} | "
                     f"{m['prefill256_ms']:.1f} | {m['prefill256_ms'] / anchor['prefill256_ms']:.2f}x | "
                     f"{m['peak_rss_mb']:.0f} |")
    bw = bandwidth[args.threads]
    lines += ["", "Where a decode token's time goes, by measurement: `outside` is the decode ms/token of the same "
              "graph with every weight product (RBEFusedGemm, MatMulNBits, MatMul/Gemm against a weight) replaced "
              "by a near-free stand-in, mean(A) + bias (`rbe_onnx.anchors.without_weight_products`), measured in "
              "the same rounds; `products` is the rest. The stand-in runs with warm caches, where in the real step "
              "the weight stream evicts the rest's working set, so `products` here also carries that eviction's "
              "cost (the next section times the RBE products inside the graph). Their GB/s is the weights' bytes "
              f"(bpw x {weights[NBITS] / 1e6:.1f} M weights) over that time, against the machine's read bandwidth, "
              f"{bw:.1f} GB/s with {args.threads} threads (measured below).", "",
              "| model | decode ms/token | outside products | products | products GB/s (share of read) |",
              "|---|---|---|---|---|"]
    for name, m in med.items():
        products = m["decode_ms"] - m["outside_ms"]
        gbs = bpw[name] * weights[name] / 8 / (products * 1e-3) / 1e9
        lines.append(f"| {name} | {m['decode_ms']:.2f} | {m['outside_ms']:.2f} | {products:.2f} | "
                     f"{gbs:.1f} ({100 * gbs / bw:.0f} %) |")
    from rbe_onnx import _kernels

    lines += ["", f"Kernel ISA (the op library's and the binding's choice on this CPU): `{_kernels.best_isa()}`.", "",
              "Kernels alone (M = 1): the decode step's 49 GEMVs (GPT-2 small, graph order, each weight "
              "distinct in memory; the binding keeps its worker threads parked between calls, as ORT does), each "
              "timed inside the binding around the C++ call (activation quantization, thread hand-off, kernel). "
              "Machine read bandwidth (ORT's fp32 GEMV, MLAS, streaming 463 MB of float32 weights, M = 1: the "
              "fastest plain stream we have; best of the samples taken between the kernels' "
              f"rounds): {bandwidth[1]:.1f} GB/s with 1 thread, {bandwidth[args.threads]:.1f} GB/s with "
              f"{args.threads}.", "",
              "GB/s of compressed weight and, in brackets, its share of the read bandwidth, for the whole step "
              "and for each shape (K x N) over all its instances in the step (12 each, one lm_head):", "",
              "| kernel | threads | ms per decode step | step | " +
              " | ".join(f"{k}x{n}" for k, n in SHAPES_REPORTED) + " |",
              "|---|---|---|---|" + "---|" * len(SHAPES_REPORTED)]
    for row in kernels:
        bw = bandwidth[row["threads"]]
        cells = [f"{row[g][1]:.1f} ({100 * row[g][1] / bw:.0f} %)" for g in ("step", *SHAPES_REPORTED)]
        lines.append(f"| {row['label']} | {row['threads']} | {row['step'][0]:.2f} | " + " | ".join(cells) + " |")
    chart = ROOT / "docs" / "speed.png"
    lines += ["", f"![decode ms/token and kernel GB/s](docs/{chart.name})"]
    text = "\n".join(lines) + "\n"
    if not args.no_write:
        write_section(ROOT / "BENCHMARKS.md", text, BEGIN, END)
        plot(med, kernels, bandwidth, args.threads, chart)
    print(text)


def plot(med: dict[str, dict], kernels: list[dict], bandwidth: dict[int, float], threads: int, path: Path) -> None:
    """Two panels: decode ms/token of every model split into its weight products and the rest (the MatMulNBits
    anchor as a line), and the GEMVs' GB/s per shape at `threads` threads against the machine's read bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = list(med)
    outside = np.array([med[n]["outside_ms"] for n in names])
    a.barh(names, [med[n]["decode_ms"] for n in names] - outside, color="C0", label="weight products")
    a.barh(names, outside, left=[med[n]["decode_ms"] for n in names] - outside, color="C1",
           label="everything else (stand-in graph)")
    a.legend(fontsize=7, loc="lower right")
    a.axvline(med[NBITS]["decode_ms"], color="grey", linestyle="--", linewidth=1)
    a.set_xlabel("decode ms/token (lower is better)"), a.invert_yaxis()
    a.set_title("GPT-2-small shape, batch 1")
    rows = [r for r in kernels if r["threads"] == threads]
    groups = ["step", *SHAPES_REPORTED]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        b.bar(np.arange(len(groups)) + i * width, [r[g][1] for g in groups], width, label=r["label"])
    b.axhline(bandwidth[threads], color="grey", linestyle="--", label=f"read (MLAS fp32 GEMV), {threads} threads")
    b.set_xticks(np.arange(len(groups)) + 0.4 - width / 2,
                 ["whole step"] + [f"{k}x{n}" for k, n in SHAPES_REPORTED])
    b.set_ylabel("GB/s of compressed weight"), b.set_title(f"GEMV kernels alone, {threads} threads")
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
