"""`--distill N`: after encoding, fine-tune what stays continuous against the fp32 model (design ch. 8.4).

The codes are fixed; what moves is each block's scale (the seed's rho, through log d), each block's center
coefficient (the seed's alpha, where the weight has a center), and the LayerNorm gains and biases. The fp32 model
is the teacher, on WikiText-2 valid (the calibration split):
- GPT-2: KL(fp32 || compressed) of the next-token distributions over windows of running text;
- BERT: the squared error of the last hidden states over the real tokens of paragraphs, relative to their
  energy (the sentence embedding that users pool is made of these states).
The results are written back in the format's own precision: rho rounded to its 0.2 % steps, alpha to binary16.
A token table split into frequent and rare rows (passes/split_vocab.py, GPT-2's tied one included) is held as
encoded: the student sees its two halves decoded and put back together, and trains the rest around them.

The torch model is rebuilt from the export's config.json and the ONNX initializers: GPT-2 as HF's
GPT2LMHeadModel, BERT as the export's own graph module (rbe_onnx.export.bert.BertEncoderGraph).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .codec.decode import decode, level_tables
from .codec.outliers import positions
from .codec.packing import unpack_codes
from .codec.seed import RHO_PER_LOG_SCALE, alpha_bits, scales_from_rho, unpack_seeds
from .codec.rice import RiceTable
from .codec.weight import RBEWeight
from .passes.split_vocab import assemble, recorded_splits

LEARNING_RATE = 2e-3   # GPT-2; BERT's hidden-state error climbed at this rate
BERT_LEARNING_RATE = 5e-4  # MiniLM 4b/128, 48 steps, cosine on valid paragraphs: 2e-3 0.9858, 5e-4 0.9887, 1e-4 0.9886
BATCH_WINDOWS = 4      # GPT-2: windows of 256 tokens per step
BATCH_PARAGRAPHS = 8   # BERT: paragraphs of at most 128 tokens per step
FAMILIES = ("gpt2", "bert")


def _parts(w: RBEWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log d [N, nb], level values L[c]+o as [N, nb, bs], alpha [N, nb]) of an encoded weight."""
    f = unpack_seeds(w.seeds)
    nb = w.blocks_per_column
    codes = unpack_codes(w.codes.reshape(-1, w.block_bytes), w.bits).astype(np.intp)
    L = level_tables(w.bits)[f["theta"].reshape(-1)]
    vals = np.take_along_axis(L, codes, axis=1).astype(np.float32) + f["offset"].reshape(-1, 1)
    d = scales_from_rho(f["rho"], w.scale0).astype(np.float64)
    return np.log(d), vals.reshape(w.N, nb, w.block_size), f["alpha"].astype(np.float32)


def _outlier_overlay(w: RBEWeight) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask, values) [N, nb, bs] of the exactly kept weights (FORMAT.md §5.2), or None: they stay as stored,
    whatever the trained scale of their block."""
    if w.outliers is None:
        return None
    blocks, rows, values = positions(unpack_seeds(w.seeds)["outliers"], w.outliers, w.K, w.block_size)
    mask = np.zeros((w.N * w.blocks_per_column, w.block_size), bool)
    vals = np.zeros(mask.shape, np.float32)
    mask[blocks, rows], vals[blocks, rows] = True, values
    shape = (w.N, w.blocks_per_column, w.block_size)
    return mask.reshape(shape), vals.reshape(shape)


def _rotation_factors(w: RBEWeight):
    """(B's R x R block, D's signs as a K x 1 column) as float64 tensors, or None without a rotation."""
    import torch

    if not w.rotation:
        return None
    from .codec.rotation import hadamard_matrix, signs

    B = torch.from_numpy(hadamard_matrix(w.rotation))
    return B, torch.from_numpy(signs(w.rotation_seed, w.K).astype(np.float64)[:, None])


def _student_parts(w: RBEWeight) -> tuple:
    """What _student_weight computes a weight from: log d (trainable), L[c] + o, α (trainable with a center),
    the center per block, the outliers' overlay and the rotation's factors (torch tensors or None)."""
    import torch

    log_d, vals, alpha = _parts(w)
    center = torch.zeros(w.blocks_per_column * w.block_size)
    if w.center is not None:
        center[: w.K] = torch.from_numpy(w.center)
    overlay = _outlier_overlay(w)
    return (torch.tensor(log_d, requires_grad=True), torch.from_numpy(vals),
            torch.tensor(alpha, requires_grad=w.center is not None),
            center.reshape(w.blocks_per_column, w.block_size),
            None if overlay is None else tuple(torch.from_numpy(x) for x in overlay), _rotation_factors(w))


def _student_weight(w: RBEWeight, log_d, vals, alpha, center, overlay, rot):
    """The K x N weight (torch, differentiable in log_d and alpha) that the encoding stands for, as decode
    computes it: d·(L[c] + o) per block, outliers in place, + α·c, then Q· with an input rotation."""
    import torch

    cols = torch.exp(log_d)[..., None] * vals                                    # [N, nb, bs]
    if overlay is not None:
        cols = torch.where(overlay[0], overlay[1], cols)
    cols = cols + alpha[..., None] * center
    W = cols.reshape(w.N, -1)[:, : w.K].T                                         # K x N
    if rot is not None:  # Q·W = D·B·W (FORMAT.md §5.3)
        B, sgn = rot
        W = (B @ W.reshape(w.K // w.rotation, w.rotation, w.N)).reshape(w.K, w.N) * sgn
    return W


def _write_back(w: RBEWeight, log_d: np.ndarray, alpha: np.ndarray) -> RBEWeight:
    rho = np.clip(np.rint(RHO_PER_LOG_SCALE * (log_d - np.log(w.scale0))), 0, 0xFFFF).astype(np.uint64)
    u = w.seeds.view(np.uint64)
    u = (u & ~np.uint64(0xFFFF)) | rho
    if w.center is not None:
        u = (u & ~(np.uint64(0xFFFF) << np.uint64(40))) | (alpha_bits(alpha.astype(np.float16)) << np.uint64(40))
    return dataclasses.replace(w, seeds=u.view(np.int64))


def check_supported(model_dir: Path) -> str:
    """The export's model family; raises before any encoding work if distillation cannot handle it."""
    path = Path(model_dir) / "rbe_export.json"
    kind = json.loads(path.read_text()).get("model_type") if path.is_file() else None
    if kind not in FAMILIES:
        raise ValueError(f"--distill supports GPT-2 and BERT exports (it needs the fp32 model's outputs as its "
                         f"target); {model_dir} holds {kind or 'no rbe-onnx export'}")
    return kind


@dataclasses.dataclass
class _Family:
    """What distillation needs to know of a model family: the teacher module, the prefix its parameter names
    carry over the ONNX initializer names, which parameters are LayerNorms, the training batches, and the loss
    of a student's output against the teacher's on a batch."""

    teacher: "torch.nn.Module"
    prefix: str
    is_layernorm: Callable[[str], bool]
    batches: list
    run: Callable  # (module, params or None, batch) -> output
    loss: Callable  # (student output, teacher output, batch) -> scalar tensor
    tunes: Callable[[str], bool] = lambda name: True  # whether an encoded weight's scales are trained
    learning_rate: float = LEARNING_RATE


def _gpt2(model_dir: Path, steps: int) -> _Family:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from .calibration import calibration_batches

    teacher = GPT2LMHeadModel(GPT2Config.from_pretrained(model_dir, local_files_only=True)).eval()
    batches = [torch.from_numpy(f["input_ids"]) for f, _ in
               calibration_batches(model_dir, tokens=steps * BATCH_WINDOWS * 256, batch=BATCH_WINDOWS)]

    def run(module, params, ids):
        out = module(ids) if params is None else torch.func.functional_call(module, params, (ids,))
        return torch.log_softmax(out.logits.float(), -1)

    def loss(student, teacher_out, ids):
        return torch.nn.functional.kl_div(student, teacher_out, log_target=True, reduction="batchmean") / ids.shape[1]

    return _Family(teacher, "transformer.", lambda k: ".ln_" in k or "ln_f" in k, batches, run, loss)


def _bert(model_dir: Path, steps: int) -> _Family:
    import torch
    from transformers import BertConfig, BertModel

    from .calibration import calibration_batches
    from .export.bert import BertEncoderGraph

    teacher = BertEncoderGraph(BertModel(BertConfig.from_pretrained(model_dir, local_files_only=True))).eval()
    batches = [(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"]),
                torch.from_numpy(f["token_type_ids"]), torch.from_numpy(real))
               for f, real in calibration_batches(model_dir, tokens=steps * BATCH_PARAGRAPHS * 100,
                                                  batch=BATCH_PARAGRAPHS)]

    def run(module, params, batch):
        inputs = batch[:3]
        return module(*inputs) if params is None else torch.func.functional_call(module, params, inputs)

    def loss(student, teacher_out, batch):
        real = batch[3]
        return ((student - teacher_out)[real] ** 2).sum() / (teacher_out[real] ** 2).sum()

    # The token tables stay as encoded: a paragraph reaches only its own rows, so a row's scales would be fitted
    # to the few contexts it appears in (or never moved), unlike GPT-2's table, which the tied logits train
    # densely.
    return _Family(teacher, "", lambda k: "_ln." in k, batches, run, loss,
                   tunes=lambda name: not name.startswith(("word.", "position.", "token_type.")),
                   learning_rate=BERT_LEARNING_RATE)


def distill(model: onnx.ModelProto, model_dir: Path, weights: dict[str, tuple[RBEWeight, bool]], steps: int,
            progress: bool = True) -> dict[str, RBEWeight]:
    """Fine-tunes scales, alphas and LayerNorm parameters for `steps` steps.

    weights: ONNX initializer name -> (its encoding, whether the initializer holds Wᵀ). Returns the updated
    encodings by the same names and writes the tuned LayerNorm parameters into `model`'s initializers.
    """
    import torch
    from tqdm import tqdm

    kind = check_supported(model_dir)
    fam = (_gpt2 if kind == "gpt2" else _bert)(Path(model_dir), steps)
    teacher = fam.teacher
    init = {t.name: t for t in model.graph.initializer}
    state = teacher.state_dict()
    # Token tables split into frequent and rare rows (passes/split_vocab.py): the model's parameter is the
    # whole table again, for the teacher in fp32 and for the student as its two encodings decode.
    splits = [s for s in recorded_splits(model) if s.hot in init and s.cold in init and s.mask in init]
    whole = {s.table: assemble(s, *(numpy_helper.to_array(init[n]) for n in (s.hot, s.cold, s.mask)))
             for s in splits}
    loaded = set()
    for key in state:
        name = key.removeprefix(fam.prefix)
        if name in init or name in whole:
            state[key] = torch.from_numpy(whole[name] if name in whole else numpy_helper.to_array(init[name]).copy())
            loaded.add(key)
    missing = [k for k in state if k not in loaded and not k.endswith(".attn.bias") and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"--distill cannot map the ONNX initializers onto the {kind} model's parameters "
                         f"(missing: {missing[:5]})")
    teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)

    # The student: the teacher's modules with the encoded weights computed from trainable scales and alphas.
    params = dict(teacher.named_parameters())
    trainable, rebuild, fixed = [], {}, {}

    def as_stored(name: str) -> np.ndarray:
        w, transposed = weights[name]
        W = decode(w)
        return np.ascontiguousarray(W.T if transposed else W)

    for s in splits:
        if s.hot in weights and s.cold in weights and fam.prefix + s.table in params:
            fixed[fam.prefix + s.table] = torch.from_numpy(
                assemble(s, as_stored(s.hot), as_stored(s.cold), numpy_helper.to_array(init[s.mask])))
    for name, (w, transposed) in weights.items():
        key = fam.prefix + name
        if key not in params:
            continue  # the lm_head's own copy of the tied table: torch ties it to wte already
        if not fam.tunes(name) or isinstance(w, RiceTable):  # the student still sees it as encoded (a Rice
            # table has no per-block scales to tune)
            fixed[key] = torch.from_numpy(as_stored(name))
            continue
        parts = _student_parts(w)
        trainable += [parts[0]] + ([parts[2]] if w.center is not None else [])
        rebuild[key] = (w, transposed, *parts)
    ln = {k: p.detach().clone().requires_grad_(True) for k, p in params.items() if fam.is_layernorm(k)}
    trainable += list(ln.values())

    def student_params() -> dict:
        out = {**fixed, **ln}
        for key, (w, transposed, *parts) in rebuild.items():
            W = _student_weight(w, *parts)
            out[key] = (W.T if transposed else W).float()
        return out

    opt = torch.optim.Adam(trainable, lr=fam.learning_rate)
    bar = tqdm(range(steps), desc="distilling", unit="step", disable=not progress)
    for step in bar:
        batch = fam.batches[step % len(fam.batches)]
        with torch.no_grad():
            target = fam.run(teacher, None, batch)
        loss = fam.loss(fam.run(teacher, student_params(), batch), target, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.5f}")
    out = {}
    for key, (w, _, log_d, _, alpha, _, _, _) in rebuild.items():
        out[key.removeprefix(fam.prefix)] = _write_back(w, log_d.detach().numpy(), alpha.detach().numpy())
    for key, p in ln.items():
        name = key.removeprefix(fam.prefix)
        if name in init:
            init[name].CopyFrom(numpy_helper.from_array(p.detach().numpy().astype(np.float32), name))
    return out
