"""`rbe-onnx eval`: reproducible WikiText-2 test figures, with and without a reference."""
from __future__ import annotations

import json

from rbe_onnx.cli import main as cli


def run_eval(capsys, *args) -> dict:
    assert cli(["eval", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def test_gpt2_eval_is_reproducible_and_compares_to_reference(ref_gpt2_onnx_dir, capsys):
    first = run_eval(capsys, ref_gpt2_onnx_dir, "--windows", 3)
    again = run_eval(capsys, ref_gpt2_onnx_dir, "--windows", 3)
    assert first == again
    assert first["positions"] == 3 * 255 and 1 < first["ppl"] < 50257
    same = run_eval(capsys, ref_gpt2_onnx_dir, "--windows", 3, "--reference", ref_gpt2_onnx_dir)
    assert same["ppl"] == first["ppl"] and abs(same["kl"]) < 1e-9 and same["top1"] == 1.0


def test_bert_eval_needs_a_reference(minilm_onnx_dir, capsys):
    assert cli(["eval", str(minilm_onnx_dir)]) == 2
    assert "--reference" in capsys.readouterr().out
    out = run_eval(capsys, minilm_onnx_dir, "--reference", minilm_onnx_dir, "--sentences", 20)
    assert out["sentences"] == 20 and out["cos_min"] > 0.99999
