"""Decode ms/token of KV-cached generation at a short and a long past, on a GPT-2-small-shaped model (124 M,
random init: speed does not depend on the values), fp32 and RBE 4-bit/64, for three ways of carrying the cache
from step to step:

- numpy round-trip: `session.run` with numpy feeds, presents copied out and fed back (ORT copies each KV buffer
  into a fresh present at every step);
- IO binding, ORT-allocated: presents bound to ORT-allocated OrtValues, re-bound as the next step's past;
- IO binding, preallocated: one buffer per layer's key and value, bound as both past and present, so the graph
  writes the new positions in place (`BoundGpt2`, what `Generator` uses), timed through the real token loop
  (forward + sampling + mask/position update).

    python tools/bench_generate.py [--work DIR] [--threads 2] [--steps 16] [--rounds 3] [--past 32 512]

The models are built once under --work (same layout as tools/bench.py, so `--work out/bench` reuses its
models; the 4-bit rewrite of 124 M weights takes minutes). Modes, models and past lengths are interleaved over
rounds so machine drift hits them alike; the table reports the median over rounds of each round's median step,
and the fastest single step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build(work: Path) -> dict[str, Path]:
    from rbe_onnx.compressor import rewrite
    from rbe_onnx.export import export_gpt2, make_random_gpt2

    fp32 = work / "fp32"
    if not (fp32 / "model.onnx").exists():
        hf = make_random_gpt2(work / "hf", n_layer=12, n_embd=768, n_head=12, n_positions=1024)
        export_gpt2(hf, fp32)
    rbe = work / "rbe4b64"
    if not (rbe / "model.onnx").exists():
        rewrite(fp32 / "model.onnx", rbe / "model.onnx", bits=4, block_size=64)
    return {"fp32": fp32, "RBE 4-bit/64": rbe}


def decode_numpy(session, shape, prompt: np.ndarray, steps: int) -> list[float]:
    from rbe_onnx.runtime.feeds import prefill_feeds

    outputs = [o.name for o in session.get_outputs()]
    result = dict(zip(outputs, session.run(outputs, prefill_feeds(shape, prompt, capacity=prompt.shape[1] + steps))))
    length, times = prompt.shape[1], []
    for _ in range(steps):
        t0 = time.perf_counter()
        token = result["logits"][:, -1].argmax(-1)
        feeds = {"input_ids": token[:, None].astype(np.int64),
                 "attention_mask": np.ones((1, length + 1), dtype=np.int64),
                 "position_ids": np.array([[length]], dtype=np.int64)}
        for i in range(shape.n_layer):
            feeds[f"past_key_values.{i}.key"] = result[f"present.{i}.key"]
            feeds[f"past_key_values.{i}.value"] = result[f"present.{i}.value"]
        result = dict(zip(outputs, session.run(outputs, feeds)))
        times.append(time.perf_counter() - t0)
        length += 1
    return times


def decode_ort_allocated(session, shape, prompt: np.ndarray, steps: int) -> list[float]:
    from rbe_onnx.runtime.feeds import prefill_feeds
    from rbe_onnx.runtime.kv_binding import past_names

    outputs = [o.name for o in session.get_outputs()]
    pasts = past_names(shape.n_layer)
    io = session.io_binding()
    for name, value in prefill_feeds(shape, prompt, capacity=prompt.shape[1] + steps).items():
        io.bind_cpu_input(name, value)
    for name in outputs:
        io.bind_output(name, "cpu")
    session.run_with_iobinding(io)
    length, times = prompt.shape[1], []
    for _ in range(steps):
        t0 = time.perf_counter()
        values = io.get_outputs()
        token = values[0].numpy()[:, -1].argmax(-1)
        io.bind_cpu_input("input_ids", token[:, None].astype(np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, length + 1), dtype=np.int64))
        io.bind_cpu_input("position_ids", np.array([[length]], dtype=np.int64))
        for name, value in zip(pasts, values[1:]):
            io.bind_ortvalue_input(name, value)
        for name in outputs:
            io.bind_output(name, "cpu")
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - t0)
        length += 1
    return times


def decode_preallocated(session, shape, prompt: np.ndarray, steps: int) -> list[float]:
    from rbe_onnx.runtime.kv_binding import BoundGpt2
    from rbe_onnx.runtime.sampling import Sampler, SamplingConfig
    from rbe_onnx.runtime.token_loop import TokenLoop

    prompts = prompt.tolist()
    loop = TokenLoop(BoundGpt2(session, shape), prompts, max_new_tokens=steps + 1,
                     sampler=Sampler(SamplingConfig.greedy(), prompts, shape.vocab_size), eos_token_id=None)
    for _ in loop:
        pass
    return [ms / 1e3 for ms in loop.decode_ms]


MODES = {"numpy round-trip": decode_numpy, "IO binding, ORT-allocated": decode_ort_allocated,
         "IO binding, preallocated (Generator)": decode_preallocated}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed after each prefill")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--past", type=int, nargs=2, default=(32, 512), metavar=("SHORT", "LONG"))
    args = ap.parse_args()

    from rbe_onnx.runtime import Gpt2Shape, make_session

    models = build(Path(args.work))
    shape = Gpt2Shape.from_dir(models["fp32"])
    sessions = {name: make_session(path, threads=args.threads) for name, path in models.items()}
    rng = np.random.default_rng(0)
    prompts = {p: rng.integers(0, shape.vocab_size, (1, p)) for p in args.past}
    for session in sessions.values():  # warm-up: first-run allocations and page-ins out of the timings
        decode_preallocated(session, shape, prompts[args.past[0]], 2)
    rounds: dict[tuple, list[list[float]]] = {}
    for r in range(args.rounds):
        for model, session in sessions.items():
            for mode, fn in MODES.items():
                for past in args.past:
                    ms = [1e3 * t for t in fn(session, shape, prompts[past], args.steps)]
                    rounds.setdefault((model, mode, past), []).append(ms)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def median(key) -> float:
        return float(np.median([np.median(steps) for steps in rounds[key]]))

    def fastest(key) -> float:
        return float(min(min(steps) for steps in rounds[key]))

    short, long = args.past
    print(f"Command: `python tools/bench_generate.py --threads {args.threads} --steps {args.steps} --rounds "
          f"{args.rounds} --past {short} {long}` (GPT-2-small shape, 124 M parameters, random init, batch 1; "
          f"decode ms/token = median over {args.rounds} interleaved rounds of the median of {args.steps} "
          f"greedy steps after a {short}- or {long}-token prompt; 'fastest' = the fastest single step, "
          f"the better estimate when other processes share the cores)\n")
    print(f"| model | KV cache | ms/token, past {short} | ms/token, past {long} | ratio {long}/{short} "
          f"| fastest, past {short} | fastest, past {long} | fastest ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model in sessions:
        for mode in MODES:
            a, b = median((model, mode, short)), median((model, mode, long))
            fa, fb = fastest((model, mode, short)), fastest((model, mode, long))
            print(f"| {model} | {mode} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {fa:.2f} | {fb:.2f} | {fb / fa:.2f}x |")


if __name__ == "__main__":
    main()
