"""Token tables split into frequent and rare rows (passes/split_vocab.py) for --target-bpw."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_ort_session
from rbe_onnx import get_library_path
from rbe_onnx.passes.split_vocab import (METADATA_KEY, SPLIT_MIN_ROWS, assemble, hot_rows, recorded_splits,
                                         split_vocab_tables)

V, D = 5000, 8


def gather_model(table: np.ndarray, *, tied: str = "", twice: bool = False) -> onnx.ModelProto:
    """ids [b, s] -> Gather(table, ids); `tied`: also an LM head on the table, "matmul" (MatMul on its own
    initializer holding the transpose, as GPT-2 exports), "gemm" (Gemm with transB=1 on it) or "shared head"
    (that MatMul's weight also read by a second node); `twice`: a second Gather reads the same table."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"], name="/word/Gather")]
    inits = [numpy_helper.from_array(table, "table")]
    outputs = [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["b", "s", table.shape[1]])]
    if tied:
        if tied == "gemm":
            inits.append(numpy_helper.from_array(table.copy(), "head"))
            flat = helper.make_tensor("flat", TensorProto.INT64, [2], [-1, table.shape[1]])
            nodes += [helper.make_node("Constant", [], ["flat"], value=flat),
                      helper.make_node("Reshape", ["rows", "flat"], ["rows2d"]),
                      helper.make_node("Gemm", ["rows2d", "head"], ["logits"], name="/lm_head/Gemm", transB=1)]
            outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["bs", table.shape[0]]))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "head"))
            nodes.append(helper.make_node("MatMul", ["rows", "head"], ["logits"], name="/lm_head/MatMul"))
            outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", table.shape[0]]))
        if tied == "shared head":
            nodes.append(helper.make_node("MatMul", ["rows", "head"], ["logits2"], name="/lm_head2/MatMul"))
            outputs.append(helper.make_tensor_value_info("logits2", TensorProto.FLOAT, ["b", "s", table.shape[0]]))
    if twice:
        nodes.append(helper.make_node("Gather", ["table", "ids"], ["again"], name="/again/Gather"))
        outputs.append(helper.make_tensor_value_info("again", TensorProto.FLOAT, ["b", "s", table.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def zipf_counts(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = (1e5 / np.arange(1, n + 1) ** 1.1).astype(np.int64)
    counts[n // 2:] = 0  # half the vocabulary never seen
    return counts[rng.permutation(n)]


def test_hot_rows_are_the_fewest_that_cover_the_text():
    counts = zipf_counts(V)
    hot = hot_rows(counts, 0.9)
    order = np.sort(counts)[::-1]
    n = int(hot.sum())
    assert counts[hot].sum() >= 0.9 * counts.sum() > order[: n - 1].sum()  # covers, and one row fewer would not
    assert counts[hot].min() >= counts[~hot].max()                       # the most frequent ones
    assert not hot[counts == 0].any()
    assert hot_rows(np.ones(V, np.int64), 0.99).sum() == V // 2           # never more than half the rows
    with pytest.raises(ValueError, match="1-D"):
        hot_rows(np.ones((2, 3)))


def test_split_table_reads_the_same_rows_for_every_id(tmp_path):
    """The split graph returns exactly the original rows, negative ids included; the metadata records it."""
    table = np.random.default_rng(1).standard_normal((V, D)).astype(np.float32)
    model = gather_model(table)
    counts = zipf_counts(V)
    splits = split_vocab_tables(model, counts, 0.9)
    assert len(splits) == 1 and recorded_splits(model) == splits
    s = splits[0]
    assert (s.rows, s.hot_rows) == (V, int(hot_rows(counts, 0.9).sum()))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "table" not in init and init[s.mask].dtype == np.uint8 and init[s.mask].shape == (V,)
    np.testing.assert_array_equal(assemble(s, init[s.hot], init[s.cold], init[s.mask]), table)
    onnx.checker.check_model(model)
    path = tmp_path / "split.onnx"
    onnx.save(model, path)
    ids = np.array([[0, 1, V - 1, -1, -V, 17], [*np.argsort(-counts)[:3], *np.argsort(counts)[:3]]], np.int64)
    rows = make_ort_session(path).run(["rows"], {"ids": ids})[0]
    np.testing.assert_array_equal(rows, table[ids])
    with pytest.raises(Exception, match="out of bounds|indices"):
        make_ort_session(path).run(["rows"], {"ids": np.array([[V]], np.int64)})


def test_split_tied_head_gives_the_same_logits(tmp_path):
    """A table tied to a MatMul LM head (GPT-2's export) is split on both sides: the head's weight becomes the
    halves' transposes, whose products are put back in vocabulary order; rows and logits are exactly the
    original ones."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((V, D)).astype(np.float32)
    model = gather_model(table, tied="matmul")
    onnx.save(model, tmp_path / "whole.onnx")
    (split,) = split_vocab_tables(model, zipf_counts(V), 0.9)
    assert split.head == "head" and recorded_splits(model) == [split]
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "head" not in init and "table" not in init
    hot = init[split.mask].astype(bool)
    np.testing.assert_array_equal(init["head.hot"], table[hot].T)
    np.testing.assert_array_equal(init["head.cold"], table[~hot].T)
    ids = np.concatenate([[-V, -1, 0, V - 1], rng.integers(-V, V, 252)]).reshape(4, 64)
    onnx.save(model, tmp_path / "split.onnx")
    whole, split_model = (make_ort_session(tmp_path / f"{n}.onnx", custom_op_library=get_library_path())
                          for n in ("whole", "split"))
    for want, got in zip(whole.run(None, {"ids": ids}), split_model.run(None, {"ids": ids})):
        np.testing.assert_array_equal(got, want)


def test_split_leaves_shared_small_and_excluded_tables_whole():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((V, D)).astype(np.float32)
    counts = zipf_counts(V)
    # a Gemm head, a head weight two nodes read, a table two Gathers read
    for model in (gather_model(table, tied="gemm"), gather_model(table, tied="shared head"),
                  gather_model(table, twice=True)):
        assert split_vocab_tables(model, counts) == []
        assert "table" in {t.name for t in model.graph.initializer}
        assert not any(p.key == METADATA_KEY for p in model.metadata_props)
    small = rng.standard_normal((SPLIT_MIN_ROWS - 1, D)).astype(np.float32)
    assert split_vocab_tables(gather_model(small), zipf_counts(SPLIT_MIN_ROWS - 1)) == []
    assert split_vocab_tables(gather_model(table), counts, exclude="word") == []
    assert split_vocab_tables(gather_model(table), zipf_counts(V + 1)) == []  # not a table over this vocabulary


def test_token_counts_read_the_calibration_split_only(tiny_bert_onnx_dir):
    from rbe_onnx.calibration import token_counts

    counts = token_counts(tiny_bert_onnx_dir)
    assert counts.shape == (30522,) and counts.sum() > 100_000 and (counts > 0).sum() > 5000
    with pytest.raises(ValueError, match="test split"):
        token_counts(tiny_bert_onnx_dir, split="test")


def test_frequent_rows_are_chosen_without_the_sensitivity_text(tiny_bert_onnx_dir, ref_gpt2_onnx_dir):
    """--target-bpw measures each weight's sensitivity on the first calibration paragraphs; the frequent rows
    are counted without them, so those paragraphs read the rare rows as often as unseen text does (WikiText-2
    test paragraphs here). Counted with them, they read the frequent rows more often (MiniLM's table was then
    left at 2 bits for its rare rows even at 4.5 bits/weight)."""
    from rbe_onnx.calibration import calibration_batches, token_counts
    from rbe_onnx.compressor import ENCODER_SENSITIVITY_TOKENS, SENSITIVITY_TOKENS
    from rbe_onnx.evaluate import wikitext_test_paragraphs

    probe_text = calibration_batches(tiny_bert_onnx_dir, ENCODER_SENSITIVITY_TOKENS)
    sensitivity = np.concatenate([f["input_ids"][real] for f, real in probe_text])
    test = wikitext_test_paragraphs(str(tiny_bert_onnx_dir / "tokenizer.json"), 500)
    unseen = test["input_ids"][test["attention_mask"] == 1]
    counted, held_out = (hot_rows(token_counts(tiny_bert_onnx_dir, skip=skip)) for skip in (None, probe_text))
    share = {"counted": counted[sensitivity].mean(), "held out": held_out[sensitivity].mean()}
    on_test = held_out[unseen].mean()
    print(f"tokens in the frequent rows: sensitivity text counted {share['counted']:.4f}, held out "
          f"{share['held out']:.4f}; test paragraphs {on_test:.4f}")
    assert abs(share["held out"] - on_test) < 0.03 < share["counted"] - on_test
    # GPT-2 counts running text: the skipped text is the sensitivity probe's whole windows
    gpt2_probe = calibration_batches(ref_gpt2_onnx_dir, SENSITIVITY_TOKENS)
    whole, rest = (token_counts(ref_gpt2_onnx_dir, skip=s) for s in (None, gpt2_probe))
    windows = sum(f["input_ids"].size for f, _ in gpt2_probe)
    assert windows >= SENSITIVITY_TOKENS and whole.sum() - rest.sum() == windows and np.all(rest <= whole)


def test_target_bpw_codes_the_frequent_rows_apart(tiny_bert_onnx_dir, tmp_path):
    """--target-bpw on a BERT export splits its token table; each half gets a setting of its own, the mask is
    counted, the budget holds and the rewritten model runs (and distils, through the reassembled table). The
    tiny model's width of 64 pads every block of 128, hence a budget of 6 bits/weight."""
    from rbe_onnx import rewrite
    from rbe_onnx.calibration import calibration_batches, token_counts
    from rbe_onnx.compressor import ENCODER_SENSITIVITY_TOKENS, totals
    from rbe_onnx.runtime import make_session

    out = tmp_path / "split" / "model.onnx"
    model, rows = rewrite(tiny_bert_onnx_dir / "model.onnx", out, target_bpw=6.0, calibrate=True, progress=False,
                          distill_steps=2)
    by_node = {r.node: r for r in rows}
    hot, cold = by_node["/word/Gather/split/hot"], by_node["/word/Gather/split/cold"]
    assert hot.status == cold.status == "rbe"
    (split,) = recorded_splits(model)
    mask = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == split.mask),
                                 base_dir=str(out.parent)).astype(bool)
    probe_text = calibration_batches(tiny_bert_onnx_dir, ENCODER_SENSITIVITY_TOKENS)
    np.testing.assert_array_equal(mask, hot_rows(token_counts(tiny_bert_onnx_dir, skip=probe_text)))
    K, n_cold = (int(x) for x in cold.shape.split(" x "))
    assert n_cold == split.rows - split.hot_rows
    # the cold row carries the codes, seeds and the one-byte-per-row mask
    cold_weight = next(t for t in model.graph.initializer if t.name == f"{split.cold}.T.rbe_codes")
    assert cold.bytes_after >= len(cold_weight.raw_data) + split.rows
    assert totals(rows)["bits_per_weight"] <= 6.0 + 1e-6
    assert {n.op_type for n in model.graph.node if "/split/" in n.name} >= {"RBEGather", "Where", "CumSum"}
    ids = np.array([[101, 1996, 3231, 2003, 102, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    hidden = make_session(out.parent, threads=1).run(None, feeds)[0]
    assert hidden.shape == (1, 6, 64) and np.all(np.isfinite(hidden))
    _, whole = rewrite(tiny_bert_onnx_dir / "model.onnx", tmp_path / "whole" / "model.onnx", target_bpw=6.0,
                       calibrate=True, progress=False, split_vocab=False)
    assert "/word/Gather" in {r.node for r in whole} and not any("/split/" in r.node for r in whole)


def test_target_bpw_splits_a_tied_gpt2_table_and_stores_each_half_once(tiny_gpt2_onnx_dir, tmp_path):
    """--target-bpw on a GPT-2 export splits the tied wte / lm_head: each half is one codes and one seeds
    initializer read by both its RBEGather and its RBEFusedGemm, the logits stay in vocabulary order, and
    --distill runs on it (the halves are then held as encoded, the projections and LayerNorms trained)."""
    from rbe_onnx import rewrite
    from rbe_onnx.compressor import totals
    from rbe_onnx.runtime import Gpt2Shape, make_session
    from rbe_onnx.runtime.feeds import prefill_feeds

    out = tmp_path / "model.onnx"
    model, rows = rewrite(tiny_gpt2_onnx_dir / "model.onnx", out, target_bpw=6.0, calibrate=True, progress=False,
                          distill_steps=2)
    assert totals(rows)["bits_per_weight"] <= 6.0 + 1e-6
    (split,) = recorded_splits(model)
    assert split.head and split.rows == 50257 and 0 < split.hot_rows < split.rows // 2
    nodes = {n.name: n for n in model.graph.node}
    for half in ("hot", "cold"):
        gather, head = nodes[f"/wte/Gather/split/{half}"], nodes[f"/MatMul/split/{half}"]
        assert gather.op_type == "RBEGather" and head.op_type == "RBEFusedGemm"
        assert gather.input[1] == head.input[1] and gather.input[3] == head.input[4]  # codes, seeds: once
    shape = Gpt2Shape.from_dir(tiny_gpt2_onnx_dir)
    ids = np.random.default_rng(0).integers(0, 50257, (1, 16))
    fp32 = make_session(tiny_gpt2_onnx_dir, threads=1).run(["logits"], prefill_feeds(shape, ids))[0]
    logits = make_session(tmp_path, threads=1).run(["logits"], prefill_feeds(shape, ids))[0]
    assert logits.shape == fp32.shape
    # in vocabulary order: each position's logits follow fp32's over the whole vocabulary
    assert min(np.corrcoef(a, b)[0, 1] for a, b in zip(logits[0], fp32[0])) > 0.9


def merge_model(mask: np.ndarray, *, mask_as_input: bool = False) -> onnx.ModelProto:
    # symbolic shapes, so that ORT's own input checks leave the wrong ones to the op
    inputs = [helper.make_tensor_value_info("first", TensorProto.FLOAT, ["b", "s", "f"]),
              helper.make_tensor_value_info("second", TensorProto.FLOAT, ["b2", "s2", "c"])]
    inits = [numpy_helper.from_array(mask.astype(np.uint8), "from_first")]
    if mask_as_input:
        inputs.append(helper.make_tensor_value_info("from_first", TensorProto.UINT8, [len(mask)]))
        inits = []
    node = helper.make_node("RBEMergeColumns", ["first", "second", "from_first"], ["y"], name="/merge",
                            domain="ai.rbe")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.rbe", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("hot_share", [0.0, 0.18, 1.0])
def test_merge_columns_puts_each_column_in_its_place(tmp_path, hot_share):
    rng = np.random.default_rng(4)
    mask = rng.random(V) < hot_share
    onnx.save(merge_model(mask), tmp_path / "m.onnx")
    session = make_ort_session(tmp_path / "m.onnx", custom_op_library=get_library_path())
    for rows in ((1, 1), (3, 5)):  # one row (decode) and several (prefill, over the pool)
        first = rng.standard_normal((*rows, int(mask.sum()))).astype(np.float32)
        second = rng.standard_normal((*rows, int((~mask).sum()))).astype(np.float32)
        want = np.empty((*rows, V), np.float32)
        want[..., mask], want[..., ~mask] = first, second
        np.testing.assert_array_equal(session.run(None, {"first": first, "second": second})[0], want)


def test_merge_columns_refuses_a_bad_mask_or_shape(tmp_path):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    mask = np.zeros(10, np.uint8)
    mask[[1, 4]] = 1
    bad = mask.copy()
    bad[7] = 2
    for model, message in ((merge_model(bad), "0 or 1, found 2 at 7"),
                           (merge_model(mask, mask_as_input=True), "constant initializer")):
        onnx.save(model, tmp_path / "bad.onnx")
        with pytest.raises((Fail, RuntimeException), match=message):
            make_ort_session(tmp_path / "bad.onnx", custom_op_library=get_library_path())
    onnx.save(merge_model(mask), tmp_path / "m.onnx")
    session = make_ort_session(tmp_path / "m.onnx", custom_op_library=get_library_path())
    with pytest.raises((Fail, InvalidArgument), match="end in 2 and 8 columns"):
        session.run(None, {"first": np.zeros((1, 1, 3), np.float32), "second": np.zeros((1, 1, 8), np.float32)})
    with pytest.raises((Fail, InvalidArgument), match="leading dimensions"):
        session.run(None, {"first": np.zeros((1, 2, 2), np.float32), "second": np.zeros((1, 1, 8), np.float32)})
