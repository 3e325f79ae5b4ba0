"""`--distill N`: after encoding, fine-tune what stays continuous against the fp32 model (design ch. 8.4).

The codes are fixed; what moves is each block's scale (the seed's rho, through log d), each block's center
coefficient (the seed's alpha, where the weight has a center), and the LayerNorm gains and biases. The loss is
KL(fp32 || compressed) of the next-token distributions on WikiText-2 valid windows (the calibration split), with
the fp32 model as teacher. The results are written back in the format's own precision: rho rounded to its
0.2 % steps, alpha to binary16.

GPT-2 exports only (the torch model is rebuilt from the export's config.json and the ONNX initializers).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .codec.decode import level_tables
from .codec.packing import unpack_codes
from .codec.seed import RHO_PER_LOG_SCALE, alpha_bits, scales_from_rho, unpack_seeds
from .codec.weight import RBEWeight

LEARNING_RATE = 2e-3
BATCH_WINDOWS = 4


def _parts(w: RBEWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log d [N, nb], level values L[c]+o as [N, nb, bs], alpha [N, nb]) of an encoded weight."""
    f = unpack_seeds(w.seeds)
    nb = w.blocks_per_column
    codes = unpack_codes(w.codes.reshape(-1, w.block_bytes), w.bits).astype(np.intp)
    L = level_tables(w.bits)[f["theta"].reshape(-1)]
    vals = np.take_along_axis(L, codes, axis=1).astype(np.float32) + f["offset"].reshape(-1, 1)
    d = scales_from_rho(f["rho"], w.scale0).astype(np.float64)
    return np.log(d), vals.reshape(w.N, nb, w.block_size), f["alpha"].astype(np.float32)


def _write_back(w: RBEWeight, log_d: np.ndarray, alpha: np.ndarray) -> RBEWeight:
    rho = np.clip(np.rint(RHO_PER_LOG_SCALE * (log_d - np.log(w.scale0))), 0, 0xFFFF).astype(np.uint64)
    u = w.seeds.view(np.uint64)
    u = (u & ~np.uint64(0xFFFF)) | rho
    if w.center is not None:
        u = (u & ~(np.uint64(0xFFFF) << np.uint64(40))) | (alpha_bits(alpha.astype(np.float16)) << np.uint64(40))
    return dataclasses.replace(w, seeds=u.view(np.int64))


def check_supported(model_dir: Path) -> None:
    """Raises before any encoding work if `model_dir` is not a GPT-2 export."""
    path = Path(model_dir) / "rbe_export.json"
    kind = json.loads(path.read_text()).get("model_type") if path.is_file() else None
    if kind != "gpt2":
        raise ValueError(f"--distill supports GPT-2 exports (it needs the language-model logits as its target); "
                         f"{model_dir} holds {kind or 'no rbe-onnx export'}")


def distill(model: onnx.ModelProto, model_dir: Path, weights: dict[str, tuple[RBEWeight, bool]], steps: int,
            progress: bool = True) -> dict[str, RBEWeight]:
    """Fine-tunes scales, alphas and LayerNorm parameters for `steps` steps.

    weights: ONNX initializer name -> (its encoding, whether the initializer holds Wᵀ). Returns the updated
    encodings by the same names and writes the tuned LayerNorm parameters into `model`'s initializers.
    """
    import torch
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    from .calibration import calibration_batches

    check_supported(model_dir)
    config = GPT2Config.from_pretrained(model_dir, local_files_only=True)
    teacher = GPT2LMHeadModel(config).eval()
    init = {t.name: t for t in model.graph.initializer}
    state = teacher.state_dict()
    loaded = set()
    for key in state:
        name = key.removeprefix("transformer.")
        if name in init:
            state[key] = torch.from_numpy(numpy_helper.to_array(init[name]).copy())
            loaded.add(key)
    missing = [k for k in state if k not in loaded and not k.endswith(".attn.bias") and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"--distill cannot map the ONNX initializers onto GPT-2 parameters (missing: {missing[:5]})")
    teacher.load_state_dict(state)
    for p in teacher.parameters():
        p.requires_grad_(False)

    # The student: the teacher's modules with the encoded weights computed from trainable scales and alphas.
    params = dict(teacher.named_parameters())
    trainable, rebuild = [], {}
    for name, (w, transposed) in weights.items():
        key = "transformer." + name
        if key not in params:
            continue  # the lm_head's own copy of the tied table: torch ties it to wte already
        log_d, vals, alpha = _parts(w)
        t_log_d = torch.tensor(log_d, requires_grad=True)
        t_alpha = torch.tensor(alpha, requires_grad=w.center is not None)
        trainable += [t_log_d] + ([t_alpha] if w.center is not None else [])
        center = torch.zeros(w.blocks_per_column * w.block_size)
        if w.center is not None:
            center[: w.K] = torch.from_numpy(w.center)
        rebuild[key] = (w, transposed, t_log_d, torch.from_numpy(vals), t_alpha,
                        center.reshape(w.blocks_per_column, w.block_size))
    ln = {k: p.detach().clone().requires_grad_(True) for k, p in params.items() if ".ln_" in k or "ln_f" in k}
    trainable += list(ln.values())

    def student_params() -> dict:
        out = dict(ln)
        for key, (w, transposed, log_d, vals, alpha, center) in rebuild.items():
            cols = torch.exp(log_d)[..., None] * vals + alpha[..., None] * center   # [N, nb, bs]
            W = cols.reshape(w.N, -1)[:, : w.K].T                                     # K x N
            out[key] = (W.T if transposed else W).float()
        return out

    batches = [f["input_ids"] for f, _ in calibration_batches(model_dir, tokens=steps * BATCH_WINDOWS * 256,
                                                              batch=BATCH_WINDOWS)]
    opt = torch.optim.Adam(trainable, lr=LEARNING_RATE)
    func = torch.func.functional_call
    bar = tqdm(range(steps), desc="distilling", unit="step", disable=not progress)
    for step in bar:
        ids = torch.from_numpy(batches[step % len(batches)])
        with torch.no_grad():
            target = torch.log_softmax(teacher(ids).logits.float(), -1)
        logits = func(teacher, student_params(), (ids,)).logits
        loss = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1), target, log_target=True,
                                          reduction="batchmean") / ids.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(kl=f"{loss.item():.5f}")
    out = {}
    for key, (w, _, log_d, _, alpha, _) in rebuild.items():
        out[key.removeprefix("transformer.")] = _write_back(w, log_d.detach().numpy(), alpha.detach().numpy())
    for key, p in ln.items():
        name = key.removeprefix("transformer.")
        if name in init:
            init[name].CopyFrom(numpy_helper.from_array(p.detach().numpy().astype(np.float32), name))
    return out
