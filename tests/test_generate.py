"""KV-cached generation (rbe_onnx.runtime.generator): token-exact against HF transformers' generate, the 8-bit
RBE model against fp32, sampling filters against HF's processors, stop conditions, streaming, bad inputs, CLI."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rbe_onnx import rewrite
from rbe_onnx.cli import main as cli
from rbe_onnx.runtime import Generator, SamplingConfig, greedy_generate, make_session
from rbe_onnx.runtime.feeds import Gpt2Shape, prefill_feeds
from rbe_onnx.runtime.kv_binding import BoundGpt2
from rbe_onnx.runtime.sampling import Sampler
from rbe_onnx.runtime.text_stream import TextStream

# Prompts in the reference model's training domain (Python and kernel docs). The model is weakly trained, so
# plain greedy output soon falls into loops; a repetition penalty keeps the text varied where it matters.
PROMPTS = ["The :mod:`os` module provides", "This function returns", "To build the documentation, run",
           "Python is an interpreted, high-level programming language whose", "Each device driver must",
           "If the file does not exist,"]
NEW = 64
PENALTY = 1.3
# One ORT thread: the 4-layer, 256-wide reference model gains nothing from a second one, and on a shared
# 2-core machine a spinning second thread makes every step wait for a busy core.
THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def fp32_gen(ref_gpt2_onnx_dir) -> Generator:
    return Generator(ref_gpt2_onnx_dir, threads=THREADS)


@pytest.fixture(scope="module")
def rbe8_gen(tmp_path_factory, ref_gpt2_onnx_dir) -> Generator:
    out = tmp_path_factory.mktemp("gen-rbe8")
    rewrite(ref_gpt2_onnx_dir / "model.onnx", out / "model.onnx", bits=8, progress=False)
    return Generator(out, threads=THREADS)


@pytest.fixture(scope="module")
def hf_model(ref_gpt2_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(ref_gpt2_dir), local_files_only=True, dtype=torch.float32).eval()


def hf_generate(model, prompts: list[list[int]], eos: int, **kw) -> list[list[int]]:
    """HF greedy generate on a left-padded batch; each row's new tokens up to and including its first EOS."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), eos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.no_grad(), torch_threads(1):  # small model: one thread, for the reason given at THREADS
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, pad_token_id=eos, **kw)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ----------------------------------------------------------------------------------------------------------------
# Token-exact against HF transformers
# ----------------------------------------------------------------------------------------------------------------

def test_greedy_matches_hf_batch_1(fp32_gen, hf_model):
    eos = fp32_gen.eos_token_id
    for prompt in PROMPTS[:5]:
        got = fp32_gen.generate(prompt, max_new_tokens=NEW).completions[0]
        (want,) = hf_generate(hf_model, [got.prompt_tokens], eos)
        assert got.tokens == want, prompt
        assert got.finish_reason == ("eos" if want[-1] == eos else "length")
        assert len(got.tokens) == NEW or got.finish_reason == "eos"


def test_greedy_matches_hf_batch_4_left_padded(fp32_gen, hf_model):
    prompts = PROMPTS[1:5]
    result = fp32_gen.generate(prompts, max_new_tokens=NEW)
    ids = [c.prompt_tokens for c in result.completions]
    assert len(set(map(len, ids))) == 4, "the batch must mix prompt lengths to exercise left padding"
    want = hf_generate(hf_model, ids, fp32_gen.eos_token_id)
    for prompt, got, ref in zip(prompts, result.completions, want):
        assert got.tokens == ref, prompt
    assert len(result.decode_ms) == NEW - 1  # no EOS in this batch: one step per token after the first


def test_repetition_penalty_matches_hf(fp32_gen, hf_model):
    for prompt in PROMPTS[:3]:
        got = fp32_gen.generate(prompt, max_new_tokens=NEW, sampling=SamplingConfig.greedy(PENALTY)).completions[0]
        (want,) = hf_generate(hf_model, [got.prompt_tokens], fp32_gen.eos_token_id, repetition_penalty=PENALTY)
        assert got.tokens == want, prompt
        assert len(set(got.tokens)) > 20  # the penalty really produced varied text


# ----------------------------------------------------------------------------------------------------------------
# The 8-bit RBE model follows fp32
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("penalty", [1.0, PENALTY])
def test_rbe8_greedy_follows_fp32(fp32_gen, rbe8_gen, penalty):
    sampling = SamplingConfig.greedy(penalty)
    counts = []
    for prompt in PROMPTS:
        ref = fp32_gen.generate(prompt, max_new_tokens=NEW, sampling=sampling).completions[0].tokens
        got = rbe8_gen.generate(prompt, max_new_tokens=NEW, sampling=sampling).completions[0].tokens
        counts.append(leading_equal(ref, got))
    print(f"8-bit RBE vs fp32, repetition penalty {penalty}: leading equal tokens of {NEW} per prompt: {counts}")
    assert sum(c >= 48 for c in counts) >= 2 * len(PROMPTS) // 3, counts


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (0.7, 0, 1.0, 1.0), (1.3, 50, 1.0, 1.0), (1.0, 0, 0.9, 1.0), (0.8, 40, 0.8, 1.5), (1.0, 0, 0.95, 1.2)])
def test_sampling_distribution_matches_hf_processors(temperature, top_k, top_p, penalty):
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(1)
    vocab = 2000
    # A wide spread of scales, so that some rows have a nucleus of a few tokens and others of hundreds
    # (beyond the sampler's first 64-token probe).
    logits = (rng.standard_normal((3, vocab)) * np.array([[4.0], [1.0], [0.2]])).astype(np.float32)
    history = [rng.integers(0, vocab, 30).tolist() for _ in range(3)]
    cfg = SamplingConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=penalty)
    ours = Sampler(cfg, history, vocab).distribution(logits)

    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)])
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    scores = procs(torch.tensor(history), torch.from_numpy(logits.copy()))
    want = torch.softmax(scores.double(), dim=-1).numpy()
    np.testing.assert_array_equal(ours > 0, want > 0)
    np.testing.assert_allclose(ours, want, atol=1e-6)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(fp32_gen):
    prompt = PROMPTS[0]

    def run(**kw):
        return fp32_gen.generate(prompt, max_new_tokens=32, sampling=SamplingConfig(do_sample=True, **kw))

    a, b, c = run(seed=7), run(seed=7), run(seed=8)
    assert a.completions[0].tokens == b.completions[0].tokens
    assert a.completions[0].tokens != c.completions[0].tokens
    greedy = fp32_gen.generate(prompt, max_new_tokens=32).completions[0].tokens
    assert run(seed=3, top_k=1, temperature=0.7).completions[0].tokens == greedy


def test_stop_string_cuts_text_and_stops(fp32_gen):
    sampling = SamplingConfig.greedy(PENALTY)
    full = fp32_gen.generate(PROMPTS[1], max_new_tokens=NEW, sampling=sampling).completions[0]
    start = len(full.text) // 3
    stop = full.text[start:start + 6]
    expected = full.text[: full.text.index(stop)]
    pieces = []
    result = fp32_gen.generate(PROMPTS[1], max_new_tokens=NEW, sampling=sampling, stop=["never appears", stop],
                               on_text=lambda row, piece: pieces.append(piece))
    got = result.completions[0]
    assert got.finish_reason == "stop"
    assert got.text == expected and "".join(pieces) == expected  # no part of the stop string was streamed
    assert len(got.tokens) < len(full.tokens) and got.tokens == full.tokens[: len(got.tokens)]


def test_eos_finishes_one_row_of_a_batch(fp32_gen):
    prompts = [PROMPTS[0], PROMPTS[1]]
    sampling = SamplingConfig.greedy(PENALTY)
    ref = fp32_gen.generate(prompts, max_new_tokens=NEW, sampling=sampling).completions
    # Pretend EOS is a token the first row produces for the first time after a few steps and the second never.
    j, eos = next((j, t) for j, t in enumerate(ref[0].tokens)
                  if j >= 3 and t not in ref[0].tokens[:j] and t not in ref[1].tokens)
    saved = fp32_gen.eos_token_id
    fp32_gen.eos_token_id = eos
    try:
        got = fp32_gen.generate(prompts, max_new_tokens=NEW, sampling=sampling).completions
    finally:
        fp32_gen.eos_token_id = saved
    assert got[0].finish_reason == "eos" and got[0].tokens == ref[0].tokens[: j + 1]
    assert got[0].text == fp32_gen.tokenizer.decode(ref[0].tokens[:j])  # EOS is not text
    assert got[1].finish_reason == "length" and got[1].tokens == ref[1].tokens  # the other row ran on


# ----------------------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------------------

def test_stream_pieces_concatenate_to_the_text(fp32_gen):
    sampling = SamplingConfig(do_sample=True, temperature=0.9, top_p=0.95, seed=11)
    stream = fp32_gen.stream(PROMPTS[2], max_new_tokens=48, sampling=sampling)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as end:
            result = end.value
            break
    assert len(pieces) > 5 and all(pieces)
    assert "".join(pieces) == result.text
    assert result.text == fp32_gen.generate(PROMPTS[2], max_new_tokens=48, sampling=sampling).text

    with pytest.raises(ValueError, match="max_new_tokens"):  # checked at the call, before any iteration
        fp32_gen.stream(PROMPTS[2], max_new_tokens=0)

    rows: dict[int, str] = {}
    batch = fp32_gen.generate(PROMPTS[:3], max_new_tokens=24, sampling=sampling,
                              on_text=lambda row, piece: rows.__setitem__(row, rows.get(row, "") + piece))
    assert [rows.get(i, "") for i in range(3)] == [c.text for c in batch.completions]


def test_text_stream_holds_split_characters_and_stop_prefixes(fp32_gen):
    tok = fp32_gen.tokenizer
    text = "naïve café: 日本語の文章 🙂 done"
    ids = tok.encode(text).ids
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "" in pieces[:-1]  # some characters span several tokens and had to wait
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text == stream.text

    stream = TextStream(tok, stop=["の文章 🙂 x", "文章"])
    pieces = [stream.push(t) for t in ids]
    assert stream.stopped and "".join(pieces) == "naïve café: 日本語の" == stream.text
    assert stream.finish() == ""


def test_bound_cache_matches_plain_run(ref_gpt2_onnx_dir):
    """Prefill + decode steps through the bound in-place KV buffers give the logits and presents of one plain
    `session.run` over the whole sequence."""
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    session = make_session(ref_gpt2_onnx_dir, threads=THREADS)
    ids = np.array([[464, 11361, 28846, 318, 257, 1332, 13, 383]], dtype=np.int64)
    model = BoundGpt2(session, shape)
    model.reset(1, 10)
    steps = [model.forward(ids[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None]).copy()]
    for t in range(5, 8):
        steps.append(model.forward(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]])).copy())
    outputs = [o.name for o in session.get_outputs()]
    plain = dict(zip(outputs, session.run(None, prefill_feeds(shape, ids))))
    for t, logits in zip(range(4, 8), steps):
        np.testing.assert_allclose(logits[0], plain["logits"][0, t], atol=2e-4)
    for layer in range(shape.n_layer):
        key, value = model.cache(layer)
        np.testing.assert_allclose(key, plain[f"present.{layer}.key"], atol=1e-5)
        np.testing.assert_allclose(value, plain[f"present.{layer}.value"], atol=1e-5)


def test_bound_cache_refuses_concat_era_graphs(ref_gpt2_onnx_dir, tmp_path):
    """A graph whose KV axis carries the names of the older Concat exports (past/total_sequence_length) cannot
    take one buffer as past and present, and would read prefill_feeds' KV buffers as a cached past: the runtime
    and eval say so instead of failing inside ORT or scoring wrong logits."""
    import onnx

    from rbe_onnx.evaluate import compare

    model = onnx.load(str(ref_gpt2_onnx_dir / "model.onnx"))
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = "past_sequence_length"
    onnx.save(model, str(tmp_path / "model.onnx"))
    session = make_session(tmp_path / "model.onnx", threads=THREADS)
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    with pytest.raises(ValueError, match="older rbe-onnx.*export it again"):
        BoundGpt2(session, shape)
    with pytest.raises(ValueError, match="older rbe-onnx.*export it again"):
        compare(session, shape, np.array([[464, 11361, 28846, 318]]))


def test_greedy_generate_compat(fp32_gen, ref_gpt2_onnx_dir):
    """tools/demo.py and tools/bench.py's entry point runs on the same loop."""
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    ids = fp32_gen.encode(PROMPTS[0])
    res = greedy_generate(make_session(ref_gpt2_onnx_dir, threads=THREADS), shape, ids, 16)
    assert res.tokens == fp32_gen.generate(PROMPTS[0], max_new_tokens=16).completions[0].tokens
    assert len(res.decode_ms) == 15 and res.decode_ms_median > 0 and res.prefill_ms > 0


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,kw,message", [
    ("", {}, "the prompt is empty"),
    (["A prompt", ""], {}, "prompt 1 is empty"),
    ("word " * 300, {}, "longer than the model's context of 256"),
    ("word " * 200, {"max_new_tokens": 64}, "exceeds the model's context of 256"),
    ("Hello", {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ([], {}, "no prompts given"),
    ("Hello", {"stop": [""]}, "stop strings must be non-empty"),
    (["Hi", "word " * 300], {}, "prompt 1 has 301 tokens, longer than"),
])
def test_bad_generation_requests(fp32_gen, prompt, kw, message):
    with pytest.raises(ValueError, match=message):
        fp32_gen.generate(prompt, **kw)


@pytest.mark.parametrize("kw,message", [
    ({"temperature": 0.0}, "temperature must be"), ({"top_k": -1}, "top_k must be"),
    ({"top_p": 0.0}, "top_p must be"), ({"top_p": 1.5}, "top_p must be"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be")])
def test_bad_sampling_config(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(do_sample=True, **kw)


def _partial_export(src: Path, dst: Path, *, skip: str = "", info: dict | None = None) -> Path:
    """An export folder linking to `src`'s files except `skip`, optionally with another rbe_export.json."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != skip:
            os.symlink(f, dst / f.name)
    if info is not None:
        (dst / "rbe_export.json").unlink()
        (dst / "rbe_export.json").write_text(json.dumps(info))
    return dst


def test_bad_model_dirs(ref_gpt2_onnx_dir, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        Generator(_partial_export(ref_gpt2_onnx_dir, tmp_path / "no-tok", skip="tokenizer.json"))
    with pytest.raises(ValueError, match="holds a bert export, not gpt2"):
        Generator(_partial_export(ref_gpt2_onnx_dir, tmp_path / "bert", info={"model_type": "bert"}))
    with pytest.raises(ValueError, match="no rbe_export.json"):
        Generator(_partial_export(ref_gpt2_onnx_dir, tmp_path / "plain", skip="rbe_export.json"))
    with pytest.raises(ValueError, match="is not a folder"):
        Generator(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def test_cli_generate_streams_text_and_timings(fp32_gen, ref_gpt2_onnx_dir, capsys):
    expected = fp32_gen.generate(PROMPTS[1], max_new_tokens=12, sampling=SamplingConfig.greedy(PENALTY))
    assert cli(["generate", str(ref_gpt2_onnx_dir), "--prompt", PROMPTS[1], "--max-new-tokens", "12",
                "--greedy", "--repetition-penalty", str(PENALTY), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPTS[1] + expected.text + "\n")
    assert "12 new tokens, stopped by length" in out
    assert "prefill" in out and "decode:" in out and "ms/token" in out

    assert cli(["generate", str(ref_gpt2_onnx_dir), "--prompt", "x", "--greedy", "--top-k", "5"]) == 2
    assert "error:" in capsys.readouterr().out
