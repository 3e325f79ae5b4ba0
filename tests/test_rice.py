"""Rice-coded tables (FORMAT.md §5.4): the numpy codec on the real MiniLM token table, the C++ RBEGather equal to
it bit for bit, malformed tables refused with a message naming the node, and a rewrite that uses them."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rbe_onnx import get_library_path
from rbe_onnx.codec import FormatError, decode, encode, rice_decode, rice_encode
from rbe_onnx.codec.rice import MAX_K, STEP_LADDER, ladder_step
from rbe_onnx.codec.seed import pack_seeds, unpack_seeds


@pytest.fixture(scope="module")
def minilm_table(minilm_dir) -> np.ndarray:
    """W = Eᵀ of 3000 entries of all-MiniLM-L6-v2's token table (K = 384)."""
    from safetensors.numpy import load_file

    E = load_file(str(minilm_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]
    rows = np.random.default_rng(0).choice(E.shape[0], 3000, replace=False)
    return np.ascontiguousarray(E[np.sort(rows)].T.astype(np.float32))


def test_decode_is_the_rounded_table_and_sizes_are_exact(minilm_table):
    W = minilm_table
    step = ladder_step(W, 4)
    t = rice_encode(W, step)
    expected = np.float32(t.scale0) * np.rint(W.astype(np.float64) / t.scale0).astype(np.float32)
    assert np.array_equal(rice_decode(t), expected)
    assert np.array_equal(decode(t), expected)  # the codec's one decode entry point dispatches on the type
    assert t.codes.size == int(t.lengths.sum())
    assert t.nbytes == t.codes.size + 8 * t.N + 2 * t.N + 4


def test_fewer_bits_than_fixed_width_codes_for_the_same_error(minilm_table):
    """What §5.4 is for: on the real token table, at the error of 3- and 4-bit codes in blocks of 128, a
    Rice-coded table with no more error takes at least 0.35 bits per weight fewer (0.42 and 0.46 measured)."""
    W = minilm_table
    energy = float(np.mean(W.astype(np.float64) ** 2))
    rice = []
    for level in range(len(STEP_LADDER)):
        t = rice_encode(W, ladder_step(W, level))
        rice.append((float(np.mean((rice_decode(t) - W) ** 2)) / energy, t.bits_per_weight))
    for bits, bs in ((3, 128), (4, 128)):
        w = encode(W, bits=bits, block_size=bs)
        err = float(np.mean((decode(w) - W) ** 2)) / energy
        matching = min(b for e, b in rice if e <= err)
        assert matching <= w.bits_per_weight - 0.35, (bits, bs, err, matching, w.bits_per_weight)


def test_escapes_and_offsets_round_trip():
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((100, 40)) * 0.02 + 0.5).astype(np.float32)  # entries far from 0: offsets
    W[3, 5], W[7, 9] = 40.0, -40.0  # values only an escape (or a large k) holds
    t = rice_encode(W, 0.01)
    assert np.any(unpack_seeds(t.seeds)["offset"] != 0)
    assert np.array_equal(rice_decode(t), np.float32(t.scale0) * np.rint(W.astype(np.float64) / t.scale0).astype(np.float32))


def test_bad_input_to_the_encoder_is_refused():
    with pytest.raises(ValueError, match="K <= 16384"):
        rice_encode(np.zeros((MAX_K + 1, 2), np.float32), 0.1)
    with pytest.raises(ValueError, match="step must be positive"):
        rice_encode(np.zeros((4, 2), np.float32), 0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rice_encode(np.full((4, 2), np.nan, np.float32), 0.1)
    with pytest.raises(ValueError, match="step too small"):
        rice_encode(np.array([[1e6], [0.0]], np.float32), 1e-3)


def _model(tmp_path, t, *, attrs=None, lengths=None, extra_inputs=(), seeds=None) -> str:
    inits = [numpy_helper.from_array(t.codes, "codes"),
             numpy_helper.from_array(t.lengths if lengths is None else lengths, "lengths")]
    inputs = ["ids", "codes", *extra_inputs, "lengths"]
    if not extra_inputs:
        inputs = ["ids", "codes", "", "", "", "lengths"]
    a = dict(K=t.K, N=t.N, coding=1, scale0=t.scale0,
             seeds=numpy_helper.from_array(t.seeds if seeds is None else seeds, "s"))
    a.update(attrs or {})
    a = {k: v for k, v in a.items() if v is not None}
    node = helper.make_node("RBEGather", inputs, ["rows"], name="emb", domain="ai.rbe", **a)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    model.ir_version = 10
    path = tmp_path / "rice.onnx"
    onnx.save(model, str(path))
    return str(path)


def _session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def test_op_rows_equal_numpy_decode_bit_for_bit(tmp_path, minilm_table):
    W = minilm_table.copy()
    W[0, 1] = 60 * float(np.abs(W).max())  # an escaped value in entry 1
    for level in (0, 5, 9):
        t = rice_encode(W, ladder_step(W, level))
        decoded = np.ascontiguousarray(rice_decode(t).T)  # entry t = row t
        ids = np.array([[0, 1, 2999], [17, -1, -3000]], dtype=np.int64)
        rows = _session(_model(tmp_path, t)).run(None, {"ids": ids})[0]
        assert rows.shape == (2, 3, t.K)
        assert np.array_equal(rows.view(np.uint32), np.ascontiguousarray(decoded[ids]).view(np.uint32))
        every = np.arange(t.N, dtype=np.int64)
        assert np.array_equal(_session(_model(tmp_path, t)).run(None, {"ids": every})[0], decoded)


def _table(K=64, N=20) -> "object":
    W = np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    return rice_encode(W, 0.05)


def _truncated(t):
    lengths = t.lengths.copy()
    lengths[-1] -= 1
    return dict(lengths=lengths), dataclasses.replace(t, codes=t.codes[:-1])


@pytest.mark.parametrize("case,message", [
    ("truncated", "entry 19: stream ends before its K values"),
    ("extra_byte", "entry 19: stream has a whole byte left after its K values"),
    ("sum", "lengths add up to"),
    ("lengths_shape", "input 'lengths' must be a uint16 tensor of shape [20] (N)"),
    ("no_lengths", "input 'lengths' missing (required with coding=1)"),
    ("bits", "attribute 'bits' given with coding=1"),
    ("coding", "attribute 'coding'=2 unsupported"),
    ("seeds_shape", "must have shape [N, 1] (one seed per entry)"),
    ("theta", "seed [3, 0]: theta != 4 in a Rice-coded table"),
    ("big_k", "K=20000 out of range [1, 16384] for a Rice-coded table"),
    ("lengths_without_coding", "input 'lengths' given without coding=1"),
])
def test_malformed_table_is_an_error_naming_the_node(tmp_path, case, message):
    t = _table()
    kwargs = {}
    if case == "truncated":
        kwargs, t = _truncated(t)
    elif case == "extra_byte":
        lengths = t.lengths.copy()
        lengths[-1] += 1
        t = dataclasses.replace(t, codes=np.concatenate([t.codes, [0]]).astype(np.uint8))
        kwargs = dict(lengths=lengths)
    elif case == "sum":
        lengths = t.lengths.copy()
        lengths[0] += 1
        kwargs = dict(lengths=lengths)
    elif case == "lengths_shape":  # (a wrong dtype ORT refuses itself, naming the node and the input)
        kwargs = dict(lengths=t.lengths.reshape(4, 5))
    elif case == "no_lengths":
        path = _model(tmp_path, t)
        m = onnx.load(path)
        m.graph.node[0].input[5] = ""
        onnx.save(m, path)
    elif case == "bits":
        kwargs = dict(attrs=dict(bits=4))
    elif case == "coding":
        kwargs = dict(attrs=dict(coding=2))
    elif case == "seeds_shape":
        kwargs = dict(seeds=np.repeat(t.seeds, 2, axis=1))
    elif case == "theta":
        f = unpack_seeds(t.seeds)
        theta = f["theta"].copy()
        theta[3] = 5
        kwargs = dict(seeds=pack_seeds(f["rho"], theta, f["offset"], f["width"]))
    elif case == "big_k":
        kwargs = dict(attrs=dict(K=20000))
    elif case == "lengths_without_coding":
        kwargs = dict(attrs=dict(coding=None, bits=4, block_size=64))
    path = tmp_path / "rice.onnx" if case == "no_lengths" else _model(tmp_path, t, **kwargs)
    with pytest.raises(Exception) as err:
        _session(str(path))
    assert "RBEGather node 'emb'" in str(err.value) and message in str(err.value), str(err.value)


def _stray_bit_table():
    """One entry of one value 0 (k = 0: the single bit 0) with a 1 in its stream's padding."""
    t = rice_encode(np.zeros((1, 1), np.float32), 1.0)
    assert t.codes.tolist() == [0] and t.lengths.tolist() == [1]
    return dataclasses.replace(t, codes=np.array([0x80], np.uint8))


def test_numpy_decoder_refuses_what_the_op_refuses():
    t = _table()
    _, short = _truncated(t)
    with pytest.raises(FormatError, match="lengths add up to"):
        rice_decode(short)
    lengths = t.lengths.copy()
    lengths[-1] -= 1
    with pytest.raises(FormatError, match="entry 19: stream ends before"):
        rice_decode(dataclasses.replace(short, lengths=lengths))
    with pytest.raises(FormatError, match="entry 0: stream has nonzero bits after its 1 values"):
        rice_decode(_stray_bit_table())


def test_op_refuses_a_stray_bit(tmp_path):
    with pytest.raises(Exception, match="RBEGather node 'emb'.*entry 0: stream has nonzero bits after its K values"):
        _session(_model(tmp_path, _stray_bit_table()))


def test_target_bpw_rice_codes_gather_only_tables(tiny_bert_onnx_dir, tmp_path):
    """A rewrite under --target-bpw gives BERT's gathered tables Rice codes that the op library reads, within
    the budget, and rice_tables=False (--fixed-tables) fixed-width codes. (The tiny model's width of 64 pads
    every block of 128 of its matrices, hence a budget of 6 bits/weight.)"""
    from rbe_onnx.compressor import read_report, rewrite, totals
    from rbe_onnx.runtime import make_session

    out = tmp_path / "rice" / "model.onnx"
    rewrite(tiny_bert_onnx_dir / "model.onnx", out, target_bpw=6.0, calibrate=True, progress=False)
    model = onnx.load(str(out), load_external_data=False)
    rice = {n.name for n in model.graph.node if n.op_type == "RBEGather" and
            any(a.name == "coding" and a.i == 1 for a in n.attribute)}
    gathers = {n.name for n in model.graph.node if n.op_type == "RBEGather"}
    assert rice == gathers and len(rice) >= 3, gathers  # token (split in two), position and type tables
    rows = read_report(out)
    assert {r.node for r in rows if r.coding == "rice"} == rice
    assert totals(rows)["bits_per_weight"] <= 6.0 + 1e-6
    ids = np.array([[101, 1996, 3231, 2003, 102, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    hidden = make_session(out.parent, threads=1).run(None, feeds)[0]
    assert hidden.shape == (1, 6, 64) and np.all(np.isfinite(hidden))

    fixed = tmp_path / "fixed" / "model.onnx"
    rewrite(tiny_bert_onnx_dir / "model.onnx", fixed, target_bpw=6.0, calibrate=True, progress=False,
            rice_tables=False)
    assert not [r for r in read_report(fixed) if r.coding == "rice"]


def test_allocation_offers_only_the_steps_that_code_the_table(monkeypatch):
    """A step too fine for a table's largest value (|q| past what k = 15 or an escape holds) is never offered
    to the budget. One value v among n has v/RMS <= √n, so only tables of over 10^8 values can hit it; the
    check is exercised here at the encoder's bound and, for the allocation, with that bound lowered."""
    from rbe_onnx import allocation
    from rbe_onnx.codec.rice import encodable

    W = np.zeros((4, 2), np.float32)
    W[0, 0] = 1.0
    assert encodable(W, 1.0 / 245000) and not encodable(W, 1.0 / 246000)
    rice_encode(W, 1.0 / 245000)
    with pytest.raises(ValueError, match="step too small"):
        rice_encode(W, 1.0 / 250000)

    rng = np.random.default_rng(3)
    W = (rng.standard_normal((64, 200)) * 0.05).astype(np.float32)
    noise = rng.standard_normal(W.shape).astype(np.float32) * 0.01
    assert [lv for _, lv, _, _ in allocation.rice_options(W, noise, rng)] == list(range(len(STEP_LADDER)))
    coarse = ladder_step(W, 10)
    monkeypatch.setattr(allocation, "encodable", lambda W, step: step >= coarse)
    options = allocation.rice_options(W, noise, rng)
    assert [lv for _, lv, _, _ in options] == list(range(11))
    assert all(kind == allocation.RICE for kind, *_ in options)
