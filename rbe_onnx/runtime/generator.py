"""Text generation from an exported GPT-2 folder (fp32 or RBE-rewritten): tokenize, prefill, decode with the
KV cache bound in place, sample, stop, and stream the text as it is produced.

    gen = Generator("gpt2-rbe", threads=2)
    print(gen.generate("The kernel", max_new_tokens=32).text)
    for piece in gen.stream("The kernel", sampling=SamplingConfig(do_sample=True, top_p=0.9, seed=0)):
        print(piece, end="", flush=True)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .feeds import Gpt2Shape
from .kv_binding import BoundGpt2
from .sampling import Sampler, SamplingConfig
from .session import make_session
from .text_stream import TextStream
from .token_loop import EOS, TokenLoop


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]    # generated ids; ends with the EOS id when finish_reason == "eos"
    text: str            # decoded generated text: no EOS, cut before a stop string
    finish_reason: str   # "eos", "stop" (a stop string) or "length" (max_new_tokens)


@dataclass
class Generation:
    completions: list[Completion]
    prefill_ms: float
    decode_ms: list[float]  # one entry per decode step; a step makes one token for every running row

    @property
    def text(self) -> str:
        """The completion's text when a single prompt was given."""
        if len(self.completions) != 1:
            raise ValueError(f"{len(self.completions)} completions: use .completions[i].text")
        return self.completions[0].text

    @property
    def prefill_tokens(self) -> int:
        return sum(len(c.prompt_tokens) for c in self.completions)

    @property
    def decode_ms_per_token(self) -> float:
        """Median time of a decode step (nan when no decode step ran)."""
        return float(np.median(self.decode_ms)) if self.decode_ms else float("nan")


def load_export_shape(model_dir: Path) -> Gpt2Shape:
    """The model's shape from `rbe_export.json`, with a ValueError for anything but a GPT-2 export folder."""
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a folder: pass the export folder holding model.onnx")
    if not (model_dir / "rbe_export.json").is_file():
        raise ValueError(f"{model_dir} is not an rbe-onnx GPT-2 export (no rbe_export.json): create one with "
                         f"`rbe-onnx export gpt2`")
    try:
        shape = Gpt2Shape.from_dir(model_dir)
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{model_dir / 'rbe_export.json'} is malformed: {exc!r}") from exc
    if not (model_dir / "model.onnx").is_file():
        raise ValueError(f"{model_dir} has no model.onnx")
    return shape


def load_tokenizer(model_dir: Path):
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json: generating text needs the tokenizer that "
                         f"`rbe-onnx export` copies beside the model")
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError("text generation needs the `tokenizers` package (pip install 'rbe-onnx[export]')") from exc
    return Tokenizer.from_file(str(path))


class Generator:
    """One model folder, one ORT session, one generation at a time (not thread-safe: the KV buffers and the
    IO binding are reused from call to call)."""

    def __init__(self, model_dir: str | Path, *, threads: int | None = None):
        model_dir = Path(model_dir)
        self.shape = load_export_shape(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.model_dir = model_dir
        # The export's EOS id; set another id, or None to generate until max_new_tokens or a stop string.
        self.eos_token_id: int | None = self.shape.eos_token_id
        self._model = BoundGpt2(make_session(model_dir, threads=threads), self.shape)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
        return self.tokenizer.encode(text).ids

    def generate(self, prompt: str | Sequence[str], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig | None = None, stop: str | Sequence[str] = (),
                 on_text: Callable[[int, str], None] | None = None) -> Generation:
        """Complete one prompt or a batch (left-padded, one row each). `on_text(row, piece)` receives the text
        as it is produced; the pieces of a row concatenate to its completion's text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p:
                name = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise ValueError(f"{name} is empty: at least one token is needed")
        return self.generate_ids([self.encode(p) for p in prompts], max_new_tokens=max_new_tokens,
                                 sampling=sampling, stop=stop, on_text=on_text)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                     sampling: SamplingConfig | None = None, stop: str | Sequence[str] = (),
                     on_text: Callable[[int, str], None] | None = None) -> Generation:
        """`generate` from token ids, one list per row."""
        run = self._start(prompt_ids, max_new_tokens, sampling, stop)
        while True:
            try:
                row, piece = next(run)
            except StopIteration as end:
                return end.value
            if on_text is not None:
                on_text(row, piece)

    def stream(self, prompt: str, *, max_new_tokens: int = 64, sampling: SamplingConfig | None = None,
               stop: str | Sequence[str] = ()) -> Iterator[str]:
        """An iterator over the completion of one prompt, piece by piece; its return value (StopIteration.value)
        is the Generation. Bad arguments raise here, not at the first `next`."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        return _text_only(self._start([self.encode(prompt)], max_new_tokens, sampling, stop))

    def _start(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingConfig | None,
               stop: str | Sequence[str]):
        """Check the request and set it up now, then hand back the generator that runs it."""
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        prompts = [list(map(int, p)) for p in prompt_ids]
        streams = [TextStream(self.tokenizer, stop) for _ in prompts]
        loop = TokenLoop(self._model, prompts, max_new_tokens=max_new_tokens,
                         sampler=Sampler(sampling or SamplingConfig(), prompts, self.shape.vocab_size),
                         eos_token_id=self.eos_token_id)
        return _run(loop, streams)


def _run(loop: TokenLoop, streams: list[TextStream]):
    """Generator of (row, text piece) as tokens arrive; returns the Generation."""
    tokens: list[list[int]] = [[] for _ in streams]
    for step_tokens, live in loop:
        for row in np.flatnonzero(live):
            token = int(step_tokens[row])
            tokens[row].append(token)
            stream = streams[row]
            if loop.finish_reasons[row] == EOS:
                piece = stream.finish()  # the EOS token itself is not text
            else:
                piece = stream.push(token)
                if stream.stopped:
                    loop.stop(int(row))
            if piece:
                yield int(row), piece
    for row, stream in enumerate(streams):
        piece = stream.finish()
        if piece:
            yield row, piece
    completions = [Completion(p, t, s.text, r) for p, t, s, r in zip(loop.prompts, tokens, streams,
                                                                       loop.finish_reasons)]
    return Generation(completions, loop.prefill_ms, list(loop.decode_ms))


def _text_only(run) -> Iterator[str]:
    """The pieces of a one-row run, passing its return value on."""
    while True:
        try:
            _, piece = next(run)
        except StopIteration as end:
            return end.value
        yield piece
