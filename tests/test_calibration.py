"""Calibrated (error-feedback) encoding: better fidelity than round-to-nearest, and never fed the test split."""
from __future__ import annotations

import numpy as np
import pytest

from rbe_onnx import rewrite
from rbe_onnx import datasets
from rbe_onnx.calibration import activation_hessians, calibration_batches
from rbe_onnx.codec import decode, encode
from rbe_onnx.codec.gptq import encode_gptq
from rbe_onnx.evaluate import compare, wikitext_test_windows
from rbe_onnx.runtime import Gpt2Shape, make_session


def test_gptq_lowers_output_error_on_correlated_inputs():
    rng = np.random.default_rng(0)
    K, N = 192, 96
    W = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    mix = np.eye(K) + 0.5 * rng.standard_normal((K, K)) / np.sqrt(K)
    X = rng.standard_normal((4096, K)) @ mix
    X[:, 7] *= 15.0  # an outlier channel, as LayerNorm outputs have
    H = X.T @ X
    out_err = lambda D: np.linalg.norm(X @ (D - W)) / np.linalg.norm(X @ W)  # noqa: E731
    for bits in (3, 4, 5, 8):
        rtn, gptq = out_err(decode(encode(W, bits=bits))), out_err(decode(encode_gptq(W, H, bits=bits)))
        assert gptq < 0.9 * rtn, (bits, rtn, gptq)


@pytest.mark.parametrize("model_dir", ["tiny_gpt2_onnx_dir", "tiny_bert_onnx_dir"])
def test_hessians_are_the_float64_sums_over_real_tokens(model_dir, request):
    """The single-precision syrk sums match xᵀx taken in float64 over the same activations, padding left out
    (BERT batches are padded per batch), and come out whole and symmetric. One sequence a batch, so that the
    float32 partial sums are moved into float64 more than once (every GRAM_BATCHES batches)."""
    import onnx
    import onnxruntime as ort

    from rbe_onnx.calibration import GRAM_BATCHES
    from rbe_onnx.passes import find_candidates

    model_dir = request.getfixturevalue(model_dir)
    model = onnx.load(str(model_dir / "model.onnx"))
    names = sorted({c.node.input[0] for c in find_candidates(model, None, embeddings=False) if c.eligible})[:3]
    batches = calibration_batches(model_dir, 3072, batch=1)
    assert len(batches) > 2 * GRAM_BATCHES
    H = activation_hessians(model, model_dir, names, tokens=3072, batch=1, progress=False)
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = {name: 0.0 for name in names}
    for feeds, real in batches:
        for name, x in zip(names, session.run(names, feeds)):
            x = x.reshape(-1, x.shape[-1])[real.reshape(-1)].astype(np.float64)
            expected[name] = expected[name] + x.T @ x
    for name in names:
        np.testing.assert_array_equal(H[name], H[name].T)
        assert H[name].dtype == np.float64
        assert np.abs(H[name] - expected[name]).max() <= 1e-5 * np.abs(expected[name]).max(), name


def test_statistics_graph_keeps_only_what_feeds_the_activations(tiny_gpt2_onnx_dir):
    """The calibration runs a copy of the graph cut down to the nodes the activations need: GPT-2's LM head is
    left out, and the activations come out as the whole graph computes them."""
    import onnx
    import onnxruntime as ort

    from rbe_onnx.calibration import _outputs_only
    from rbe_onnx.passes import find_candidates

    model = onnx.load(str(tiny_gpt2_onnx_dir / "model.onnx"))
    candidates = [c for c in find_candidates(model, None, embeddings=False) if c.eligible]
    head = next(c for c in candidates if "logits" in c.node.output)
    names = sorted({c.node.input[0] for c in candidates})
    probe = _outputs_only(model, names)
    assert [o.name for o in probe.graph.output] == names
    assert head.node.name not in {n.name for n in probe.graph.node}
    assert "logits" not in {o for n in probe.graph.node for o in n.output}
    assert {t.name for t in probe.graph.initializer} < {t.name for t in model.graph.initializer}
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    cut = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds, _ = calibration_batches(tiny_gpt2_onnx_dir, 256, batch=1)[0]
    for a, b in zip(whole.run(names, feeds), cut.run(names, feeds)):
        np.testing.assert_array_equal(a, b)


def test_calibration_refuses_the_test_split(tiny_gpt2_onnx_dir):
    with pytest.raises(ValueError, match="valid' only"):
        calibration_batches(tiny_gpt2_onnx_dir, 256, split="test")


def test_calibrated_rewrite_reads_only_the_valid_split(tiny_gpt2_onnx_dir, tmp_path, monkeypatch):
    seen = []
    for name in ("wikitext2_rows", "wikitext2_text"):
        original = getattr(datasets, name)
        monkeypatch.setattr(datasets, name, lambda split, _f=original: (seen.append(split), _f(split))[1])
    rewrite(tiny_gpt2_onnx_dir / "model.onnx", tmp_path / "model.onnx", bits=4, calibrate=True,
            calibration_tokens=512, progress=False)
    assert seen and set(seen) == {"valid"}


def test_calibrated_4bit_ref_gpt2_is_closer_to_fp32(ref_gpt2_onnx_dir, tmp_path):
    shape = Gpt2Shape.from_dir(ref_gpt2_onnx_dir)
    windows = wikitext_test_windows(str(ref_gpt2_onnx_dir / "tokenizer.json"), 256, 8)
    reference = make_session(ref_gpt2_onnx_dir, threads=2)
    scores = {}
    for calibrate in (False, True):
        out = tmp_path / str(calibrate) / "model.onnx"
        # Embeddings stay fp32 here: a Gather has no activation statistics, so they would only blur the
        # comparison of the two roundings.
        rewrite(ref_gpt2_onnx_dir / "model.onnx", out, bits=4, calibrate=calibrate, embeddings=False,
                progress=False)
        scores[calibrate] = compare(make_session(out, threads=2), shape, windows, reference)
    print(f"ref-gpt2 4-bit/64, 8 test windows: RTN {scores[False]}, calibrated {scores[True]}")
    assert scores[True]["kl"] < scores[False]["kl"] / 3
    assert scores[True]["top1"] > scores[False]["top1"]


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_a_calibration_without_tokens_is_refused(tiny_gpt2_onnx_dir, tmp_path, capsys, tokens):
    from rbe_onnx.cli import main as cli

    assert cli(["rewrite", str(tiny_gpt2_onnx_dir / "model.onnx"), "-o", str(tmp_path / "model.onnx"),
                "--calibrate", "--calib-tokens", tokens, "-q"]) == 2
    assert f"--calib-tokens must be a positive number of tokens, got {tokens}" in capsys.readouterr().out
