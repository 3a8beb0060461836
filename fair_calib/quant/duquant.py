"""DuQuant (Lin et al. 2024, arXiv 2406.01721; DESIGN 10): smoothing, then rotation -> zigzag permutation ->
rotation, so that massive and normal activation outliers are spread over many channels before 4-bit quantization.

Per block, for each linear input group g (q/k/v share the attention-norm output, gate/up the MLP-norm output,
o_proj reads the attention context, down_proj the SwiGLU product), from the FP calibration pass:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)       smoothing (paper Sec. 3.1, SmoothQuant form; alpha 0.6 in the
                                                     reference run.sh); X -> X / s folded offline into the preceding
                                                     RMSNorm (q/k/v, gate/up), v_proj's rows (o) or up_proj's rows
                                                     (down), as the reference's smooth_ln_fcs / smooth_fc_fc do
    R1 = BlockDiag(R_1 .. R_K)                       each b x b block greedy (Sec. 3.2): N times, take the channel d
                                                     with the largest |x| of the block, rotate it by E_d R0 E_d (R0
                                                     orthogonal, row 0 uniform 1/sqrt(b), random on the rest); keep
                                                     the prefix of steps with the smallest max|x|
    P                                                zigzag permutation (Sec. 3.2): channels sorted by max|x R1|,
                                                     dealt to the K blocks 0..K-1, K-1..0, 0..K-1, ...
    R2                                               a second greedy block-diagonal rotation on X R1 P

    online  (block tap before the linears):  x -> x R1 P R2            (exactly orthogonal, applied in the tap)
    offline (merged in float64):             W -> W diag(s) R1 P R2    so  (x / s) M (W diag(s) M)^T = x W^T

Then weights by RTN (default: the reference's `run.sh` trains nothing, `--epochs 0`) or GPTQ on the transformed
inputs (`weight_method=gptq`, QuaRot's GPTQ settings); asymmetric per-channel weights and asymmetric per-token
activations with clip 0.9 (reference `--lac 0.9`). The reference's static weight clip `--swc 0.8` is available as
w_clip_ratio=0.8 but not the default: with RTN it doubles the W4A4 hidden error on tiny-llada (1.03 vs 0.47).
The greedy search runs on the `rotation_tokens` calibration tokens with the largest max|x| (the reference runs it
on the mean calibration sequence).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from fair_calib.models.block import DLLMBlock
from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.base import check_type
from fair_calib.quant.engine import BlockContext, Collector, freeze_linears
from fair_calib.quant.gptq import GPTQ
from fair_calib.quant.smoothquant import AbsMax, fold_linear_scale, fold_norm_scale, smoothing_scales
from fair_calib.registry import ConfigError, register

WEIGHT_METHODS = ("rtn", "gptq")
# (tap point, linears reading it; the first one's input is recorded), in the order the block is transformed
DUQUANT_GROUPS = (("attn_in", ("q", "k", "v")), ("attn_ctx", ("o",)), ("mlp_in", ("gate", "up")),
                  ("mlp_mid", ("down",)))
AUTO_BLOCK_MAX = 128  # block_size=auto: the largest divisor of the width up to the paper's 128


# ---- the transform ------------------------------------------------------------------------------------------------
def resolve_block_size(width: int, block_size: int | str, where: str = "") -> int:
    """Rotation block for an input of `width` channels: `auto` = the largest divisor of width <= 128; an integer is
    clipped to the width and must divide it."""
    if block_size == "auto":
        b = max(d for d in range(1, min(width, AUTO_BLOCK_MAX) + 1) if width % d == 0)
        if b < 2:
            raise ConfigError(f"quantizer=duquant: no rotation block 2..{AUTO_BLOCK_MAX} divides the width {width} "
                              f"of {where or 'an input'}; set quantizer.rotation_block_size to a divisor of it")
        return b
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ConfigError(f"quantizer.rotation_block_size={block_size!r}: must be auto or an integer >= 2, "
                          "e.g. quantizer.rotation_block_size=128")
    b = min(block_size, width)
    if width % b:
        raise ConfigError(f"quantizer.rotation_block_size={block_size} does not divide the width {width} of "
                          f"{where or 'an input'}; use a divisor of it or quantizer.rotation_block_size=auto")
    return b


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random n x n orthogonal matrix in float64 (QR of a Gaussian, columns sign-fixed by diag(R))."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)[None, :]


def spreading_rotation(b: int, generator: torch.Generator) -> Tensor:
    """Orthogonal R0 = diag(1, Q) H whose row 0 is 1/sqrt(b) everywhere: x R0 spreads channel 0 evenly over the block.

    H is the Householder reflection that maps e_0 to u = 1/sqrt(b) (1, ..., 1): H = I - 2 v v^T / (v^T v), v = e_0 - u;
    Q a random orthogonal (b-1) x (b-1) matrix mixing the other channels (the paper's R~ Q, Sec. 3.2)."""
    u = torch.full((b,), b ** -0.5, dtype=torch.float64)
    v = -u
    v[0] += 1.0
    h = torch.eye(b, dtype=torch.float64) - 2.0 * torch.outer(v, v) / v.dot(v)
    mix = torch.eye(b, dtype=torch.float64)
    mix[1:, 1:] = random_orthogonal(b - 1, generator)
    return mix @ h


def swap_channels(r: Tensor, d: int) -> Tensor:
    """E_d R E_d with E_d the permutation matrix exchanging channels 0 and d (row and column)."""
    idx = torch.arange(r.shape[0])
    idx[0], idx[d] = d, 0
    return r[idx][:, idx]


def greedy_rotation(x: Tensor, steps: int, generator: torch.Generator) -> tuple[Tensor, list[float]]:
    """The paper's greedy rotation of one block: x (T, b) -> R (b, b) float64 and the max|x R| after each step (index
    0 = before any step). Each step rotates the channel d holding the current largest |x| by E_d R0 E_d (one random
    R0 per search, as the reference's `rotation` draws one); the returned R is the product of the first k steps with
    the smallest max|x R| (k = 0 gives the identity). The search tracks x R in fp32; R is accumulated in float64."""
    b = x.shape[1]
    r0 = spreading_rotation(b, generator)
    acc = torch.eye(b, dtype=torch.float64)
    cur = x.to(torch.float32)
    if cur.numel() == 0:
        return acc, [0.0]
    col_max = cur.abs().amax(0)
    peaks = [float(col_max.max())]
    best, best_r = peaks[0], acc.clone()
    for _ in range(steps):
        if peaks[-1] == 0.0:
            break
        r = swap_channels(r0, int(col_max.argmax()))
        acc, cur = acc @ r, cur @ r.float()
        col_max = cur.abs().amax(0)
        peaks.append(float(col_max.max()))
        if peaks[-1] < best:
            best, best_r = peaks[-1], acc.clone()
    return best_r, peaks


def zigzag_permutation(channel_max: Tensor, block: int) -> Tensor:
    """perm (n,) with x[..., perm] grouping channels into n / block blocks of balanced outlier mass (paper Sec. 3.2):
    channels in descending max are dealt to blocks 0, 1, .., K-1, K-1, .., 0, 0, 1, ..; each block lists its channels
    in descending max. Position k of the permuted input holds channel perm[k]."""
    n = channel_max.numel()
    k = n // block
    order = torch.argsort(channel_max.detach().double().cpu(), descending=True, stable=True).tolist()
    blocks: list[list[int]] = [[] for _ in range(k)]
    for i, ch in enumerate(order):
        lap, pos = divmod(i, k)
        blocks[pos if lap % 2 == 0 else k - 1 - pos].append(ch)
    return torch.tensor([ch for blk in blocks for ch in blk], dtype=torch.long)


def _block_apply(x: Tensor, r: Tensor) -> Tensor:
    """x (..., K * b) times BlockDiag(r[0], .., r[K-1]), r (K, b, b)."""
    k, b, _ = r.shape
    return torch.einsum("...kb,kbc->...kc", x.reshape(*x.shape[:-1], k, b), r).reshape(x.shape)


class DuQuantTransform(nn.Module):
    """Online op x -> x R1 P R2 over the last dimension (R1, R2 block-diagonal orthogonal, P the zigzag permutation).

    Buffers are kept in float64; the op runs in float64 on float64 inputs (the offline weight merge) and in fp32
    otherwise (half-precision inputs are cast back)."""

    def __init__(self, r1: Tensor, perm: Tensor, r2: Tensor) -> None:
        super().__init__()
        self.register_buffer("r1", r1.to(torch.float64))
        self.register_buffer("perm", perm.to(torch.long))
        self.register_buffer("r2", r2.to(torch.float64))
        self.n = int(perm.numel())

    def extra_repr(self) -> str:
        return f"n={self.n} blocks={self.r1.shape[0]}x{self.r1.shape[1]}"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"DuQuantTransform(n={self.n}) got last dimension {x.shape[-1]}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = _block_apply(x.to(dtype), self.r1.to(dtype))[..., self.perm]
        return _block_apply(y, self.r2.to(dtype)).to(x.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        """x = y R2^T P^T R1^T (exact up to rounding: the op is orthogonal)."""
        dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
        z = _block_apply(y.to(dtype), self.r2.to(dtype).transpose(1, 2))
        x = torch.empty_like(z)
        x[..., self.perm] = z
        return _block_apply(x, self.r1.to(dtype).transpose(1, 2)).to(y.dtype)

    def matrix(self) -> Tensor:
        """The n x n orthogonal matrix M (x -> x M), float64."""
        return self(torch.eye(self.n, dtype=torch.float64))


def build_transform(x: Tensor, block: int, steps: int, generator: torch.Generator) -> tuple[DuQuantTransform, float]:
    """R1 (greedy per block) -> zigzag P on max|x R1| -> R2 (greedy per block) for smoothed tokens x (T, n);
    returns the transform and max|x M| (the peak it leaves)."""
    n = x.shape[1]
    x = x.to(torch.float64)

    def rotate_blocks(z: Tensor) -> Tensor:
        return torch.stack([greedy_rotation(z[:, i: i + block], steps, generator)[0] for i in range(0, n, block)])

    r1 = rotate_blocks(x)
    z = _block_apply(x, r1)
    perm = zigzag_permutation(z.abs().amax(0) if z.numel() else torch.zeros(n), block)
    z = z[:, perm]
    r2 = rotate_blocks(z)
    out = _block_apply(z, r2)
    return DuQuantTransform(r1, perm, r2), float(out.abs().max()) if out.numel() else 0.0


# ---- statistics ---------------------------------------------------------------------------------------------------
class PeakTokens:
    """Per-channel max|x| over tokens with weight > 0, and the `keep` tokens with the largest max|x| (float32)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.absmax = AbsMax()
        self.tokens: Tensor | None = None

    @torch.no_grad()
    def add(self, x: Tensor, w: Tensor) -> None:
        self.absmax.add(x, w)
        rows = x.reshape(-1, x.shape[-1])[w.reshape(-1) > 0].float()
        if rows.numel() == 0:
            return
        pool = rows if self.tokens is None else torch.cat([self.tokens, rows])
        if pool.shape[0] > self.keep:
            pool = pool[pool.abs().amax(1).topk(self.keep).indices]
        self.tokens = pool


# ---- smoothing folds ----------------------------------------------------------------------------------------------
def _kv_group(t: Tensor, n_kv: int, rep: int, head_dim: int) -> Tensor:
    """(..., n_kv * rep * head_dim) -> (..., n_kv * head_dim) max over the query heads sharing a KV head."""
    return t.reshape(*t.shape[:-1], n_kv, rep, head_dim).amax(-2).reshape(*t.shape[:-1], n_kv * head_dim)


@torch.no_grad()
def smooth_attention_output(block: DLLMBlock, act_absmax: Tensor, alpha: float, min_scale: float) -> Tensor:
    """Smoothing of o_proj's input folded into v_proj (attention is linear in V per channel): with GQA one scale per
    KV channel, shared by the query heads that read it. v rows (and bias) /= t, o columns *= t expanded; returns the
    (n_heads * head_dim,) scale of the o_proj input."""
    v, o = block.role("v"), block.role("o")
    n_kv, hd = block.n_kv_heads, block.head_dim
    rep = block.n_heads // n_kv
    w = o.weight.detach().abs().double()  # (out, heads * hd)
    w_cols = w.reshape(w.shape[0], n_kv, rep, hd).permute(0, 2, 1, 3).reshape(w.shape[0] * rep, n_kv * hd)
    t = smoothing_scales(_kv_group(act_absmax.double(), n_kv, rep, hd), [w_cols], alpha, min_scale)
    t = t.to(v.weight.device)
    v.weight.data = (v.weight.double() / t[:, None]).to(v.weight.dtype)
    if v.bias is not None:
        v.bias.data = (v.bias.double() / t).to(v.bias.dtype)
    s = t.reshape(n_kv, 1, hd).expand(n_kv, rep, hd).reshape(-1)
    o.weight.data = (o.weight.double() * s.to(o.weight.device)[None, :]).to(o.weight.dtype)
    return s


@torch.no_grad()
def smooth_group(block: DLLMBlock, point: str, act_absmax: Tensor, alpha: float, min_scale: float) -> Tensor:
    """Fold the smoothing of one input group into the op before it (norm, v_proj or up_proj); returns s."""
    if point == "attn_ctx":
        return smooth_attention_output(block, act_absmax, alpha, min_scale)
    roles = dict(DUQUANT_GROUPS)[point]
    linears = [block.role(r) for r in roles]
    s = smoothing_scales(act_absmax, [lin.weight for lin in linears], alpha, min_scale)
    if point == "mlp_mid":  # down_proj input = silu(gate) * up: scale up_proj's output rows
        fold_linear_scale(block.role("up"), linears[0], s)
    else:
        fold_norm_scale(block.role("attn_norm" if point == "attn_in" else "mlp_norm"), linears, s)
    return s


@torch.no_grad()
def merge_transform(linears: list[nn.Module], transform: DuQuantTransform) -> None:
    """W -> W M for every linear reading the transformed input (the op applied to W's rows, float64)."""
    for lin in linears:
        w = transform.to(lin.weight.device)(lin.weight.double())
        lin.weight.data = w.to(lin.weight.dtype)


# ---- the quantizer ------------------------------------------------------------------------------------------------
@register("quantizer", "duquant")
class DuQuant(GPTQ):
    """Smoothing + greedy block rotation + zigzag permutation + rotation per input group, then RTN (or GPTQ) weights
    and per-token activations. GPTQ settings (reference, blocksize, percdamp, ...) and engine settings pass through;
    propagate defaults to "fp" with RTN (statistics of the FP model, as the reference's act_scales) and "weights"
    with GPTQ (as QuaRot)."""

    name = "duquant"

    def __init__(self, weight_method: str = "rtn", alpha: float = 0.6, smooth: bool = True,
                 rotation_block_size: int | str = "auto", rotation_steps: int = 256, rotation_tokens: int = 512,
                 rotation_seed: int = 0, min_scale: float = 1e-5, reference: str | None = None,
                 propagate: str | None = None, w_symmetric: bool = False, a_symmetric: bool = False,
                 a_clip_ratio: float = 0.9, w_clip_ratio: float = 1.0, **kwargs: Any) -> None:
        if weight_method not in WEIGHT_METHODS:
            raise ConfigError(f"quantizer=duquant weight_method {weight_method!r} unknown; "
                              f"valid: {', '.join(WEIGHT_METHODS)}")
        for key, value, kind, example in (("alpha", alpha, "float", 0.6), ("smooth", smooth, "bool", True),
                                          ("rotation_steps", rotation_steps, "int", 256),
                                          ("rotation_tokens", rotation_tokens, "int", 512),
                                          ("rotation_seed", rotation_seed, "int", 0),
                                          ("min_scale", min_scale, "float", 1e-5)):
            check_type(f"quantizer.{key}", value, kind, example)
        if rotation_block_size != "auto":  # type and >= 2 now; divisibility once the model's widths are known
            resolve_block_size(2, rotation_block_size)
        if not 0.0 <= alpha <= 1.0 or min_scale <= 0 or rotation_steps < 0 or rotation_tokens < 1:
            raise ConfigError(f"quantizer=duquant needs 0 <= alpha <= 1, min_scale > 0, rotation_steps >= 0, "
                              f"rotation_tokens >= 1; got {alpha}, {min_scale}, {rotation_steps}, {rotation_tokens}")
        super().__init__(reference=reference or "quarot",
                         propagate=propagate or ("fp" if weight_method == "rtn" else "weights"),
                         w_symmetric=w_symmetric, a_symmetric=a_symmetric, a_clip_ratio=a_clip_ratio,
                         w_clip_ratio=w_clip_ratio, **kwargs)
        self.weight_method, self.smooth, self.alpha, self.min_scale = weight_method, bool(smooth), float(alpha), \
            float(min_scale)
        self.block_size, self.rotation_steps, self.rotation_tokens = rotation_block_size, rotation_steps, \
            rotation_tokens
        self.rotation_seed = rotation_seed
        self._stats: dict[str, PeakTokens] = {}
        self._blocks: dict[str, int] = {}
        self._time_s = 0.0

    @property
    def label(self) -> str:
        """WxAy(KVz) with RTN weights (the reference's setting); '-gptq' appended for GPTQ weights."""
        return self.bits.label + ("-gptq" if self.weight_method == "gptq" else "")

    def prepare_model(self, model: DiffusionLM, calib: Any) -> None:
        """Check every rotation block size before any weight changes, then wrap the linears (and K/V quantizers)."""
        block = model.blocks[0]
        self._blocks = {point: resolve_block_size(block.role(roles[0]).in_features, self.block_size, point)
                        for point, roles in DUQUANT_GROUPS}
        self._time_s = 0.0
        super().prepare_model(model, calib)

    def collect(self, block: nn.Module, ctx: BlockContext) -> dict[str, Collector]:
        self._stats = {point: PeakTokens(self.rotation_tokens) for point, _ in DUQUANT_GROUPS}
        return {roles[0]: self._stats[point].add for point, roles in DUQUANT_GROUPS}

    def transform_block(self, block: DLLMBlock, index: int) -> dict[str, Any]:
        """Smoothing folded, rotations built, online ops installed in the taps, weights merged (function-preserving)."""
        t0 = time.perf_counter()
        extras: dict[str, Any] = {}
        for gi, (point, roles) in enumerate(DUQUANT_GROUPS):
            stat = self._stats[point]
            if stat.absmax.value is None or stat.tokens is None:
                raise ConfigError("duquant: every calibration token has weight 0; check the token weights")
            linears = [block.role(r) for r in roles]
            tokens = stat.tokens.double()
            if self.smooth:
                s = smooth_group(block, point, stat.absmax.value, self.alpha, self.min_scale)
                tokens = tokens / s.to(tokens.device)
            gen = torch.Generator().manual_seed(self.rotation_seed * 1_000_003 + index * 16 + gi)
            transform, peak = build_transform(tokens.cpu(), self._blocks[point], self.rotation_steps, gen)
            merge_transform(linears, transform)
            block.taps[point] = transform.to(linears[0].weight.device)
            extras[f"{point}_peak_smoothed"] = float(tokens.abs().max())
            extras[f"{point}_peak_rotated"] = peak
        self._stats = {}
        extras["transform_s"] = time.perf_counter() - t0
        self._time_s += extras["transform_s"]
        return extras

    def quantize_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, Any]:
        extras = self.transform_block(block, ctx.index)
        if self.weight_method == "rtn" or not self.bits.weight_spec().enabled:
            freeze_linears(block)
            return extras
        ctx.run(self._collectors(block, self.groups[0], ctx.device))  # Hessians of the transformed inputs
        return {**extras, **super().quantize_block(block, ctx)}

    def finalize(self, model: DiffusionLM) -> dict[str, Any]:
        return {"weight_method": self.weight_method, "rotation_blocks": dict(self._blocks),
                "rotation_steps": self.rotation_steps, "alpha": self.alpha if self.smooth else None,
                "transform_s": self._time_s}
