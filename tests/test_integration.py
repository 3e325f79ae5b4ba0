"""The rewritten ref-gpt2 (4 bits) outside rbe_onnx.runtime: the C++ app examples/cpp_generate and
onnxruntime-genai produce the same greedy tokens as rbe_onnx's Generator; `rbe_onnx.session_options` runs it in
a plain InferenceSession; the genai limitations the export works around are pinned by their exact errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cmake_build import cmake_build

import rbe_onnx
from rbe_onnx import get_library_path, rewrite
from rbe_onnx.api import bundle_library, session_options
from rbe_onnx.export.genai_config import GENAI_CONFIG, ensure_tokenizer_files
from rbe_onnx.runtime import Generator, SamplingConfig
from rbe_onnx.runtime.feeds import Gpt2Shape, prefill_feeds

REPO = Path(__file__).resolve().parents[1]
CPP_EXAMPLE = REPO / "examples" / "cpp_generate"
# In the reference model's training domain (Python docs), so the continuations are real text.
PROMPTS = ["The :mod:`os` module provides", "If the file does not exist,"]
NEW = 32
# One ORT thread everywhere: the 4-layer, 256-wide model gains nothing from more, and on a shared 2-core machine
# a spinning second thread makes every step wait for a busy core.
THREADS = 1


@pytest.fixture(scope="module")
def rbe4_dir(tmp_path_factory, ref_gpt2_onnx_dir) -> Path:
    out = tmp_path_factory.mktemp("integration-rbe4")
    rewrite(ref_gpt2_onnx_dir / "model.onnx", out / "model.onnx", bits=4, progress=False)
    return out


@pytest.fixture(scope="module")
def expected(rbe4_dir) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy tokens) per prompt from rbe_onnx's Generator: the reference for the other runtimes."""
    gen = Generator(rbe4_dir, threads=THREADS)
    runs = []
    for prompt in PROMPTS:
        ids = gen.encode(prompt)
        tokens = gen.generate_ids([ids], max_new_tokens=NEW).completions[0].tokens
        assert len(tokens) == NEW or tokens[-1] == gen.eos_token_id
        runs.append((ids, tokens))
    return runs


# ----------------------------------------------------------------------------------------------------------------
# C++ app
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpp_app(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-generate-build")
    # The Python running the tests is the one whose onnxruntime wheel the app must link.
    cmake_build(CPP_EXAMPLE, build, f"-DPython3_EXECUTABLE={sys.executable}")
    return build / "rbe_generate"


def run_cpp(app: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(app), *args], capture_output=True, text=True, timeout=120)


def test_cpp_app_matches_generator(cpp_app, rbe4_dir, expected):
    for ids, tokens in expected:
        out = run_cpp(cpp_app, "--library", get_library_path(), "--model", str(rbe4_dir), "--threads", str(THREADS),
                      "--new-tokens", str(NEW), *map(str, ids))
        assert out.returncode == 0, out.stderr
        assert [int(t) for t in out.stdout.split()] == tokens
        assert "4 layers, 4 heads x 64" in out.stderr  # the shape it read from the graph's past inputs


def test_cpp_app_reports_errors(cpp_app, rbe4_dir, tmp_path):
    missing = tmp_path / "librbe_missing.so"
    out = run_cpp(cpp_app, "--library", str(missing), "--model", str(rbe4_dir), "464")
    assert out.returncode == 1 and "Failed to load library" in out.stderr and str(missing) in out.stderr
    out = run_cpp(cpp_app, "--model", str(rbe4_dir), "464")
    assert out.returncode == 2 and "--library is required" in out.stderr
    out = run_cpp(cpp_app, "--library", get_library_path(), "--model", str(rbe4_dir), "--new-tokens", "x", "464")
    assert out.returncode == 2 and "--new-tokens must be an integer" in out.stderr


# ----------------------------------------------------------------------------------------------------------------
# onnxruntime-genai
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def genai():
    try:
        import onnxruntime_genai
    except ImportError:
        pytest.fail("onnxruntime-genai is not installed (pip install -r requirements-dev.txt)", pytrace=False)
    return onnxruntime_genai


def genai_model(genai, folder: Path):
    config = genai.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}}))
    return genai.Model(config)


def genai_greedy(genai, model, ids: list[int], new: int, repetition_penalty: float = 1.0) -> list[int]:
    params = genai.GeneratorParams(model)
    # max_length counts the prompt
    params.set_search_options(max_length=len(ids) + new, do_sample=False, repetition_penalty=repetition_penalty)
    generator = genai.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(ids):]


def test_rewrite_carries_genai_files(rbe4_dir, ref_gpt2_onnx_dir):
    config = json.loads((rbe4_dir / GENAI_CONFIG).read_text())
    assert config == json.loads((ref_gpt2_onnx_dir / GENAI_CONFIG).read_text())
    library = config["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert library == Path(get_library_path()).name
    assert (rbe4_dir / library).read_bytes() == Path(get_library_path()).read_bytes()
    assert config["model"]["type"] == "decoder" and config["model"]["eos_token_id"] == 50256
    assert config["model"]["decoder"]["num_hidden_layers"] == 4 and config["model"]["context_length"] == 256


def test_genai_matches_generator(genai, rbe4_dir, expected):
    model = genai_model(genai, rbe4_dir)
    tokenizer = genai.Tokenizer(model)
    for prompt, (ids, tokens) in zip(PROMPTS, expected):
        assert [int(t) for t in tokenizer.encode(prompt)] == ids  # genai reads the tokenizer files we wrote
        assert genai_greedy(genai, model, ids, NEW) == tokens
    # Plain greedy text from this small model soon loops; with a repetition penalty (HF's rule in both) the
    # continuation stays varied, so the comparison covers many distinct steps.
    ids = expected[0][0]
    ours = Generator(rbe4_dir, threads=THREADS).generate_ids(
        [ids], max_new_tokens=NEW, sampling=SamplingConfig.greedy(repetition_penalty=1.3)).completions[0].tokens
    assert len(set(ours)) > NEW // 2
    assert genai_greedy(genai, model, ids, NEW, repetition_penalty=1.3) == ours


def genai_variant(folder: Path, tmp_path: Path, **model_overrides) -> Path:
    """A folder with `folder`'s model (symlinked: genai only canonicalises the library path) and its config
    changed at the `model` level."""
    variant = tmp_path / "variant"
    variant.mkdir()
    for f in folder.iterdir():
        if f.name.startswith("model.onnx"):
            (variant / f.name).symlink_to(f)
        elif f.suffix in (".json", ".txt"):
            shutil.copyfile(f, variant / f.name)
    bundle_library(variant)
    config = json.loads((variant / GENAI_CONFIG).read_text())
    config["model"].update(model_overrides)
    (variant / GENAI_CONFIG).write_text(json.dumps(config))
    return variant


def test_genai_gpt2_type_is_the_legacy_kv_layout(genai, rbe4_dir, tmp_path):
    """Why the config says "decoder": genai's "gpt2" model type expects one combined past_%d tensor per layer
    (the pre-Optimum GPT-2 layout) and finds no such input in the export."""
    variant = genai_variant(rbe4_dir, tmp_path, type="gpt2")
    with pytest.raises(RuntimeError, match=r"^Model input was not found: $"):
        genai_greedy(genai, genai_model(genai, variant), [464], 1)


def test_genai_refuses_library_outside_model_folder(genai, rbe4_dir, tmp_path, monkeypatch):
    """Why the folder carries a copy of the op library: genai loads custom_ops_library only from inside the
    model folder or the working directory."""
    monkeypatch.chdir(tmp_path)
    variant = genai_variant(rbe4_dir, tmp_path)
    config = json.loads((variant / GENAI_CONFIG).read_text())
    config["model"]["decoder"]["session_options"]["custom_ops_library"] = get_library_path()
    (variant / GENAI_CONFIG).write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="custom_ops_library path is not within an allowed directory"):
        genai.Model(str(variant))


def test_genai_tokenizer_files_from_vocab_and_merges(genai, rbe4_dir, ref_gpt2_dir, expected, tmp_path):
    """A checkpoint with only vocab.json + merges.txt still gives genai the tokenizer.json/tokenizer_config.json
    it reads, and genai's tokenizer then encodes like ours."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(ref_gpt2_dir / name, hf / name)
    variant = genai_variant(rbe4_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (variant / name).unlink()
    assert ensure_tokenizer_files(variant, hf) == ["tokenizer.json", "tokenizer_config.json"]
    tokenizer = genai.Tokenizer(genai_model(genai, variant))
    assert [int(t) for t in tokenizer.encode(PROMPTS[0])] == expected[0][0]


# ----------------------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------------------

def test_session_options_runs_rewritten_model(rbe4_dir, expected):
    so = session_options(threads=THREADS)
    assert so.intra_op_num_threads == THREADS and so.inter_op_num_threads == 1
    session = ort.InferenceSession(str(rbe4_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert any(n.domain == "ai.rbe" for n in _graph_nodes(rbe4_dir))
    ids, tokens = expected[0]
    logits = session.run(["logits"], prefill_feeds(Gpt2Shape.from_dir(rbe4_dir), np.array([ids])))[0]
    assert int(logits[0, -1].argmax()) == tokens[0]


def _graph_nodes(folder: Path):
    import onnx

    return onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node


def test_session_options_completes_given_options(rbe4_dir):
    base = ort.SessionOptions()
    base.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so = session_options(options=base, inter_op_threads=None)
    assert so is base and so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(rbe4_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [0, -2, True, 1.5, "2"])
def test_session_options_rejects_bad_threads(threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        session_options(threads=threads)


def test_package_exports_api():
    assert rbe_onnx.session_options is session_options
    assert rbe_onnx.Generator is Generator
