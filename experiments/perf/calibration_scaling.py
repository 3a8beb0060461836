"""Calibration cost vs model size (issue 16, item 5): time and peak memory per block of GPTQ, QuaRot and FlatQuant
on random LLaDA-architecture models, fitted over the width and projected to LLaDA-8B on one GPU.

    python experiments/perf/calibration_scaling.py                 # widths 256..1024 at depth 4; depths 4/8/16 at 512
    python experiments/perf/calibration_scaling.py --quick         # smoke run: 2 widths, depth 2, one FlatQuant step
    python experiments/perf/calibration_scaling.py --methods gptq --widths 256 512 --depths

Plan: every width at depth --base-depth, plus every --depths entry at width --depth-width (per-block cost should
not depend on the depth). Models: random LLaDA layout (RMSNorm, SwiGLU, RoPE, bidirectional attention, no GQA),
head_dim --head-dim (128 as in LLaDA-8B), intermediate = --mlp-ratio x width (3 = 12288 / 4096 as in LLaDA-8B).
Calibration: --samples x --seq-len random token ids (timing does not depend on the ids). Quantizers: the
registry's build("quantizer", cfg) on the composed method=<gptq|quarot|flatquant> configs at their W4A4 defaults,
FlatQuant with --epochs (default 1; its config's 15 is used for the projection). Each (method, width, depth) runs
in a fresh subprocess, so the peak RSS (VmHWM, procmem.peak_rss_mb) is that configuration's; --threads 1 by default.

Printed: one row per configuration (block parameters, s_block = median wall seconds per block from the engine's
report, cpu_s_block = process CPU seconds of the whole calibration / depth, peak RSS, peak - RSS before calibrating,
the calibration FLOP estimate of one block and the GFLOP/s it implies at cpu_s_block); per method least-squares fits
log(s/block) = log a + b log(width) of both times and of the memory overhead (b and R^2). CPU time is what the
projection uses: on a shared machine it is far less inflated by the other jobs than wall time. Then the
LLaDA-8B projection (DESIGN 5: d_model 4096, 32 layers, 32 heads, MLP 12288) at the paper's calibration size
(128 x 2048, DESIGN 4.6): per-block time by the fit and by the FLOP ratio, x 32 blocks, converted to one GPU by
the stated throughput assumption, and memory = one block's weights + the calibration activations + method state.
The FLOP estimate counts matmuls only (2 per multiply-add): forward passes of the block over the calibration set
(GPTQ 3: FP capture, quantized error, weight-only propagation; QuaRot 6: true-sequential adds 3 capture passes;
FlatQuant 3 + 3 x epochs: capture, MSE at init, forward + backward per epoch, quantized error), Hessians
2 T cols^2 per distinct linear input, the GPTQ solve rows cols^2 per linear plus cols^3 per Hessian. Element-wise
work (fake quantization, norms, softmax) is not counted, which is why the small widths show lower GFLOP/s.
The GPTQ and QuaRot pass counts are upper bounds since the engine stops forwards that only feed Hessians at the
last collected linear's input: QuaRot's three capture passes are partial, and GPTQ's default block_error=false
drops the quantized-error pass and the FP pass's down projection (about 1.7 full passes at W4A4).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from procmem import peak_rss_mb, rss_mb

METHODS = ("gptq", "quarot", "flatquant")
# full forward passes of one block per method at W4A4, an upper bound (see the module docstring)
FORWARD_PASSES = {"gptq": 3, "quarot": 6}
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one LLaDA block that calibration cost depends on."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every block linear."""
        d, mid = self.d_model, self.intermediate
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q),
                "gate": (mid, d), "up": (mid, d), "down": (d, mid)}

    @property
    def hessian_columns(self) -> tuple[int, ...]:
        """Columns of each distinct GPTQ Hessian: q/k/v share the attention input, gate/up the MLP input."""
        shapes = self.linear_shapes
        return shapes["q"][1], shapes["o"][1], shapes["gate"][1], shapes["down"][1]

    @property
    def params(self) -> int:
        """Linear weights plus the two RMSNorm weights (no biases in LLaDA)."""
        return sum(r * c for r, c in self.linear_shapes.values()) + 2 * self.d_model


# LLaDA-8B (DESIGN 5 / its config.json): d_model 4096, 32 layers, 32 heads (no GQA), MLP hidden 12288
LLADA_8B = BlockShape(d_model=4096, n_heads=32, n_kv_heads=32, intermediate=12288)
LLADA_8B_LAYERS = 32


def forward_flops(shape: BlockShape, n_samples: int, seq_len: int) -> float:
    """Matmul FLOPs of one block forward over n_samples x seq_len tokens: 2 per weight per token for the linears,
    4 L (n_heads head_dim) per token for Q K^T and P V (bidirectional: every token attends to all L)."""
    tokens = n_samples * seq_len
    linear = sum(r * c for r, c in shape.linear_shapes.values())
    attention = 4 * seq_len * shape.n_heads * shape.head_dim
    return float(tokens) * (2 * linear + attention)


def calibration_flops(method: str, shape: BlockShape, n_samples: int, seq_len: int, epochs: int = 1) -> float:
    """Estimated matmul FLOPs to calibrate one block with `method` at its W4A4 defaults (module docstring)."""
    fwd = forward_flops(shape, n_samples, seq_len)
    if method == "flatquant":
        return (3 + 3 * epochs) * fwd
    if method not in FORWARD_PASSES:
        raise ValueError(f"no FLOP model for method {method!r}; valid: {', '.join(METHODS)}")
    tokens = n_samples * seq_len
    hessians = 2.0 * tokens * sum(c * c for c in shape.hessian_columns)
    solve = sum(float(r) * c * c for r, c in shape.linear_shapes.values()) + sum(float(c) ** 3
                                                                              for c in shape.hessian_columns)
    return FORWARD_PASSES[method] * fwd + hessians + solve


def power_law_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least squares of log y = log a + b log x; returns (a, b, R^2 of the fit in log space)."""
    if len(x) != len(y) or len(set(x)) < 2:
        raise ValueError(f"a power-law fit needs at least two distinct x values, got x={list(x)}")
    if min(x) <= 0 or min(y) <= 0:
        raise ValueError(f"a power-law fit needs positive values, got x={list(x)}, y={list(y)}")
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    b = sum((a - mx) * (c - my) for a, c in zip(lx, ly, strict=True)) / sxx
    log_a = my - b * mx
    ss_res = sum((c - (log_a + b * a)) ** 2 for a, c in zip(lx, ly, strict=True))
    ss_tot = sum((c - my) ** 2 for c in ly)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return math.exp(log_a), b, r2


@dataclass(frozen=True)
class GPUAssumption:
    """The one-GPU throughput the projection converts FLOPs to seconds with (a stated assumption, not a measurement)."""

    name: str = "A100 (bf16 dense peak)"
    peak_tflops: float = 312.0
    utilisation: float = 0.4

    @property
    def sustained_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.utilisation


def project_time(method: str, fit: tuple[float, float], cpu_flops: float, measured: tuple[int, int, int],
                 paper: tuple[int, int, int], gpu: GPUAssumption, target: BlockShape = LLADA_8B,
                 n_layers: int = LLADA_8B_LAYERS) -> dict[str, float]:
    """Seconds to calibrate `target` with `method` on one GPU, two ways.

    fit:  s/block = a width^b (measured at `measured` = (n_samples, seq_len, epochs)), rescaled to `paper`'s
          (n_samples, seq_len, epochs) by the FLOP ratio at the target shape, then to the GPU by
          `cpu_flops` (FLOP/s measured on this CPU) / the GPU's sustained FLOP/s.
    flop: the FLOP estimate of the target block at `paper`'s size / the GPU's sustained FLOP/s.
    Both are times n_layers blocks (block-independent work such as QuaRot's rotation is not included).
    """
    a, b = fit
    flops_measured = calibration_flops(method, target, *measured)
    flops_paper = calibration_flops(method, target, *paper)
    cpu_block = a * target.d_model ** b * flops_paper / flops_measured
    gpu_fit_block = cpu_block * cpu_flops / gpu.sustained_flops
    gpu_flop_block = flops_paper / gpu.sustained_flops
    return {"flops_block": flops_paper, "cpu_fit_block_s": cpu_block, "gpu_fit_block_s": gpu_fit_block,
            "gpu_flop_block_s": gpu_flop_block, "gpu_fit_total_s": gpu_fit_block * n_layers,
            "gpu_flop_total_s": gpu_flop_block * n_layers}


@dataclass(frozen=True)
class SavedBytes:
    """Autograd bytes FlatQuant saves per training step, measured per unit: per (token x d_model) for activations,
    per (batch x n_heads x L^2) for attention scores, per block parameter for weight-shaped tensors."""

    per_token_width: float
    per_score: float
    per_param: float


def project_memory(method: str, n_samples: int, seq_len: int, act_bytes: int = 2, weight_bytes: int = 2,
                   batch_size: int = 4, flat_trainable: int = 0, saved: SavedBytes | None = None,
                   target: BlockShape = LLADA_8B) -> dict[str, float]:
    """Bytes of calibrating one `target` block: its weights, the engine's two calibration activation stores
    (block inputs and FP outputs, n_samples x seq_len x d_model x act_bytes each) and the method's state.

    GPTQ: fp32 Hessians of every distinct input at once (one pass per block); QuaRot (true-sequential): one group's
    at a time, the largest; both plus the solve's fp32 copies of the largest weight and its Hessian inverse.
    FlatQuant: the fp32 copy of the block it trains, trainable transforms and clipping factors x 4 fp32 tensors
    (parameter, gradient, AdamW's two moments) and, when measured, autograd's saved tensors of one training step.
    """
    d = target.d_model
    out: dict[str, float] = {"block_weights": float(target.params * weight_bytes),
                             "calib_activations": 2.0 * n_samples * seq_len * d * act_bytes}
    shapes = target.linear_shapes.values()
    workspace = 4.0 * max(r * c + c * c for r, c in shapes)
    if method == "gptq":
        out["hessians"] = 4.0 * sum(c * c for c in target.hessian_columns)
        out["solve_workspace"] = workspace
    elif method == "quarot":
        out["hessians"] = 4.0 * max(c * c for c in target.hessian_columns)
        out["solve_workspace"] = workspace
    elif method == "flatquant":
        out["fp32_block"] = 4.0 * target.params
        out["transforms_and_adamw"] = 16.0 * flat_trainable
        if saved is not None:
            out["autograd_activations"] = saved.per_token_width * batch_size * seq_len * d
            out["autograd_scores"] = saved.per_score * batch_size * target.n_heads * seq_len ** 2
            out["autograd_weights"] = saved.per_param * target.params
    else:
        raise ValueError(f"no memory model for method {method!r}; valid: {', '.join(METHODS)}")
    out["total"] = sum(out.values())
    out["gpu_with_offload_cpu"] = out["total"] - out["calib_activations"]
    return out


def flatquant_trainable(shape: BlockShape) -> int:
    """Trainable FlatQuant parameters of one block (transforms + clipping) at the config's defaults, counted on a
    storage-free (meta) block with FlatQuant's own FlatBlock."""
    import torch

    from fair_calib.models.config import DLLMConfig
    from fair_calib.models.dllm import build_model
    from fair_calib.quant.flat_block import FlatBlock, FlatBlockSpec
    from fair_calib.quant.grids import QuantSpec

    cfg = DLLMConfig(family="llada", vocab_size=128, d_model=shape.d_model, n_layers=1, n_heads=shape.n_heads,
                     n_kv_heads=shape.n_kv_heads, intermediate_size=shape.intermediate, mask_id=2, eos_id=1, pad_id=0)
    with torch.device("meta"):
        block = build_model(cfg).blocks[0]
    fb = FlatBlock(block, FlatBlockSpec(QuantSpec(4), QuantSpec(4), QuantSpec(16), init="identity"))
    return sum(p.numel() for group in fb.parameter_groups(lr=1.0, clip_lr=1.0) for p in group["params"])


# ---- one configuration (child process) ------------------------------------------------------------------------

def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from fair_calib import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


class _SavedTensorMeter:
    """Peak bytes of the tensors autograd holds for backward (by storage, parameters excluded), split into
    activation-shaped (batch or batch x L rows), attention-score-shaped (trailing L x L) and the rest (weight-shaped:
    transformed and fake-quantized weights)."""

    def __init__(self, batch_sizes: set[int], seq_len: int) -> None:
        self.rows = batch_sizes | {b * seq_len for b in batch_sizes}
        self.seq_len = seq_len
        self.live = {"activation": 0, "score": 0, "weight": 0}
        self.at_peak = dict(self.live)
        self._held: dict[int, list[Any]] = {}  # storage pointer -> [references, kind, bytes]

    def kind(self, t: Any) -> str:
        if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == self.seq_len:
            return "score"
        return "activation" if t.dim() >= 1 and t.shape[0] in self.rows else "weight"

    def pack(self, t: Any) -> Any:
        import torch

        if isinstance(t, torch.nn.Parameter):
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._held:
            self._held[ptr][0] += 1
        else:
            kind, n = self.kind(t), t.untyped_storage().nbytes()
            self._held[ptr] = [1, kind, n]
            self.live[kind] += n
            if sum(self.live.values()) > sum(self.at_peak.values()):
                self.at_peak = dict(self.live)
        weakref.finalize(t, self._release, ptr)
        return t

    def _release(self, ptr: int) -> None:
        entry = self._held[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live[entry[1]] -= entry[2]
            del self._held[ptr]


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from fair_calib.data.calibration import CalibrationSet
    from fair_calib.models.config import DLLMConfig
    from fair_calib.models.dllm import build_model
    from fair_calib.registry import build

    width, depth, method = args.width, args.depth, args.method
    shape = BlockShape(width, width // args.head_dim, width // args.head_dim, args.mlp_ratio * width)
    overrides = ["experiment=none", f"method={method}", "logger=none", "quantizer.progress=false"]
    if method == "flatquant":
        overrides.append(f"quantizer.epochs={args.epochs}")
    qcfg = _compose(overrides).quantizer
    torch.manual_seed(0)
    cfg = DLLMConfig(family="llada", vocab_size=128, d_model=width, n_layers=depth, n_heads=shape.n_heads,
                     n_kv_heads=shape.n_kv_heads, intermediate_size=shape.intermediate, mask_id=2, eos_id=1, pad_id=0)
    model = build_model(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (args.samples, args.seq_len))
    offsets = torch.arange(args.seq_len).expand_as(ids).clone()
    calib = CalibrationSet(ids, torch.ones_like(ids), offsets, [""] * args.samples)
    quantizer = build("quantizer", qcfg)
    base = rss_mb()
    batch = min(int(qcfg.batch_size), args.samples)
    meter = _SavedTensorMeter({batch, args.samples % batch or batch}, args.seq_len)
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "flatquant":
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            report = quantizer.quantize(model, calib)
    else:
        report = quantizer.quantize(model, calib)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_mb()
    per_block = statistics.median(b["time_s"] for b in report["blocks"])
    flops = calibration_flops(method, shape, args.samples, args.seq_len, args.epochs)
    row: dict[str, Any] = {
        "method": method, "width": width, "depth": depth, "heads": shape.n_heads, "mlp": shape.intermediate,
        "block_params": shape.params, "s_block": per_block, "cpu_s_block": cpu / depth, "s_total": total,
        "peak_mb": peak, "base_mb": base, "overhead_mb": peak - base, "flops_block": flops,
        "gflops": flops / (cpu / depth) / 1e9,
        "threads": torch.get_num_threads()}
    if method == "quarot":
        row["rotate_s"] = report["rotation"]["rotate_s"]
    if method == "flatquant":
        row["train_dtype"] = report["blocks"][0].get("train_dtype")
        row["saved_per_token_width"] = meter.at_peak["activation"] / (batch * args.seq_len * width)
        row["saved_per_score"] = meter.at_peak["score"] / (batch * shape.n_heads * args.seq_len ** 2)
        row["saved_per_param"] = meter.at_peak["weight"] / shape.params
    return row


# ---- the plan, the table, the fits and the projection (parent process) -------------------------------------------
def plan(methods: Sequence[str], widths: Sequence[int], base_depth: int, depths: Sequence[int],
         depth_width: int) -> list[tuple[str, int, int]]:
    """(method, width, depth): every width at base_depth, every depth at depth_width, without repeats."""
    cells = [(w, base_depth) for w in widths] + [(depth_width, d) for d in depths]
    unique = list(dict.fromkeys(cells))
    return [(m, w, d) for m in methods for w, d in unique]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _duration(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)" if s < 3600 else f"{s:.0f} s ({s / 3600:.2f} h)"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, paper_epochs: int) -> None:
    keys = ["method", "width", "depth", "heads", "mlp", "block_params", "s_block", "cpu_s_block", "peak_mb",
            "overhead_mb", "flops_block", "gflops"]
    print(f"\nthreads={args.threads}, calibration {args.samples} x {args.seq_len} random tokens, FlatQuant epochs "
          f"{args.epochs}, head_dim {args.head_dim}, MLP = {args.mlp_ratio} x width\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    quarot = [r for r in rows if "rotate_s" in r]
    if quarot:
        print("\nQuaRot's whole-model rotation (before the blocks, not in s_block): "
              + ", ".join(f"w{r['width']}/d{r['depth']} {r['rotate_s']:.2f} s" for r in quarot))

    gpu = GPUAssumption(peak_tflops=args.gpu_tflops, utilisation=args.gpu_util)
    print("\n## Growth with the width (log-log least squares over the base-depth rows)\n")
    print("| method | wall s/block ~ width^b | R^2 | CPU s/block ~ width^b | R^2 | overhead MB ~ width^b | R^2 | "
          "CPU s/block vs depth |\n|---|---|---|---|---|---|---|---|")
    fits: dict[str, tuple[float, float]] = {}
    for m in args.methods:
        mine = [r for r in rows if r["method"] == m and r["depth"] == args.base_depth]
        by_depth = sorted((r["depth"], r["cpu_s_block"]) for r in rows
                          if r["method"] == m and r["width"] == args.depth_width)
        depth_txt = ", ".join(f"d{d}: {s:.3g}" for d, s in by_depth) if len(by_depth) > 1 else "-"
        if len({r["width"] for r in mine}) < 2:
            print(f"| {m} | - | - | - | - | - | - | {depth_txt} |")
            continue
        _, wb, wr2 = power_law_fit([r["width"] for r in mine], [r["s_block"] for r in mine])
        a, b, r2 = power_law_fit([r["width"] for r in mine], [r["cpu_s_block"] for r in mine])
        fits[m] = (a, b)
        mem = [r for r in mine if r["overhead_mb"] > 0]
        if len({r["width"] for r in mem}) >= 2:
            _, mb, mr2 = power_law_fit([r["width"] for r in mem], [r["overhead_mb"] for r in mem])
            mem_txt = f"{mb:.2f} | {mr2:.3f}"
        else:
            mem_txt = "- | -"
        print(f"| {m} | {wb:.2f} | {wr2:.3f} | {b:.2f} | {r2:.3f} | {mem_txt} | {depth_txt} |")

    paper = (args.paper_samples, args.paper_seq_len)
    print(f"\n## PROJECTION (not a measurement): LLaDA-8B, d_model {LLADA_8B.d_model}, {LLADA_8B_LAYERS} blocks, "
          f"{LLADA_8B.n_heads} heads, MLP {LLADA_8B.intermediate}, calibration {paper[0]} x {paper[1]}, "
          f"FlatQuant {paper_epochs} epochs\n")
    print(f"Assumptions: GPU = {gpu.name} {gpu.peak_tflops:g} TFLOP/s at {gpu.utilisation:.0%} utilisation = "
          f"{gpu.sustained_flops / 1e12:.0f} TFLOP/s sustained for every method (GPTQ's fp32 Hessians and Cholesky "
          "would run slower, FlatQuant's element-wise fake quantization is not counted); the CPU -> GPU factor of the "
          "fit column is this run's measured CPU FLOP/s (per method, at its largest width) / that sustained rate; "
          "block weights bf16, calibration stores bf16 (the engine keeps two: block inputs and FP outputs, on the "
          "host with offload=cpu); time excludes model loading, embedding capture and QuaRot's rotation.\n")
    print("| method | CPU GFLOP/s (measured) | GFLOP per 8B block | CPU s/block by fit | GPU s/block: fit | "
          "GPU s/block: FLOPs | GPU total: fit | GPU total: FLOPs |\n|---|---|---|---|---|---|---|---|")
    for m, fit in fits.items():
        widest = max((r for r in rows if r["method"] == m and r["depth"] == args.base_depth), key=lambda r: r["width"])
        epochs = args.epochs if m == "flatquant" else 1
        p_epochs = paper_epochs if m == "flatquant" else 1
        t = project_time(m, fit, widest["gflops"] * 1e9, (args.samples, args.seq_len, epochs),
                         (*paper, p_epochs), gpu)
        print(f"| {m} | {widest['gflops']:.1f} | {t['flops_block'] / 1e9:.3g} | {t['cpu_fit_block_s']:.3g} | "
              f"{t['gpu_fit_block_s']:.3g} | {t['gpu_flop_block_s']:.3g} | {_duration(t['gpu_fit_total_s'])} | "
              f"{_duration(t['gpu_flop_total_s'])} |")

    flat_rows = [r for r in rows if r["method"] == "flatquant"]
    saved = None
    if flat_rows:
        widest = max(flat_rows, key=lambda r: (r["width"], -r["depth"]))
        saved = SavedBytes(widest["saved_per_token_width"], widest["saved_per_score"], widest["saved_per_param"])
        print(f"\nFlatQuant: peak of the tensors autograd holds for backward in a training step, measured at width "
              f"{widest['width']} (train dtype {widest['train_dtype']}, batch {args.flat_batch_size}): "
              f"{saved.per_token_width:.1f} B per token x d_model, {saved.per_score:.2f} B per attention score "
              f"(0 when SDPA keeps no L x L matrix), {saved.per_param:.2f} B per block parameter; the projection "
              "scales them to the 8B block at the paper's sequence length")
    print("\n| method | block weights | calib activations | method state | total | GPU with offload=cpu |"
          "\n|---|---|---|---|---|---|")
    trainable = flatquant_trainable(LLADA_8B) if "flatquant" in args.methods else 0
    for m in args.methods:
        mem = project_memory(m, *paper, batch_size=args.flat_batch_size, flat_trainable=trainable, saved=saved)
        state = {k: v for k, v in mem.items() if k not in ("block_weights", "calib_activations", "total",
                                                            "gpu_with_offload_cpu")}
        state_txt = " + ".join(f"{k} {_gb(v)}" for k, v in state.items())
        print(f"| {m} | {_gb(mem['block_weights'])} | {_gb(mem['calib_activations'])} | {state_txt} | "
              f"{_gb(mem['total'])} | {_gb(mem['gpu_with_offload_cpu'])} |")
    if trainable:
        print(f"\nFlatQuant trainable parameters per 8B block (FlatBlock on a meta block): {trainable:,}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 768, 1024])
    p.add_argument("--base-depth", type=int, default=4, help="depth of the width series")
    p.add_argument("--depths", type=int, nargs="*", default=[4, 8, 16], help="depth series (at --depth-width)")
    p.add_argument("--depth-width", type=int, default=512)
    p.add_argument("--samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1, help="FlatQuant epochs measured (the projection uses the "
                                                         "config's, 15)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--mlp-ratio", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paper-samples", type=int, default=128)
    p.add_argument("--paper-seq-len", type=int, default=2048)
    p.add_argument("--gpu-tflops", type=float, default=312.0, help="assumed GPU peak (A100 bf16 dense: 312)")
    p.add_argument("--gpu-util", type=float, default=0.4, help="assumed sustained fraction of --gpu-tflops")
    p.add_argument("--quick", action="store_true", help="smoke run: widths 128 256 at depth 2, no depth series, "
                                                        "4 x 64 tokens, one FlatQuant step per block")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="gptq", help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.widths, args.base_depth, args.depths, args.depth_width = [128, 256], 2, [], 128
        args.samples, args.seq_len, args.epochs = 4, 64, 1
    if args.child:
        print(json.dumps(child(args)))
        return
    for w in [*args.widths, args.depth_width]:
        if w % args.head_dim:
            p.error(f"width {w} is not a multiple of --head-dim {args.head_dim}: pick widths that are")
    if min([args.samples, args.seq_len, args.epochs, args.threads, args.base_depth, *args.depths]) < 1:
        p.error("--samples, --seq-len, --epochs, --threads and the depths must be >= 1")
    if not 0 < args.gpu_util <= 1:
        p.error(f"--gpu-util {args.gpu_util} must be in (0, 1]")

    flat_cfg = _compose(["experiment=none", "method=flatquant", "logger=none"]).quantizer
    args.flat_batch_size, paper_epochs = int(flat_cfg.batch_size), int(flat_cfg.epochs)
    rows = []
    for method, width, depth in plan(args.methods, args.widths, args.base_depth, args.depths, args.depth_width):
        cmd = [sys.executable, __file__, "--child", "--method", method, "--width", str(width), "--depth", str(depth),
               "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--epochs", str(args.epochs),
               "--head-dim", str(args.head_dim), "--mlp-ratio", str(args.mlp_ratio), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            print(f"  {method} w{width} d{depth}: FAILED ({tail})", flush=True)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {method} w{width} d{depth}: {r['s_block']:.2f} s/block, peak {r['peak_mb']:.0f} MB", flush=True)
    if rows:
        report(rows, args, paper_epochs)


if __name__ == "__main__":
    main()
