"""Shared fixtures: reference checkpoints, small random checkpoints and their ONNX exports (built once per run)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The checkout's sibling shared/ folder, when the tests run from an installed package in another cwd.
_SIBLING_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if _SIBLING_DATA.is_dir():
    os.environ.setdefault("RBE_SHARED_DATA", str(_SIBLING_DATA))

torch.set_num_threads(2)

ORT_THREADS = 2


@pytest.fixture(scope="session")
def shared_data() -> Path:
    from rbe_onnx.paths import shared_data_dir

    return shared_data_dir()


@pytest.fixture(scope="session")
def ref_gpt2_dir(shared_data) -> Path:
    return shared_data / "ref-gpt2"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from rbe_onnx.export.random_models import minilm_dir as locate

    try:
        return locate()
    except ImportError as exc:
        pytest.fail(f"MiniLM checkpoint unavailable: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    from rbe_onnx.export import make_random_gpt2

    return make_random_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), n_layer=2, n_embd=64, n_head=2)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    from rbe_onnx.export import make_random_bert

    return make_random_bert(tmp_path_factory.mktemp("tiny-bert"), n_layer=2, hidden_size=64, n_head=2)


def _export(tmp_path_factory, name: str, export_fn, model_dir: Path) -> Path:
    out_dir = tmp_path_factory.mktemp(name)
    export_fn(model_dir, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def ref_gpt2_onnx_dir(tmp_path_factory, ref_gpt2_dir) -> Path:
    from rbe_onnx.export import export_gpt2

    return _export(tmp_path_factory, "ref-gpt2-onnx", export_gpt2, ref_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_onnx_dir(tmp_path_factory, tiny_gpt2_dir) -> Path:
    from rbe_onnx.export import export_gpt2

    return _export(tmp_path_factory, "tiny-gpt2-onnx", export_gpt2, tiny_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_bert_onnx_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    from rbe_onnx.export import export_bert

    return _export(tmp_path_factory, "tiny-bert-onnx", export_bert, tiny_bert_dir)


@pytest.fixture(scope="session")
def minilm_onnx_dir(tmp_path_factory, minilm_dir) -> Path:
    from rbe_onnx.export import export_bert

    return _export(tmp_path_factory, "minilm-onnx", export_bert, minilm_dir)


def make_ort_session(model_path: str | Path, *, custom_op_library: str | None = None):
    """A CPU InferenceSession limited to the test thread budget; accepts a model file or its folder."""
    import onnxruntime as ort

    path = Path(model_path)
    if path.is_dir():
        path = path / "model.onnx"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    if custom_op_library:
        opts.register_custom_ops_library(custom_op_library)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def ort_session():
    """Factory fixture: `ort_session(path_or_dir)` -> cached CPU InferenceSession (see `make_ort_session`)."""
    cache: dict[tuple, object] = {}

    def get(model_path, *, custom_op_library: str | None = None):
        key = (str(Path(model_path).resolve()), custom_op_library)
        if key not in cache:
            cache[key] = make_ort_session(model_path, custom_op_library=custom_op_library)
        return cache[key]

    return get
