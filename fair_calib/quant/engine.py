"""The layer-wise calibration engine: it owns data movement; a method only says what to collect and what to do.

Protocol (llm-compressor's split between the pipeline and the modifiers). A method subclasses
`LayerwiseMethod` and implements a few hooks; `LayerwiseMethod.quantize` calls `run_layerwise`:

    method.setup(model, calib)                 once: the group-size check, then method.prepare_model: wrap linears
                                               in QLinear, global transforms, KV quantizers
    capture                                    embeddings of the whole calibration set -> CPU (or disk) store
    for each block l, in order:
        move block l (only it) to the compute device
        collectors = method.collect(block, ctx)       {role: fn(x, w)} called on every FP mini-batch with
                                                      the linear's input x (B, L, in) and token weights w (B, L)
        FP pass (quantizers off): y_fp = block(x) for all batches -> ctx.fp_outputs, collectors fed
        extras = method.quantize_block(block, ctx)    the solve; may run more passes with ctx.run(...),
                                                      ctx.batches(targets=True), ctx.role_output(...)
        quantized pass (quantizers on): y_q = block(x); per-block error of y_q vs y_fp
        next block's inputs = y_q (propagate="quantized"), weight-only-quantized outputs ("weights"),
                              or y_fp ("fp")
        move block l back to where it lived
    method.finalize(model)                     once, after the last block

Passes per block: the FP pass and the quantized pass (the error report reads both). With propagate="weights"
a third, weight-only pass runs only when it computes something else: when the block quantizes no activation
(A16, KV16) the quantized pass *is* the weight-only pass and feeds the next block itself. The last block's next
inputs are read by nobody, so no pass is run for them. No forward computes what nobody reads: a pass that only
feeds collectors (`ctx.run`, e.g. GPTQ's true-sequential groups) stops at the input of the last collected linear, and so
does the FP pass when its outputs are not kept (block_error=false, a method that reads no targets, propagate
other than fp: for GPTQ the down projection's FP output and the (N, L, D) store of targets are skipped).

Per-block errors (over tokens i, hidden dimension d; e = y_q - y_fp, w = token weights, m = attention mask):
    mse          = sum_i m_i mean_d(e_i^2) / sum_i m_i
    mse_weighted = sum_i w_i mean_d(e_i^2) / sum_i w_i
    rel_weighted = sum_i w_i ||e_i||^2 / sum_i w_i ||y_fp,i||^2
With `track_fp_stream`, also the same errors of y_q against the *true* FP hidden states (the FP model
run from the embeddings), i.e. the error accumulated up to block l.

Token weights (N, L) default to the attention mask (1 on real tokens, 0 on padding); statistics are fp32.
"""

from __future__ import annotations

import logging
import tempfile
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.base import Quantizer
from fair_calib.quant.grids import QuantSpec
from fair_calib.quant.qlinear import (
    ActQuantizer,
    QLinear,
    check_finite,
    install_kv_quantizers,
    qlinears,
    set_quant_enabled,
    wrap_block_linears,
)
from fair_calib.registry import ConfigError

log = logging.getLogger(__name__)

Collector = Callable[[Tensor, Tensor], None]
"""fn(x, w): x (B, L, in) the input a linear's weight multiplies (after its input transform), w (B, L) fp32."""

PROPAGATE = ("quantized", "weights", "fp")
OFFLOAD = ("cpu", "disk")


# ---- storage of (N, L, D) activations -------------------------------------------------------------
class HiddenStore:
    """(N, L, D) activations kept in CPU memory, or memory-mapped from a temporary file on disk."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, offload: str = "cpu",
                 directory: str | Path | None = None) -> None:
        if offload not in OFFLOAD:
            raise ConfigError(f"quantizer.offload {offload!r} unknown; valid: {', '.join(OFFLOAD)}")
        self.shape, self.dtype, self.path = tuple(shape), dtype, None
        numel = 1
        for s in shape:
            numel *= int(s)
        if offload == "disk":
            fd, name = tempfile.mkstemp(prefix="fair_calib_acts_", suffix=".bin", dir=directory)
            with open(fd, "wb") as f:
                f.truncate(numel * torch.empty((), dtype=dtype).element_size())
            self.path = Path(name)
            self.data = torch.from_file(name, shared=True, size=numel, dtype=dtype).view(self.shape)
        else:
            self.data = torch.empty(self.shape, dtype=dtype)

    def __getitem__(self, rows: slice | Tensor) -> Tensor:
        return self.data[rows]

    def __setitem__(self, rows: slice | Tensor, value: Tensor) -> None:
        self.data[rows] = value.detach().to("cpu", self.dtype)

    def close(self) -> None:
        """Release the memory (and delete the file of a disk store)."""
        self.data = torch.empty(0, dtype=self.dtype)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


# ---- one block's view of the calibration set --------------------------------------------------------
@dataclass
class Batch:
    """A mini-batch of calibration rows on the compute device."""

    rows: slice | Tensor
    x: Tensor  # (B, L, D) block inputs
    attn_bias: Tensor | None  # (B, 1, 1, L) additive key-padding bias, None when nothing is padded
    weights: Tensor  # (B, L) fp32 token weights
    mask: Tensor  # (B, L) attention mask
    target: Tensor | None = None  # (B, L, D) FP block outputs (with batches(targets=True))


class _StopForward(Exception):
    pass


class BlockContext:
    """What a method sees of the calibration data while block `index` is on `device`."""

    def __init__(self, index: int, block: nn.Module, device: torch.device, rope: tuple[Tensor, Tensor],
                 inputs: HiddenStore, fp_outputs: HiddenStore, attention_mask: Tensor, token_weights: Tensor,
                 batch_size: int) -> None:
        self.index, self.block, self.device, self.rope = index, block, device, rope
        self.inputs, self.fp_outputs = inputs, fp_outputs
        self.attention_mask, self.token_weights = attention_mask, token_weights
        self.batch_size = batch_size
        self._collect_weights: Tensor | None = None  # set only during collecting forwards

    @property
    def num_samples(self) -> int:
        return int(self.attention_mask.shape[0])

    def batches(self, targets: bool = False, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Mini-batches in row order (or a seeded random order of rows with `shuffle`), moved to the device."""
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, self.batch_size):
            rows: slice | Tensor = (slice(start, min(start + self.batch_size, n)) if order is None
                                    else order[start: start + self.batch_size])
            mask = self.attention_mask[rows].to(self.device)
            x = self.inputs[rows].to(self.device)
            bias = None if bool(mask.all()) else DiffusionLM.attention_bias(mask, x.dtype)
            yield Batch(rows, x, bias, self.token_weights[rows].to(self.device), mask,
                        self.fp_outputs[rows].to(self.device) if targets else None)

    def forward(self, batch: Batch, x: Tensor | None = None, collect: bool = False) -> Tensor:
        """Block output for `batch` (or for other inputs `x` of the same rows); `collect` feeds the collectors."""
        self._collect_weights = batch.weights if collect else None
        try:
            return self.block(batch.x if x is None else x, self.rope, batch.attn_bias)
        finally:
            self._collect_weights = None

    @contextmanager
    def collecting(self, collectors: dict[str, Collector], stop: bool = False) -> Iterator[None]:
        """Register `collectors` on the block's linears (by role) for the forwards run with collect=True; with
        `stop`, a collecting forward ends (`_StopForward`, see `feed`) as soon as every collector has been fed."""
        handles, fed = [], set()
        for role, fn in collectors.items():  # pre-hooks: the last collected linear itself is not computed
            def hook(module: nn.Module, inputs: tuple[Tensor, ...], fn: Collector = fn, role: str = role) -> None:
                if self._collect_weights is None:
                    return
                x = inputs[0]
                if isinstance(module, QLinear):
                    x = module.quantize_input(x)
                fn(x.detach(), self._collect_weights)
                fed.add(role)
                if stop and len(fed) == len(collectors):
                    fed.clear()
                    raise _StopForward

            handles.append(self.block.role(role).register_forward_pre_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def feed(self, batch: Batch) -> None:
        """A collecting forward of `batch` that stops at the last collector (inside `collecting(..., stop=True)`):
        neither the last collected linear nor anything after it is computed."""
        try:
            self.forward(batch, collect=True)
        except _StopForward:
            pass

    @torch.no_grad()
    def run(self, collectors: dict[str, Collector]) -> None:
        """One more pass over the calibration set through the block as it is now, feeding `collectors` (its outputs
        are read by nobody, so each forward stops at the last collector)."""
        if not collectors:
            return
        with self.collecting(collectors, stop=True):
            for batch in self.batches():
                self.feed(batch)

    def role_output(self, batch: Batch, role: str) -> Tensor:
        """Output of the linear `role` in the block's forward on `batch` (the forward stops right there)."""
        out: dict[str, Tensor] = {}

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            out["y"] = output
            raise _StopForward

        handle = self.block.role(role).register_forward_hook(hook)
        try:
            self.block(batch.x, self.rope, batch.attn_bias)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return out["y"]


# ---- errors -----------------------------------------------------------------------------------------
class ErrorMeter:
    """Accumulates the weighted / unweighted per-token MSE of outputs against a reference (module docstring)."""

    def __init__(self) -> None:
        self.sq_w = self.w = self.sq_m = self.m = self.ref_w = 0.0

    def add(self, y: Tensor, ref: Tensor, w: Tensor, mask: Tensor) -> None:
        e2 = (y.float() - ref.float()).pow(2)
        per_tok, ref_tok = e2.mean(-1), ref.float().pow(2).mean(-1)
        w, m = w.float(), (mask != 0).float()
        self.sq_w += float((per_tok * w).sum())
        self.w += float(w.sum())
        self.sq_m += float((per_tok * m).sum())
        self.m += float(m.sum())
        self.ref_w += float((ref_tok * w).sum())

    def result(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}mse": self.sq_m / max(self.m, 1e-30),
                f"{prefix}mse_weighted": self.sq_w / max(self.w, 1e-30),
                f"{prefix}rel_weighted": self.sq_w / max(self.ref_w, 1e-30)}


# ---- helpers methods share ----------------------------------------------------------------------------
def move_block(block: nn.Module, device: torch.device) -> None:
    """Move one block's parameters and buffers (a function so tests can observe the moves)."""
    block.to(device)


def module_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def weight_only(module: nn.Module) -> Iterator[None]:
    """Temporarily leave activations (and K/V) in full precision: weights quantized, activations not."""
    saved = [(q, q.a_spec) for q in qlinears(module)]
    kv = [(m, m.enabled) for m in module.modules() if isinstance(m, ActQuantizer)]
    for q, spec in saved:
        q.a_spec = replace(spec, bits=16)
    for m, _ in kv:
        m.enabled = False
    try:
        yield
    finally:
        for q, spec in saved:
            q.a_spec = spec
        for m, on in kv:
            m.enabled = on


def weight_only_is_identity(module: nn.Module) -> bool:
    """True when `weight_only(module)` changes nothing: no QLinear quantizes its input and no ActQuantizer has bits
    < 16 (weight-only settings), so the quantized forward and the weight-only forward are the same function."""
    return (not any(q.a_spec.enabled for q in qlinears(module))
            and not any(m.spec.enabled for m in module.modules() if isinstance(m, ActQuantizer)))


@torch.no_grad()
def freeze_linears(block: nn.Module) -> None:
    """Write each QLinear's fake-quantized weight into `weight` (quantizer on for the write), NaN-checked."""
    for q in qlinears(block):
        q.quant_enabled = True
        q.freeze()


@torch.no_grad()
def write_quantized_weight(q: QLinear, w: Tensor) -> None:
    """Store solver output `w` (already on the grid) as the layer's weight and mark it frozen."""
    check_finite(w, q.name)
    q.weight.data.copy_(w.to(q.weight.dtype))
    q.weight_clip_logit = None
    q.weight_frozen = True


def default_token_weights(calib: Any, token_weights: Tensor | None) -> Tensor:
    """(N, L) fp32 token weights: the given ones (checked), else 1 on real tokens and 0 on padding."""
    mask = calib.attention_mask
    if token_weights is None:
        return (mask != 0).float()
    w = torch.as_tensor(token_weights).detach().float().cpu()
    if w.shape != mask.shape:
        raise ValueError(f"token_weights shape {tuple(w.shape)} != calibration set shape {tuple(mask.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("token_weights must be finite and non-negative")
    if float(w.sum()) <= 0:
        raise ValueError("token_weights are all zero: no token would contribute to calibration")
    return w


@dataclass(frozen=True)
class EngineSettings:
    """Data-movement knobs every layer-wise method accepts as config values."""

    propagate: str = "quantized"
    batch_size: int = 8
    device: str | None = None  # None = where the model's first block lives
    offload: str = "cpu"  # cpu | disk: where captured activations live
    offload_dir: str | None = None
    track_fp_stream: bool = False
    progress: bool = True
    block_error: bool = True  # the per-block error vs the FP block's outputs (they are kept for it)

    def __post_init__(self) -> None:
        if self.propagate not in PROPAGATE:
            raise ConfigError(f"quantizer.propagate {self.propagate!r} unknown; valid: {', '.join(PROPAGATE)}")
        if self.offload not in OFFLOAD:
            raise ConfigError(f"quantizer.offload {self.offload!r} unknown; valid: {', '.join(OFFLOAD)}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"quantizer.batch_size must be >= 1, got {self.batch_size}")


# ---- the method protocol ----------------------------------------------------------------------------
class LayerwiseMethod(Quantizer):
    """Base of block-by-block methods (GPTQ, SmoothQuant, AWQ, QuaRot, FlatQuant); see the module docstring."""

    requires_calibration = True
    name = "layerwise"
    default_propagate = "quantized"
    needs_fp_outputs = False  # True: quantize_block reads the FP block outputs (ctx.batches(targets=True))

    def __init__(self, propagate: str | None = None, batch_size: int = 8, device: str | None = None,
                 offload: str = "cpu", offload_dir: str | None = None, track_fp_stream: bool = False,
                 progress: bool = True, block_error: bool = True, **bits: Any) -> None:
        super().__init__(**bits)
        self.engine = EngineSettings(propagate or self.default_propagate, int(batch_size), device, offload,
                                     offload_dir, bool(track_fp_stream), bool(progress), bool(block_error))

    def setup(self, model: DiffusionLM, calib: Any) -> None:
        """Before capture, for every method: grouped weights need a group size that divides every block linear's
        input (one config error before any weight changes), then the method's `prepare_model`."""
        check_group_size(model, self.bits.weight_spec(), self.name)
        self.prepare_model(model, calib)

    # hooks ---------------------------------------------------------------------------------------
    def prepare_model(self, model: DiffusionLM, calib: Any) -> None:
        """Before capture: wrap every block linear in a QLinear and install K/V quantizers (if kv_bits < 16)."""
        wrap_block_linears(model, self.bits.weight_spec(), self.bits.act_spec())
        install_kv_quantizers(model, self.bits.kv_spec())

    def collect(self, block: nn.Module, ctx: BlockContext) -> dict[str, Collector]:
        """Statistics to gather during the block's FP pass: {role: collector}."""
        return {}

    @abstractmethod
    def quantize_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, Any]:
        """Quantize `block` in place (quantizers are off while this runs); return JSON-able per-block extras."""

    def finalize(self, model: DiffusionLM) -> dict[str, Any]:
        """After the last block; returns extras for the report."""
        return {}

    def quantize(self, model: DiffusionLM, calib: Any = None, token_weights: Tensor | None = None) -> dict[str, Any]:
        return run_layerwise(model, calib, self, token_weights)


# ---- the engine ---------------------------------------------------------------------------------------
@torch.no_grad()
def capture_block_inputs(model: DiffusionLM, calib: Any, settings: EngineSettings) -> HiddenStore:
    """Embeddings of every calibration row = the first block's inputs, stored on CPU (or disk)."""
    n, length = calib.input_ids.shape
    emb_device = model.embed_tokens.weight.device
    store = HiddenStore((n, length, model.config.d_model), model.embed_tokens.weight.dtype, settings.offload,
                        settings.offload_dir)
    for start in range(0, n, settings.batch_size):
        rows = slice(start, min(start + settings.batch_size, n))
        store[rows] = model.embed(calib.input_ids[rows].to(emb_device))
    return store


def fp_pass(ctx: BlockContext, method: LayerwiseMethod, fp_stream: HiddenStore | None, keep_outputs: bool) -> None:
    """Pass 1, quantizers off: the method's collectors fed, and the block's FP outputs (the targets) when
    `keep_outputs`; without them each forward stops at the last collector. Then the true FP trajectory when it
    is tracked (before the solve changes the block)."""
    set_quant_enabled(ctx.block, False)
    collectors = method.collect(ctx.block, ctx)
    with ctx.collecting(collectors, stop=not keep_outputs):
        for batch in ctx.batches():
            if keep_outputs:
                ctx.fp_outputs[batch.rows] = ctx.forward(batch, collect=True)
            elif collectors:
                ctx.feed(batch)
    if fp_stream is not None:
        for batch in ctx.batches():
            fp_stream[batch.rows] = ctx.forward(batch, x=fp_stream[batch.rows].to(ctx.device))


def quantized_pass(ctx: BlockContext, propagate: str, needs_next: bool, fp_stream: HiddenStore | None,
                   errors: bool = True) -> tuple[ErrorMeter, ErrorMeter]:
    """Pass 2, quantizers on: the error against the FP targets (with `errors`) and the FP stream, and the next
    block's inputs from the same outputs whenever they are the same function (propagate=quantized, or weight-only
    quantization under propagate=weights); a third, weight-only pass only when they differ. Nobody reads the last
    block's next inputs, so `needs_next` is False there (and with nothing to measure either, no pass runs)."""
    set_quant_enabled(ctx.block, True)
    same = propagate == "weights" and weight_only_is_identity(ctx.block)
    feed_next = needs_next and (propagate == "quantized" or same)
    local, drift = ErrorMeter(), ErrorMeter()
    if errors or fp_stream is not None or feed_next:
        for batch in ctx.batches(targets=errors):
            y = ctx.forward(batch)
            if errors:
                local.add(y, batch.target, batch.weights, batch.mask)
            if fp_stream is not None:
                drift.add(y, fp_stream[batch.rows].to(ctx.device), batch.weights, batch.mask)
            if feed_next:
                ctx.inputs[batch.rows] = y
    if needs_next and propagate == "weights" and not same:
        with weight_only(ctx.block):
            for batch in ctx.batches():
                ctx.inputs[batch.rows] = ctx.forward(batch)
    return local, drift


def run_layerwise(model: DiffusionLM, calib: Any, method: LayerwiseMethod,
                  token_weights: Tensor | None = None) -> dict[str, Any]:
    """Calibrate `model` in place block by block with `method`; returns the report (per-block errors, timings)."""
    if calib is None:
        raise ConfigError(f"quantizer={method.name} needs calibration data: set data=tinyreason (or data=text)")
    settings = method.engine
    t_start = time.perf_counter()
    weights = default_token_weights(calib, token_weights)
    mask = calib.attention_mask.cpu()
    blocks = list(model.blocks)
    device = torch.device(settings.device) if settings.device else module_device(blocks[0])
    was_training = model.training
    model.eval()

    method.setup(model, calib)
    inputs = capture_block_inputs(model, calib, settings)
    # the FP block outputs are kept when something reads them: the error report, the method, or propagate=fp
    keep = settings.block_error or method.needs_fp_outputs or settings.propagate == "fp"
    fp_out = (HiddenStore(inputs.shape, inputs.dtype, settings.offload, settings.offload_dir) if keep
              else HiddenStore((0,), inputs.dtype))
    fp_stream = None
    if settings.track_fp_stream and settings.propagate != "fp":
        fp_stream = HiddenStore(inputs.shape, inputs.dtype, settings.offload, settings.offload_dir)
        fp_stream.data.copy_(inputs.data)
    rope = model.rope(calib.input_ids.shape[1], device)
    per_block: list[dict[str, Any]] = []
    bar = tqdm(blocks, desc=f"{method.name} {method.label}", disable=not settings.progress, mininterval=2)
    try:
        for index, block in enumerate(bar):
            t0 = time.perf_counter()
            home = module_device(block)
            move_block(block, device)
            ctx = BlockContext(index, block, device, rope, inputs, fp_out, mask, weights, settings.batch_size)
            with torch.no_grad():
                fp_pass(ctx, method, fp_stream, keep)
            extras = method.quantize_block(block, ctx) or {}
            with torch.no_grad():
                local, drift = quantized_pass(ctx, settings.propagate, index < len(blocks) - 1, fp_stream, keep)
            if settings.propagate == "fp":
                inputs, fp_out = fp_out, inputs
            move_block(block, home)
            row: dict[str, Any] = {"block": index, **(local.result() if keep else {})}
            if settings.track_fp_stream:  # with propagate=fp the inputs are the FP stream itself
                row.update(drift.result("vs_fp_") if fp_stream is not None else local.result("vs_fp_"))
            row["time_s"] = time.perf_counter() - t0
            row.update(extras)
            per_block.append(row)
            if keep:
                bar.set_postfix(mse_w=f"{row['mse_weighted']:.3g}")
    finally:
        for store in (inputs, fp_out, fp_stream):
            if store is not None:
                store.close()
    final = method.finalize(model) or {}
    set_quant_enabled(model, True)
    model.train(was_training)
    return {
        "method": method.name, "bits": method.label, "propagate": settings.propagate,
        "n_samples": int(calib.input_ids.shape[0]), "seq_len": int(calib.input_ids.shape[1]),
        "tokens": int((mask != 0).sum()), "token_weight_sum": float(weights.sum()),
        "blocks": per_block,
        "mean_mse_weighted": (sum(r["mse_weighted"] for r in per_block) / max(len(per_block), 1)) if keep else None,
        "time_s": time.perf_counter() - t_start,
        **final,
    }


def check_group_size(model: DiffusionLM, spec: QuantSpec, method: str) -> None:
    """Grouped weights need group_size to divide every block linear's input size (one clear config error)."""
    if not spec.enabled or spec.granularity != "group":
        return
    sizes = sorted({lin.in_features for block in model.blocks for lin in block.linears().values()})
    bad = [s for s in sizes if s % spec.group_size]
    if bad:
        raise ConfigError(f"quantizer={method}: group_size={spec.group_size} does not divide the input sizes {bad}; "
                          f"pick a common divisor of {sizes} or w_granularity=channel")
