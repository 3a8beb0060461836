"""FlatQuant (DESIGN 4.6), the base of FAIR-Calib: learnable Kronecker affine transforms and clipping, trained block
by block on the (per-token weighted) block-output MSE, merged into the weights in float64.

Algorithm, per transformer block ``l`` (FP inputs ``X`` to both the FP and the quantized block):

    h* = block_l(X)                                          FP targets (engine), plus per-channel abs-max of the
                                                             transform inputs (SmoothQuant-style scale init)
    theta = {P1, P2, s per transform; P per head; clip logits}   random-orthogonal Cayley init, logits 4.0
    for epoch in 1..E, for each batch B:
        L = sum_i w_i ||block_l^q(X_B; theta)_i - h*_i||^2 / sum_i w_i
        (L / stopgrad(L)).backward();  AdamW step (lr; clip_lr_mult x lr for clipping; weight decay 0.01 on every
        trained parameter, torch's default as in the reference);  cosine to 1e-3 lr;  forward under bf16 autocast
        (amp=auto: where the hardware has bf16)
    W <- (W / d) (P1 (x) P2)^{-T} in float64;  W <- Q_w(W) with the learned clipping;  online transforms fixed
    next block's inputs: h* (propagate="fp", FlatQuant) or block_l^q(X) (propagate="quantized")

``w_i`` are the per-token weights of the FAIR-Calib weighting (``uniform``: 1, padding 0), so ``weighting=uniform``
is plain FlatQuant. The block wiring (where the transforms and quantizers sit) is in :mod:`fair_calib.quant.flat_block`;
data movement (capture, FP pass, propagation, per-block errors) is the layer-wise engine's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fair_calib.models.block import DLLMBlock
from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.engine import Batch, BlockContext, Collector, LayerwiseMethod
from fair_calib.quant.flat_block import SCALED_TAPS, FlatBlock, FlatBlockSpec, weighted_token_mse
from fair_calib.registry import ConfigError, register

log = logging.getLogger(__name__)

BatchSource = Callable[[bool, torch.Generator], Iterator[Batch]]
"""fn(shuffle, generator) -> the mini-batches of one epoch (with FP targets)."""

STAT_ROLES = {tap: roles[0] for tap, roles in SCALED_TAPS.items()}  # the linear whose input is collected per tap


@dataclass(frozen=True)
class FlatQuantSettings:
    """Training knobs of FlatQuant (every one is a config value of ``quantizer=flatquant``)."""

    epochs: int = 15
    batch_size: int = 4
    lr: float = 5e-3
    clip_lr_mult: float = 10.0
    min_lr_ratio: float = 1e-3
    weight_decay: float = 0.01
    alpha: float = 0.3
    shuffle: bool = False
    seed: int = 0
    amp: bool | str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"flatquant epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"flatquant batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and self.clip_lr_mult >= 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0):
            raise ConfigError("flatquant needs lr > 0, clip_lr_mult >= 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0")
        if self.amp not in (True, False, "auto"):
            raise ConfigError(f"flatquant amp={self.amp!r}: true (bf16 autocast), false (fp32) or auto")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"flatquant alpha must be in [0, 1], got {self.alpha}")


# ---- training ---------------------------------------------------------------------------------------------------
def train_flat_block(fb: FlatBlock, batches: BatchSource, n_batches: int, rope: tuple[Tensor, Tensor],
                     s: FlatQuantSettings, generator: torch.Generator, device: torch.device) -> list[float]:
    """FlatQuant's per-block training: AdamW over the transforms (``lr``) and clipping logits (``clip_lr_mult * lr``),
    cosine schedule to ``min_lr_ratio * lr`` over ``epochs * n_batches`` steps, loss ``L / stopgrad(L)`` with
    ``L = sum_i w_i ||h^q_i - h*_i||^2 / sum_i w_i``. Returns each epoch's weighted MSE per element (``L / d``)."""
    if s.epochs == 0:
        return []
    fb.trainable(True)
    opt = torch.optim.AdamW(fb.parameter_groups(s.lr, s.lr * s.clip_lr_mult), weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs * max(1, n_batches),
                                                       eta_min=s.lr * s.min_lr_ratio)
    cast = training_autocast(s.amp, device)
    losses: list[float] = []
    width = fb.block.role("o").out_features  # d_model: report L / d, the engine's per-element MSE
    bar = tqdm(range(s.epochs), desc=f"flatquant {fb.name}", leave=False, disable=not s.progress)
    for _ in bar:
        num, den = 0.0, 0.0
        for batch in batches(s.shuffle, generator):
            w = batch.weights.float()
            w_sum = float(w.sum())
            if w_sum <= 0:  # nothing to fit in this batch (all padding)
                sched.step()
                continue
            with cast:
                out = fb.block(batch.x.float(), rope, _as_float(batch.attn_bias))
            loss = weighted_token_mse(out, batch.target, w)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{fb.name}: non-finite FlatQuant loss; lower quantizer.lr")
            num += float(loss.detach()) * w_sum
            den += w_sum
            opt.zero_grad(set_to_none=True)
            (loss / loss.detach().clamp_min(1e-30)).backward()  # FlatQuant's self-normalised loss
            opt.step()
            sched.step()
        losses.append(num / den / width if den > 0 else 0.0)
        bar.set_postfix(mse=f"{losses[-1]:.4g}")
    fb.trainable(False)
    return losses


def native_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: a CUDA device with bf16, or a CPU with AVX512-BF16 / AMX. Elsewhere bf16 is
    emulated (measured on an AVX-512 CPU without BF16: 2.5-4x slower than fp32, see the README)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def train_dtype(amp: bool | str, device: torch.device) -> torch.dtype:
    """The dtype of the block forward in training: ``amp=true`` bf16 (the reference's default; a CUDA device without
    bf16 falls back to fp32 with a warning), ``false`` fp32, ``auto`` bf16 where :func:`native_bf16`, else fp32."""
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if not amp:
        return torch.float32
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_bf16_supported()):
        log.warning("flatquant: %s cannot autocast to bf16; training in fp32 (quantizer.amp=false silences this)",
                    device)
        return torch.float32
    return torch.bfloat16


def training_autocast(amp: bool | str, device: torch.device) -> contextlib.AbstractContextManager:
    """The reference's training precision: bf16 autocast around the block forward (:func:`train_dtype`); the
    parameters, transform matrices, statistics and the loss stay fp32, merges are fp64."""
    if train_dtype(amp, device) != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _as_float(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.float()


@torch.no_grad()
def block_mse(block: nn.Module, batches: Iterator[Batch], rope: tuple[Tensor, Tensor]) -> float:
    """Weighted block-output MSE per element, ``sum_i w_i mean_d (h_i - h*_i)^2 / sum_i w_i`` (the engine's
    ``mse_weighted``), of the block as it is now."""
    num, den = 0.0, 0.0
    for b in batches:
        out = block(b.x.float(), rope, _as_float(b.attn_bias))
        err = (out.float() - b.target.float()).pow(2).mean(-1)
        num += float((err * b.weights.float()).sum())
        den += float(b.weights.float().sum())
    return num / den if den > 0 else 0.0


def _n_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def run_flat_block(block: DLLMBlock, spec: FlatBlockSpec, s: FlatQuantSettings, batches: BatchSource, n_batches: int,
                   rope: tuple[Tensor, Tensor], act_absmax: dict[str, Tensor], name: str, index: int,
                   freeze: bool = True) -> dict[str, Any]:
    """Build the FlatQuant block, train it, merge (and freeze); the block computes in fp32 and returns to its dtype."""
    t0 = time.perf_counter()
    device = block.role("q").weight.device
    orig_dtype = block.role("q").weight.dtype
    block.float()
    gen = torch.Generator().manual_seed(s.seed * 1_000_003 + index)
    fb = FlatBlock(block, spec, name=name, act_absmax=act_absmax, alpha=s.alpha, generator=gen)
    rope = (rope[0].float(), rope[1].float())
    init = block_mse(block, batches(False, gen), rope)
    epochs = train_flat_block(fb, batches, n_batches, rope, s, gen, device)
    fb.finalize(freeze=freeze)
    block.to(orig_dtype)
    block.taps.float()  # online transforms and activation clipping stay fp32
    log.info("%s: weighted block MSE at init %.4g, last epoch %s", name, init, epochs[-1] if epochs else "-")
    return {"mse_weighted_init": init, "mse_weighted_epochs": epochs, "train_time_s": time.perf_counter() - t0,
            "train_dtype": str(train_dtype(s.amp, device)).removeprefix("torch.")}


# ---- the quantizer ----------------------------------------------------------------------------------------------
class _AbsMax:
    """Per-channel abs-max of a linear's input over tokens with non-zero weight (FP pass collector)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __call__(self, x: Tensor, w: Tensor) -> None:
        a = (x.detach().float().abs() * (w > 0).to(x.device, torch.float32).unsqueeze(-1))
        m = a.reshape(-1, a.shape[-1]).amax(dim=0)
        self.value = m if self.value is None else torch.maximum(self.value, m)


@register("quantizer", "flatquant")
class FlatQuant(LayerwiseMethod):
    """FlatQuant W/A(/KV) quantization; the per-token weights passed to :meth:`quantize` make it FAIR-Calib."""

    name = "flatquant"
    default_propagate = "fp"
    uses_token_weights = True
    needs_fp_outputs = True  # the training targets

    def __init__(self, epochs: int = 15, batch_size: int = 4, lr: float = 5e-3, clip_lr_mult: float = 10.0,
                 min_lr_ratio: float = 1e-3, weight_decay: float = 0.01, alpha: float = 0.3, use_scale: bool = True,
                 learn_clip: bool = True, clip_init: float = 4.0, init: str = "random", o_factors: str = "heads",
                 shuffle: bool = False, seed: int = 0, amp: bool | str = "auto", propagate: str | None = None,
                 device: str | None = None, offload: str = "cpu", offload_dir: str | None = None,
                 track_fp_stream: bool = False, progress: bool = True, **bits: Any) -> None:
        super().__init__(propagate=propagate, batch_size=int(batch_size), device=device, offload=offload,
                         offload_dir=offload_dir, track_fp_stream=track_fp_stream, progress=progress, **bits)
        if self.bits.w_granularity not in ("channel", "group"):
            raise ConfigError(f"quantizer=flatquant quantizes weights per channel or group, "
                              f"not w_granularity={self.bits.w_granularity}")
        self.settings = FlatQuantSettings(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                                          clip_lr_mult=float(clip_lr_mult), min_lr_ratio=float(min_lr_ratio),
                                          weight_decay=float(weight_decay), alpha=float(alpha), shuffle=bool(shuffle),
                                          seed=int(seed), amp=amp if isinstance(amp, str) else bool(amp),
                                          progress=bool(progress))
        self.spec = FlatBlockSpec(self.bits.weight_spec(), self.bits.act_spec(), self.bits.kv_spec(),
                                  use_scale=bool(use_scale), learn_clip=bool(learn_clip), clip_init=float(clip_init),
                                  init=str(init), o_factors=str(o_factors))
        self._stats: dict[str, _AbsMax] = {}

    def prepare_model(self, model: DiffusionLM, calib: Any) -> None:
        """Nothing global: each block is wrapped when it is calibrated (its linears stay FP for the FP pass)."""

    def collect(self, block: nn.Module, ctx: BlockContext) -> dict[str, Collector]:
        self._stats = {point: _AbsMax() for point in SCALED_TAPS}
        return {STAT_ROLES[point]: self._stats[point] for point in SCALED_TAPS}

    def quantize_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, Any]:
        stats = {p: c.value for p, c in self._stats.items() if c.value is not None}

        def batches(shuffle: bool, generator: torch.Generator) -> Iterator[Batch]:
            return ctx.batches(targets=True, shuffle=shuffle, generator=generator)

        n_batches = _n_batches(ctx.num_samples, ctx.batch_size)
        return run_flat_block(block, self.spec, self.settings, batches, n_batches, ctx.rope, stats,
                              f"blocks.{ctx.index}", ctx.index)

    def finalize(self, model: DiffusionLM) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "o_factors": self.spec.o_factors, "init": self.spec.init}


__all__ = ["FlatQuant", "FlatQuantSettings", "run_flat_block", "train_flat_block", "block_mse"]
