"""The compressor behind `rewrite`: encode every eligible MatMul/Gemm weight (and embedding table) of a model
and swap in RBEFusedGemm / RBEGather nodes."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from .calibration import CALIBRATION_TOKENS
from .codec import RBEWeight, RiceTable, decode, encode, rice_encode
from .codec.rice import MAX_K as RICE_MAX_K, ladder_step
from .codec.center import center_term, fit_center, MIN_ENERGY_REMOVED, with_center
from .codec.gptq import encode_gptq
from .codec.outliers import BITS_PER_OUTLIER
from .codec.seed import TAG_ROTATED, with_tag
from .codec.rotation import DEFAULT_MAX_BLOCK, Rotation, block_for, seed_for
from .onnx_io import load_model, save_model
from .passes import Candidate, find_candidates, replace_candidates, set_accuracy_level
from .passes.fused_gemm import weight_matrix

REPORT_KEY = "rbe.report"
GPTQ_DAMP = 0.01
TIED_DAMP = 0.1  # measured on ref-gpt2 3-bit/256: 0.1 -> KL 0.0147, 1.0 -> 0.0158, 10 -> 0.0244
MAX_OUTLIER_FRACTION = 0.1  # 2.4 bits/weight of outliers: past that, wider codes are cheaper
SENSITIVITY_TOKENS = 512  # calibration tokens each --target-bpw sensitivity probe runs the model on
# An encoder's distortion is one cosine per paragraph (allocation.OutputDistortion): 512 tokens would be about
# five paragraphs, so encoders get more.
ENCODER_SENSITIVITY_TOKENS = 4096


class NothingToRewrite(ValueError):
    """The model has no MatMul/Gemm node the rule accepts."""


@dataclass
class ReportRow:
    node: str
    op_type: str
    weight: str
    shape: str          # "K x N"
    status: str         # "rbe" or the reason it was skipped
    bits: int = 0
    block_size: int = 0
    bits_per_weight: float = 32.0
    bytes_before: int = 0
    bytes_after: int = 0
    rel_rmse: float = 0.0
    rotation: int = 0   # R of the input rotation (FORMAT.md §5.3), 0 for none
    coding: str = ""    # "rice" for a Rice-coded table (FORMAT.md §5.4; bits and block_size then 0)


def _row(c: Candidate, w: RBEWeight | RiceTable | None, rel_rmse: float, shared: bool) -> ReportRow:
    K, N = c.shape
    row = ReportRow(node=c.node.name, op_type=c.node.op_type, weight=c.weight_name,
                    shape=f"{K} x {N}" if K else "-", status=c.skip_reason or "rbe",
                    bytes_before=4 * K * N, bytes_after=4 * K * N)
    if w is not None:
        # A weight shared by several nodes is stored once: the first node carries its bytes.
        row.bits_per_weight = round(w.bits_per_weight, 4)
        if isinstance(w, RiceTable):
            row.coding = "rice"
        else:
            row.bits, row.block_size, row.rotation = w.bits, w.block_size, w.rotation
        row.bytes_before = 0 if shared else 4 * K * N
        row.bytes_after = 0 if shared else w.nbytes
        row.rel_rmse = rel_rmse
    return row


def _group_identical(model: onnx.ModelProto, eligible: list[Candidate]) -> list[list[Candidate]]:
    """Candidates grouped by weight *content*: a tied lm_head (its own initializer holding wteᵀ) lands in one
    group with the token-embedding Gather, so the table is encoded and stored once."""
    groups: dict[tuple, list[Candidate]] = {}
    by_key: dict[tuple[str, bool], tuple] = {}
    for c in eligible:
        if c.key not in by_key:
            W = weight_matrix(model, c)
            by_key[c.key] = (W.shape, hashlib.sha256(W.tobytes()).hexdigest())
        groups.setdefault(by_key[c.key], []).append(c)
    return list(groups.values())


def encode_weight(W: np.ndarray, bits: int, block_size: int, H: np.ndarray | None = None, damp: float = GPTQ_DAMP,
                  center: bool = True, outlier_fraction: float = 0.0,
                  center_fits: dict[int, tuple] | None = None, rotation: Rotation | None = None) -> RBEWeight:
    """One weight's encoding: with a center vector (FORMAT.md §5.1) where it removes enough of the weight's
    energy and `center` allows it, error-feedback rounding where a Hessian is given, nearest level otherwise,
    and about `outlier_fraction` of the weights kept exactly (§5.2). center_fits: fit_center(W, ·) results by
    block size already computed (the allocation's, of the rotated weight with a rotation), used instead of
    fitting again. rotation: code Qᵀ·W against Qᵀ·H·Q instead (§5.3); everything else applies to that."""
    if rotation is not None:
        rotation.check(W.shape[0])
        W = rotation.weight(W).astype(np.float32)
        H = None if H is None else rotation.hessian(H)
    w = _encode_as_stored(W, bits, block_size, H, damp, center, outlier_fraction, center_fits)
    if rotation is None:
        return w
    return dataclasses.replace(w, seeds=with_tag(w.seeds, TAG_ROTATED), rotation=rotation.block,
                               rotation_seed=rotation.seed)


def _encode_as_stored(W, bits, block_size, H, damp, center, outlier_fraction, center_fits) -> RBEWeight:
    fitted = None
    if center:
        known = (center_fits or {}).get(block_size)
        c, alpha, removed = known if known is not None else fit_center(W, block_size)
        if removed >= MIN_ENERGY_REMOVED:
            fitted = (c, alpha)
            W = W - center_term(c, alpha, W.shape[0], block_size)
    if outlier_fraction > 0 and H is None:
        # No input statistics: an identity Hessian makes error feedback plain rounding, row by row.
        H = np.eye(W.shape[0])
    w = encode(W, bits=bits, block_size=block_size) if H is None else \
        encode_gptq(W, H, bits=bits, block_size=block_size, damp=damp, outlier_fraction=outlier_fraction)
    return with_center(w, *fitted) if fitted else w


def rewrite_model(model: onnx.ModelProto, *, bits: int = 4, block_size: int = 64, exclude: str | None = None,
                  embeddings: bool = True, progress: bool = True, calibration_dir: Path | None = None,
                  calibration_tokens: int = CALIBRATION_TOKENS, target_bpw: float | None = None,
                  center: bool = True, accuracy_level: int = 0, distill_steps: int = 0,
                  outlier_fraction: float = 0.0, split_vocab: bool = True, rotate: bool = False,
                  rice_tables: bool = True) -> list[ReportRow]:
    """Rewrites `model` in place; returns one report row per MatMul/Gemm/Gather node.

    embeddings: also turn Gathers over constant tables (token/position embeddings) into RBEGather.
    With `calibration_dir` (the exported model's folder), codes are rounded with error feedback against
    activations of WikiText-2 valid (GPTQ-style) instead of to the nearest level.
    target_bpw: instead of one `bits`/`block_size` for all, each weight gets the setting a measured-sensitivity
    budget gives it (rbe_onnx.allocation), so that the rewritten weights average `target_bpw` bits per weight
    (seeds, centers and codes counted); needs `calibration_dir`.
    center: let weights that share a strong common direction carry a center vector (FORMAT.md §5.1).
    accuracy_level: the RBEFusedGemm attribute (FORMAT.md §2.1); 4 = int8 activations, the fast path.
    distill_steps: after encoding, fine-tune scales, center coefficients and LayerNorms against the fp32 model
    for this many steps (rbe_onnx.distill; GPT-2 or BERT, needs `calibration_dir`).
    outlier_fraction: keep about this fraction of every weight's values exactly (FORMAT.md §5.2, 24 bits
    each); with `target_bpw` their bits come out of the budget.
    split_vocab: with `target_bpw`, split token tables into their frequent and rare rows first
    (passes/split_vocab.py), each table then getting its own setting; the row mask is counted.
    rotate: code each MatMul/Gemm weight after an input rotation (FORMAT.md §5.3; not a table that is also
    gathered, whose rows are read as stored).
    rice_tables: with `target_bpw`, Rice-code the tables that are only gathered (FORMAT.md §5.4: an entropy
    code, the same error in fewer bits than fixed-width codes); without, they get fixed-width codes."""
    if accuracy_level not in range(5):
        raise ValueError(f"accuracy_level must be 0 to 4, got {accuracy_level}")
    if not 0.0 <= outlier_fraction <= MAX_OUTLIER_FRACTION:
        raise ValueError(f"outlier fraction must be in [0, {MAX_OUTLIER_FRACTION}], got {outlier_fraction}")
    if calibration_dir is not None and not calibration_tokens > 0:
        raise ValueError(f"--calib-tokens must be a positive number of tokens, got {calibration_tokens}")
    if target_bpw is not None and calibration_dir is None:
        raise ValueError("--target-bpw measures each weight's sensitivity on calibration data: it needs "
                         "--calibrate (a model exported by `rbe-onnx export`)")
    batches = []  # --target-bpw's sensitivity text
    if target_bpw is not None:
        from .calibration import calibration_batches

        is_lm = bool(model.graph.output) and model.graph.output[0].name == "logits"
        batches = calibration_batches(Path(calibration_dir),
                                      tokens=SENSITIVITY_TOKENS if is_lm else ENCODER_SENSITIVITY_TOKENS)
    splits = []
    if target_bpw is not None and embeddings and split_vocab:
        # Frequent and rare rows of a token table in two tables, so the budget can code them differently.
        from .calibration import token_counts
        from .passes.split_vocab import split_vocab_tables

        # The rows are chosen without the text the sensitivities are measured on, so that text reads the rare
        # rows as often as unseen text does. Counted with it, it had 94.7 % of its tokens in the frequent rows,
        # where WikiText-2 test paragraphs have 88.7 %, and the allocation left MiniLM's rare rows at 2 bits
        # even at 4.5 bits/weight (BENCHMARKS.md, session 12).
        splits = split_vocab_tables(model, token_counts(Path(calibration_dir), skip=batches), exclude=exclude)
    candidates = find_candidates(model, exclude, embeddings=embeddings)
    eligible = [c for c in candidates if c.eligible]
    if not [c for c in eligible if c.node.op_type != "Gather"]:
        reasons = "; ".join(f"{c.node.name or c.node.op_type}: {c.skip_reason}" for c in candidates) or \
            "the graph has no MatMul or Gemm node"
        raise NothingToRewrite(f"no MatMul/Gemm node with a constant 2-D float weight to rewrite ({reasons})")
    groups = _group_identical(model, eligible)
    if distill_steps and calibration_dir is None:
        raise ValueError("--distill trains on calibration data: it needs --calibrate (a model exported by "
                         "`rbe-onnx export`)")
    if distill_steps:
        from .distill import check_supported

        check_supported(Path(calibration_dir))
    hessians = {}
    if calibration_dir is not None:
        from .calibration import activation_hessians

        inputs = sorted({c.node.input[0] for g in groups for c in g if c.node.op_type != "Gather"})
        hessians = activation_hessians(model, Path(calibration_dir), inputs, tokens=calibration_tokens,
                                       progress=progress)
    # A Gather has no activation statistics; a tied matrix takes its MatMul's (the lm_head's).
    group_h = [next((hessians[c.node.input[0]] for c in g if c.node.input[0] in hessians), None) for g in groups]
    rotations = [_rotation_for(g) if rotate else None for g in groups]
    # A table only gathered is read an entry at a time: a variable-length code costs nothing there.
    rice = [rice_tables and target_bpw is not None and _rice_codable(g) for g in groups]
    settings = [(bits, block_size)] * len(groups)
    center_fits: list[dict[int, tuple] | None] = [None] * len(groups)
    if target_bpw is not None:
        from .allocation import plan_settings

        split_mask_bits = 8 * sum(s.rows for s in splits)  # one byte per row of a split table, in the budget
        sizes = [g[0].shape[0] * g[0].shape[1] for g in groups]
        outlier_bits = BITS_PER_OUTLIER * outlier_fraction * sum(n for n, r in zip(sizes, rice) if not r)
        code_bpw = target_bpw - (outlier_bits + split_mask_bits) / sum(sizes)  # Rice tables keep no outliers
        if code_bpw <= 0:
            raise ValueError(f"--target-bpw {target_bpw} leaves nothing for the codes after outliers of "
                             f"{BITS_PER_OUTLIER * outlier_fraction:.3g} bits/weight")
        settings, center_fits = plan_settings(model, groups, group_h, batches, code_bpw, center=center,
                                              progress=progress, rotations=rotations, rice=rice)
    encoded: dict[tuple[str, bool], RBEWeight] = {}
    errors: dict[tuple[str, bool], float] = {}
    for group, H, (g_bits, g_bs), fits, rot, as_rice in tqdm(
            list(zip(groups, group_h, settings, center_fits, rotations, rice)), desc="encoding", unit="weight",
            disable=not progress):
        W = weight_matrix(model, group[0])
        if as_rice:  # the setting is (allocation.RICE, step level)
            w = rice_encode(W, ladder_step(W, g_bs))
        else:
            # A table that is also gathered is read row by row, where every weight's own error shows: pull the
            # error feedback towards plain rounding with a strong identity term (dampening) for it.
            tied = any(c.node.op_type == "Gather" for c in group)
            w = encode_weight(W, g_bits, g_bs, H, damp=TIED_DAMP if tied else GPTQ_DAMP, center=center,
                              outlier_fraction=outlier_fraction, center_fits=fits, rotation=rot)
        err = float(np.linalg.norm(decode(w) - W) / max(np.linalg.norm(W), 1e-30))
        for c in group:
            encoded[c.key], errors[c.key] = w, err
    if distill_steps:
        _distill(model, Path(calibration_dir), eligible, encoded, errors, distill_steps, progress)
    stored: set[int] = set()
    rows = []
    for c in candidates:
        w = encoded.get(c.key) if c.eligible else None
        rows.append(_row(c, w, errors.get(c.key, 0.0), shared=w is not None and id(w) in stored))
        if w is not None:
            stored.add(id(w))
        for s in splits:  # the split's row mask is stored with its cold table
            if c.weight_name == s.cold and w is not None:
                rows[-1].bytes_after += s.rows
    replace_candidates(model, encoded, candidates)
    set_accuracy_level(model, accuracy_level)
    _set_metadata(model, REPORT_KEY, json.dumps([asdict(r) for r in rows]))
    return rows


def _rice_codable(group: list[Candidate]) -> bool:
    """Whether a weight group can be a Rice-coded table (FORMAT.md §5.4): read by Gathers alone, K within
    bounds. Any such table is codable at the ladder's coarsest step, since one value among n is at most √n
    times the RMS (√(16384 · 2^24) ≈ 5.2e5, under the 2.4 · 245504 that step allows); the allocation offers
    only the finer steps that code it (codec.rice.encodable)."""
    return all(c.node.op_type == "Gather" for c in group) and group[0].shape[0] <= RICE_MAX_K


def _rotation_for(group: list[Candidate]) -> Rotation | None:
    """The input rotation of a weight group: blocks of the largest power of two ≤ DEFAULT_MAX_BLOCK dividing K,
    a seed from the weight's name; none for a table that is gathered or a K with no such divisor."""
    if any(c.node.op_type == "Gather" for c in group):
        return None
    block = block_for(group[0].shape[0], DEFAULT_MAX_BLOCK)
    return Rotation(block, seed_for(group[0].weight_name)) if block else None


def _distill(model: onnx.ModelProto, model_dir: Path, eligible: list[Candidate], encoded: dict, errors: dict,
             steps: int, progress: bool) -> None:
    """Runs rbe_onnx.distill and swaps the tuned encodings in, keeping shared weights shared."""
    from .distill import distill

    tuned = distill(model, model_dir, {c.weight_name: (encoded[c.key], c.transpose) for c in eligible}, steps,
                    progress=progress)
    by_old = {id(encoded[c.key]): tuned[c.weight_name] for c in eligible if c.weight_name in tuned}
    for c in eligible:
        old = encoded[c.key]
        if id(old) in by_old:
            encoded[c.key] = by_old[id(old)]
            W = weight_matrix(model, c)
            errors[c.key] = float(np.linalg.norm(decode(encoded[c.key]) - W) / max(np.linalg.norm(W), 1e-30))


def _set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def rewrite(model_or_path: onnx.ModelProto | str | os.PathLike, output_path: str | os.PathLike | None = None, *,
            bits: int = 4, block_size: int = 64, exclude: str | None = None, embeddings: bool = True,
            progress: bool = True, calibrate: bool = False, calibration_tokens: int = CALIBRATION_TOKENS,
            target_bpw: float | None = None, center: bool = True, accuracy_level: int = 0,
            distill_steps: int = 0, outlier_fraction: float = 0.0,
            split_vocab: bool = True, rotate: bool = False,
            rice_tables: bool = True) -> tuple[onnx.ModelProto, list[ReportRow]]:
    """Loads (if given a path), rewrites and (if output_path is given) saves with aligned external data.

    calibrate: error-feedback rounding from WikiText-2 valid activations; needs a path to a model exported
    by `rbe-onnx export` (its folder holds the tokenizer and rbe_export.json). target_bpw (needs calibrate):
    per-weight settings by measured sensitivity, see rewrite_model."""
    if calibrate and isinstance(model_or_path, onnx.ModelProto):
        raise ValueError("calibrate=True needs the exported model's path (its folder holds the tokenizer)")
    model = load_model(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    rows = rewrite_model(model, bits=bits, block_size=block_size, exclude=exclude, embeddings=embeddings,
                         progress=progress,
                         calibration_dir=Path(model_or_path).parent if calibrate else None,
                         calibration_tokens=calibration_tokens, target_bpw=target_bpw, center=center,
                         accuracy_level=accuracy_level, distill_steps=distill_steps,
                         outlier_fraction=outlier_fraction, split_vocab=split_vocab, rotate=rotate,
                         rice_tables=rice_tables)
    if output_path is not None:
        save_model(model, output_path)
        if not isinstance(model_or_path, onnx.ModelProto):
            copy_sidecar_files(Path(model_or_path).parent, Path(output_path).parent)
    return model, rows


def copy_sidecar_files(src_dir: Path, dst_dir: Path) -> None:
    """Tokenizer, config and export metadata travel with the model, so the output dir runs on its own."""
    if src_dir.resolve() == dst_dir.resolve():
        return
    for f in src_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and not (dst_dir / f.name).exists():
            shutil.copy2(f, dst_dir / f.name)
    # onnxruntime-genai loads custom ops only from inside the model folder: a folder set up for it (its
    # genai_config.json names a relative library, see export/genai_config.py) gets the installed op library.
    if (dst_dir / "genai_config.json").is_file():
        from .api import bundle_library

        bundle_library(dst_dir)


def read_report(model_or_path: onnx.ModelProto | str | os.PathLike) -> list[ReportRow]:
    """The rewrite report stored in a rewritten model, checked against the nodes actually in it."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else \
        load_model(model_or_path, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if REPORT_KEY not in meta:
        raise ValueError("model carries no rbe-onnx rewrite report (was it rewritten by rbe-onnx?)")
    rows = [ReportRow(**r) for r in json.loads(meta[REPORT_KEY])]
    present = {n.name: n.op_type for n in model.graph.node}
    for r in rows:
        op = present.get(r.node)
        expected = "RBEGather" if r.op_type == "Gather" else "RBEFusedGemm"
        if r.status == "rbe" and op != expected:
            raise ValueError(f"report says node {r.node!r} is {expected} but the graph has {op}")
    return rows


def totals(rows: list[ReportRow]) -> dict:
    """Whole-model figures over the rewritten weights: bytes and bits/weight (seeds + codes + scale0)."""
    done = [r for r in rows if r.status == "rbe"]
    before = sum(r.bytes_before for r in done)
    after = sum(r.bytes_after for r in done)
    weights = before // 4
    return {"rewritten": len(done), "skipped": len(rows) - len(done), "bytes_before": before,
            "bytes_after": after, "bits_per_weight": 8.0 * after / weights if weights else 0.0}
