"""`--target-bpw`: a code width and block size per weight, chosen by measured sensitivity (design ch. 6.7.2's
precision budget), so that the whole model lands at a given number of bits per weight.

Each weight's effect on the model output is measured once, end to end, on WikiText-2 valid: coding noise shaped
like round-to-nearest error (uniform within each block's quantization step, at PROBE) is put into that weight
alone and the output distortion against the fp32 model is recorded (next-token KL for a model with `logits`,
1 − cosine of the mean-pooled first output otherwise: OutputDistortion). How the error grows or shrinks with
each (bits, block_size) of LADDER is measured on a sample of the weight's columns with the real encoder; the
predicted distortion of a setting is the probe's, scaled by that error ratio (first-order: small errors add up
independently across weights and grow with their energy). A greedy knapsack then upgrades the weights with the
best distortion saved per byte until the budget is spent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .codec import decode, encode
from .library import get_library_path
from .codec.rice import STEP_LADDER, encodable, ladder_step, rice_decode, rice_encode
from .codec.gptq import _inverse_cholesky, encode_gptq
from .codec.center import center_term, fit_center, MIN_ENERGY_REMOVED

# 5 and 6 bits fill the gap between 4 bits/64 (5.0 bits/weight) and 8 bits/64 (9.0): on MiniLM at --target-bpw
# 4.5 they took 1 − cosine on held-out WikiText-2 valid paragraphs from 0.0046 to 0.0028 (BENCHMARKS.md,
# session 25).
LADDER = ((2, 128), (3, 256), (3, 128), (3, 64), (4, 128), (4, 64), (5, 128), (5, 64), (6, 128), (6, 64), (8, 64))
# A Rice-coded table's setting (FORMAT.md §5.4) is (RICE, i): its step is STEP_LADDER[i] times the table's RMS.
RICE = 0
PROBE = (3, 128)
SAMPLE_WEIGHTS = 1 << 17  # the error ratios of the settings are measured on about this many of a weight's values


@dataclass
class Choice:
    """The setting of one weight group and what the allocation knew about it."""

    bits: int
    block_size: int
    use_center: bool
    options: list[tuple[int, int, int, float]] = field(default_factory=list)  # (bits, bs, bytes, distortion)
    # bits = RICE: a Rice-coded table, block_size then the index into STEP_LADDER
    probe_distortion: float = 0.0


def stored_bytes(K: int, N: int, bits: int, block_size: int, center: bool) -> int:
    nb = -(-K // block_size)
    return N * nb * (block_size * bits // 8 + 8) + 4 + (4 * K if center else 0)


class CenterFits:
    """fit_center of one weight per block size, each computed once: the probe, the error ratios and the
    center decision all ask for the PROBE block size (seconds per call on a 768 x 50257 table)."""

    def __init__(self, W: np.ndarray):
        self.W = W
        self._fits: dict[int, tuple] = {}

    def __call__(self, block_size: int) -> tuple:
        if block_size not in self._fits:
            self._fits[block_size] = fit_center(self.W, block_size)
        return self._fits[block_size]

    def computed(self) -> dict[int, tuple]:
        """The fits made so far by block size (without the weight, which the caller may then drop)."""
        return dict(self._fits)


def _residual(W: np.ndarray, block_size: int, use_center: bool, cols: np.ndarray | None = None,
              fits: CenterFits | None = None) -> np.ndarray:
    """W (or its columns `cols`) less the center term the encoder would fit for this block size."""
    sub = W if cols is None else W[:, cols]
    if not use_center:
        return sub
    c, alpha, _ = (fits or CenterFits(W))(block_size)
    return sub - center_term(c, alpha if cols is None else alpha[cols], W.shape[0], block_size)


def _error_energy(delta: np.ndarray, H: np.ndarray | None) -> float:
    """‖X·Δ‖² for the calibration inputs X (H = XᵀX) where known, ‖Δ‖² otherwise (a gathered table)."""
    d = delta.astype(np.float64)
    return float(np.einsum("kn,kn->", d, H @ d)) if H is not None else float((d * d).sum())


def probe_noise(W: np.ndarray, bits: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise within each block's round-to-nearest step (range / (2^bits − 1)), the error a plain
    rounding of W would make, without the cost of encoding W."""
    K, N = W.shape
    nb = -(-K // block_size)
    pad = np.zeros((nb * block_size, N), np.float32)
    pad[:K] = W
    blocks = pad.reshape(nb, block_size, N)
    step = (blocks.max(axis=1) - blocks.min(axis=1)) / (2 ** bits - 1)           # [nb, N]
    noise = rng.uniform(-0.5, 0.5, size=blocks.shape).astype(np.float32) * step[:, None, :]
    return noise.reshape(nb * block_size, N)[:K]


def error_ratios(W: np.ndarray, H: np.ndarray | None, noise: np.ndarray, use_center: bool,
                 rng: np.random.Generator, fits: CenterFits | None = None,
                 damp: float = 0.01) -> dict[tuple[int, int], float]:
    """Coding error of each LADDER setting over the probe noise's, in the same measure, on sampled columns.

    The settings are encoded as the rewrite will encode them: with error feedback (GPTQ at `damp`, the
    encoder's default; a table tied to an LM head is encoded at TIED_DAMP but measured here at `damp`) where
    there is a Hessian. Plain rounding here overstated the projections' error against the
    tables' (which have no Hessian and are rounded plainly) by what error feedback saves, 2-3x in ‖X·Δ‖²,
    and so steered the budget away from the tables."""
    K, N = W.shape
    cols = np.sort(rng.choice(N, size=min(N, max(16, SAMPLE_WEIGHTS // K)), replace=False))
    base = _error_energy(noise[:, cols], H)
    U = _inverse_cholesky(H, damp) if H is not None else None
    out, residuals = {}, {}
    for bits, bs in LADDER:
        if bs not in residuals:
            residuals[bs] = _residual(W, bs, use_center, cols, fits)
        R = residuals[bs]
        coded = encode(R, bits=bits, block_size=bs) if H is None else \
            encode_gptq(R, H, bits=bits, block_size=bs, damp=damp, U=U)
        out[(bits, bs)] = _error_energy(decode(coded) - R, H) / max(base, 1e-300)
    return out


def rice_options(W: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int, int, float]]:
    """(RICE, level, bytes, error ratio) for each step of STEP_LADDER that can code the table W: bytes
    extrapolated from the streams of sampled columns (+ seeds, lengths, scale0), the error over the probe
    noise's on them."""
    K, N = W.shape
    cols = np.sort(rng.choice(N, size=min(N, max(16, SAMPLE_WEIGHTS // K)), replace=False))
    sub = W[:, cols]
    base = _error_energy(noise[:, cols], None)
    out = []
    for level in range(len(STEP_LADDER)):
        step = ladder_step(W, level)
        if not encodable(W, step):
            continue
        coded = rice_encode(sub, step)
        nbytes = int(round(coded.codes.size * N / len(cols))) + 10 * N + 4
        out.append((RICE, level, nbytes, _error_energy(rice_decode(coded) - sub, None) / max(base, 1e-300)))
    return out


def uses_center(W: np.ndarray, block_size: int, fits: CenterFits | None = None) -> bool:
    return (fits or CenterFits(W))(block_size)[2] >= MIN_ENERGY_REMOVED


def allocate(options: dict[object, Choice], budget_bytes: float) -> None:
    """Greedy knapsack over each group's (bytes, distortion) options: start every group at its smallest
    setting, then repeatedly take the upgrade with the most distortion saved per extra byte that still fits."""
    for ch in options.values():
        ch.options.sort(key=lambda o: o[2])
        ch.bits, ch.block_size = ch.options[0][0], ch.options[0][1]
    spent = sum(ch.options[0][2] for ch in options.values())
    if spent > budget_bytes:
        raise ValueError(f"target too small: the narrowest setting of every weight already takes "
                         f"{spent} bytes, over the budget of {budget_bytes:.0f}")
    current = {k: ch.options[0] for k, ch in options.items()}
    while True:
        best, best_gain = None, 0.0
        for k, ch in options.items():
            cur = current[k]
            for o in ch.options:
                extra = o[2] - cur[2]
                if extra <= 0 or spent + extra > budget_bytes or o[3] >= cur[3]:
                    continue
                gain = (cur[3] - o[3]) / extra
                if gain > best_gain:
                    best, best_gain = (k, o), gain
        if best is None:
            break
        k, o = best
        spent += o[2] - current[k][2]
        current[k] = o
        options[k].bits, options[k].block_size = o[0], o[1]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class OutputDistortion:
    """Runs the fp32 model on calibration batches with chosen weights replaced, and measures how far its first
    output moves from the unmodified model's: next-token KL for `logits`; otherwise (an encoder's hidden
    states) 1 − cosine between the mean-pooled states of each sequence, the sentence embedding users take.

    Measured per token instead (relative squared error), the encoder's distortion ranked the weights
    differently from what the embeddings lose: on MiniLM, the token table coded alone at 2 bits cost 0.62
    of its predicted per-token error in 1 − cosine, the projections only about 0.22, so the budget went to the
    projections while the table held more than half of the loss."""

    def __init__(self, model: onnx.ModelProto, weight_names: list[str], batches: list[tuple[dict, np.ndarray]],
                 threads: int | None = None):
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        graph_inputs = {i.name for i in probe.graph.input}
        init = {t.name: t for t in probe.graph.initializer}
        for name in weight_names:  # an initializer listed as a graph input can be overridden by a feed
            if name not in graph_inputs:
                t = init[name]
                probe.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # overriding initializers on purpose: ORT's warning about it is noise here
        if threads:
            opts.intra_op_num_threads = threads
        opts.register_custom_ops_library(get_library_path())  # a split LM head merges its halves with RBEMergeColumns
        self.session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.output = self.session.get_outputs()[0].name
        self.is_logits = self.output == "logits"
        self.batches = batches
        self.reference = [self._run(feeds, {}) for feeds, _ in batches]
        if self.is_logits:
            self.reference = [_log_softmax(r) for r in self.reference]

    def _run(self, feeds: dict, weights: dict) -> np.ndarray:
        return self.session.run([self.output], {**feeds, **weights})[0]

    def __call__(self, weights: dict[str, np.ndarray]) -> float:
        total, count = 0.0, 0
        for (feeds, real), ref in zip(self.batches, self.reference):
            out = self._run(feeds, weights)
            mask = real.reshape(-1)
            r = ref.reshape(-1, ref.shape[-1])[mask]
            o = out.reshape(-1, out.shape[-1])[mask]
            if self.is_logits:  # float32 is plenty for a relative ranking, and halves the cost on 50k-way logits
                o = _log_softmax(o)
                total += float(np.einsum("ij,ij->", np.exp(r), r - o, dtype=np.float64))
                count += int(mask.sum())
            else:  # sums over each sequence's real tokens: the mean's cosine is the sum's
                keep = real[..., None].astype(np.float64)
                pr, po = (ref * keep).sum(-2), (out * keep).sum(-2)
                norms = np.linalg.norm(pr, axis=-1) * np.linalg.norm(po, axis=-1)
                total += float((1.0 - (pr * po).sum(-1) / np.maximum(norms, 1e-30)).sum())
                count += pr.shape[0]
        return total / max(count, 1)


def plan_settings(model: onnx.ModelProto, groups: list[list], hessians: list[np.ndarray | None],
                  batches: list[tuple[dict, np.ndarray]], target_bpw: float, center: bool = True,
                  progress: bool = True, seed: int = 0, rotations: list | None = None,
                  rice: list[bool] | None = None) -> tuple[list[tuple[int, int]], list[dict[int, tuple]]]:
    """(bits, block_size) for each group of candidates sharing one weight (compressor._group_identical), so
    that the encoded groups take at most `target_bpw` bits per weight in all; and per group the center fits
    (fit_center's result by block size) the measurements computed, for the encoder to reuse.

    rotations: per group the input rotation (codec.rotation.Rotation, FORMAT.md §5.3) it will be coded with,
    or None: its settings' error ratios are measured on the rotated weight against the rotated inputs, as it
    will be coded. rice: per group whether it is a table to Rice-code (FORMAT.md §5.4); its settings are then
    (RICE, level) ones only."""
    from tqdm import tqdm

    from .passes.fused_gemm import weight_matrix

    if not target_bpw > 0:
        raise ValueError(f"--target-bpw must be positive, got {target_bpw}")
    rng = np.random.default_rng(seed)
    names = [c.weight_name for g in groups for c in g]
    distortion = OutputDistortion(model, names, batches)
    choices: dict[int, Choice] = {}
    center_fits: list[dict[int, tuple]] = []
    weights = 0
    rotations = rotations or [None] * len(groups)
    rice = rice or [False] * len(groups)
    for i, (group, H, rot, as_rice) in enumerate(tqdm(list(zip(groups, hessians, rotations, rice)),
                                                       desc="sensitivity", unit="weight", disable=not progress)):
        W = weight_matrix(model, group[0])
        K, N = W.shape
        weights += K * N
        fits = CenterFits(W)
        use_c = center and uses_center(W, PROBE[1], fits)
        noise = probe_noise(_residual(W, PROBE[1], use_c, fits=fits), *PROBE, rng)
        noisy = W + noise
        probe = distortion({c.weight_name: np.ascontiguousarray(noisy.T if c.transpose else noisy)
                            for c in group})
        if rot is not None:
            # The probe stays in the model's coordinates (the same noise as without a rotation); the settings'
            # errors are those of the rotated coding, measured against that noise seen in the rotated
            # coordinates (‖XQ·Qᵀn‖ = ‖X·n‖). Noise drawn per block of Qᵀ·W instead spreads evenly over the
            # input channels, outlier ones included, and its much larger distortion on GPT-2 made the budget
            # go to the projections rather than the token table (ref-gpt2 --target-bpw 4.5: KL 0.0031
            # against 0.0011 unrotated).
            W, H, noise = rot.weight(W).astype(np.float32), None if H is None else rot.hessian(H), rot.weight(noise)
            fits = CenterFits(W)
            use_c = center and uses_center(W, PROBE[1], fits)
        if as_rice:
            options = [(b, level, nbytes, probe * ratio) for b, level, nbytes, ratio in rice_options(W, noise, rng)]
        else:
            ratios = error_ratios(W, H, noise, use_c, rng, fits)
            options = [(b, bs, stored_bytes(K, N, b, bs, use_c), probe * ratios[(b, bs)]) for b, bs in LADDER]
        choices[i] = Choice(bits=PROBE[0], block_size=PROBE[1], use_center=use_c, probe_distortion=probe,
                            options=options)
        center_fits.append(fits.computed())
    allocate(choices, target_bpw * weights / 8)
    return [(choices[i].bits, choices[i].block_size) for i in range(len(groups))], center_fits
