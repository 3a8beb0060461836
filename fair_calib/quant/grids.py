"""Uniform quantization grids (DESIGN 4.1) as pure functions, with a straight-through estimator.

Symmetric INT-b:   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),  x_hat = s * q
    scale convention "absmax":   s = clip * absmax / (2^(b-1) - 1)           (QuaRot, SmoothQuant, FlatQuant)
    scale convention "halfstep": s = 2 * clip * absmax / (2^b - 1)           (IST-GPTQ, compressed-tensors)
Asymmetric INT-b:  s = clip * (max - min) / (2^b - 1), z = round(-min / s),
                   q = clamp(round(x / s) + z, 0, 2^b - 1),  x_hat = s * (q - z)
Clipping pair (FlatQuant): the row range is [min(min x, 0) * lo, max(max x, 0) * hi] with two ratios
    (lo, hi) = (sigmoid(logit_lo), sigmoid(logit_hi)); symmetric grids use absmax = max(|x_min|, x_max).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fair_calib.errors import ConfigError

SCALE_CONVENTIONS = ("absmax", "halfstep")
WEIGHT_GRANULARITIES = ("channel", "group", "tensor")
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer's grid. bits >= 16 means "leave in full precision"."""

    bits: int = 16
    symmetric: bool = True
    scale_convention: str = "absmax"
    granularity: str = "channel"  # weights: channel | group | tensor; activations are always per token
    group_size: int = 128
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.scale_convention not in SCALE_CONVENTIONS:
            raise ValueError(f"scale_convention {self.scale_convention!r} unknown; "
                             f"valid: {', '.join(SCALE_CONVENTIONS)}")
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} unknown; valid: {', '.join(WEIGHT_GRANULARITIES)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def check_bits(bits: int) -> None:
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bit width {bits} is out of range: use {MIN_BITS}..{MAX_BITS} (16 = full precision)")


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def sym_scale(absmax: Tensor, bits: int, convention: str = "absmax") -> Tensor:
    if convention == "absmax":
        s = absmax / (2 ** (bits - 1) - 1)
    elif convention == "halfstep":
        s = 2 * absmax / (2**bits - 1)
    else:
        raise ValueError(f"scale_convention {convention!r} unknown; valid: {', '.join(SCALE_CONVENTIONS)}")
    return s.clamp(min=1e-8)


def asym_scale_zero(xmin: Tensor, xmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of a grid that contains 0, min and max."""
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    s = ((xmax - xmin) / (2**bits - 1)).clamp(min=1e-8)
    z = round_ste(-xmin / s).clamp(0, 2**bits - 1)
    return s, z


def quantize_sym(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer codes (as float) of the symmetric grid."""
    return torch.clamp(round_ste(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def quantize_asym(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return torch.clamp(round_ste(x / scale) + zero, 0, 2**bits - 1)


def fake_quant_lastdim(x: Tensor, spec: QuantSpec, clip: Tensor | float | None = None) -> Tensor:
    """Quantize-dequantize with one scale per row of the last dimension (per token, or per output channel).

    `clip` multiplies the range (a learnable clipping factor after its sigmoid, or a fixed ratio);
    by default spec.clip_ratio.
    """
    if not spec.enabled:
        return x
    c = spec.clip_ratio if clip is None else clip
    if spec.symmetric:
        absmax = x.abs().amax(dim=-1, keepdim=True) * c
        s = sym_scale(absmax, spec.bits, spec.scale_convention)
        # "halfstep" is IST-GPTQ's zero point 2^(b-1) on unsigned codes: the same signed code range
        return quant_dequant(x, s, None, spec)
    s, z = asym_scale_zero(x.amin(dim=-1, keepdim=True) * c, x.amax(dim=-1, keepdim=True) * c, spec.bits)
    return quant_dequant(x, s, z, spec)


def fake_quant_weight(w: Tensor, spec: QuantSpec, clip: Tensor | float | None = None) -> Tensor:
    """Weight (out, in) quantize-dequantize per output channel, per group of `group_size` inputs, or per tensor."""
    if not spec.enabled:
        return w
    out_f, in_f = w.shape
    if spec.granularity == "channel":
        return fake_quant_lastdim(w, spec, clip)
    if spec.granularity == "tensor":
        return fake_quant_lastdim(w.reshape(1, -1), spec, clip).reshape(out_f, in_f)
    g = spec.group_size
    if in_f % g:
        raise ValueError(f"group_size {g} does not divide the input size {in_f}; pick a divisor or granularity=channel")
    if isinstance(clip, Tensor) and clip.dim() == 2:  # per-channel clip -> per group rows
        clip = clip.repeat_interleave(in_f // g, dim=0)
    return fake_quant_lastdim(w.reshape(-1, g), spec, clip).reshape(out_f, in_f)


def weight_scale_zero(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Per-row (channel or group row) scale and zero of a weight block (used by GPTQ column by column)."""
    if spec.symmetric:
        absmax = w.abs().amax(dim=-1, keepdim=True) * spec.clip_ratio
        return sym_scale(absmax, spec.bits, spec.scale_convention), None
    return asym_scale_zero(w.amin(dim=-1, keepdim=True) * spec.clip_ratio,
                           w.amax(dim=-1, keepdim=True) * spec.clip_ratio, spec.bits)


def quant_dequant(x: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec, out: Tensor | None = None) -> Tensor:
    """Quantize-dequantize with a given scale (and zero), written into `out` when given: every fake quantizer's last
    step (and the one GPTQ applies to a column). Differentiable (straight-through) when x or the scale needs a
    gradient; otherwise in place, with the same values and signs of zeros: round_ste's forward (r - x) + x is
    exactly r = round(x) (r - x is exact by Sterbenz's lemma, or -x when r = 0), except that it turns -0 into +0,
    which `+ 0.0` does here.
    """
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        y = quantize_sym(x, scale, spec.bits) * scale if zero is None else \
            (quantize_asym(x, scale, zero, spec.bits) - zero) * scale
        return y if out is None else out.copy_(y)
    r = torch.div(x, scale, out=out).round_()
    if zero is None:
        return r.add_(0.0).clamp_(spec.qmin, spec.qmax).mul_(scale)
    return r.add_(zero).clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)


# ---- FlatQuant's clipping pair -------------------------------------------------------------------------------
def clip_pair_range(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(x_min, x_max) = (min(min_j x_j, 0) * lo, max(max_j x_j, 0) * hi)`` per row (last dim), ratios ``lo, hi``."""
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * lo
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * hi
    return xmin, xmax


def clip_pair_clamp(w: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """FlatQuant's learnable weight clipping alone (``apply_wclip``): each row clamped to its clipping-pair range
    with ratios ``sigmoid(lo), sigmoid(hi)``."""
    wmin, wmax = clip_pair_range(w, torch.sigmoid(lo), torch.sigmoid(hi))
    return torch.clamp(w, min=wmin, max=wmax)


def fake_quant_clip_pair(x: Tensor, spec: QuantSpec, lo: Tensor | None, hi: Tensor | None,
                         clamp: bool = False) -> Tensor:
    """Per-row (last dim) quantize-dequantize on the clipping-pair range with ratios ``sigmoid(lo), sigmoid(hi)``
    (logits ``None``: the fixed ``spec.clip_ratio`` on both sides). ``clamp`` first clips ``x`` to the range
    (FlatQuant's learnable weight clipping). Rounding is straight-through."""
    if not spec.enabled:
        return x
    if hi is None or lo is None:
        xmin, xmax = clip_pair_range(x, spec.clip_ratio, spec.clip_ratio)
    else:
        xmin, xmax = clip_pair_range(x, torch.sigmoid(lo), torch.sigmoid(hi))
    if clamp:
        x = torch.clamp(x, min=xmin, max=xmax)
    if spec.symmetric:
        s = sym_scale(torch.maximum(xmin.abs(), xmax), spec.bits, spec.scale_convention)
        return quant_dequant(x, s, None, spec)
    s, z = asym_scale_zero(xmin, xmax, spec.bits)
    return quant_dequant(x, s, z, spec)


def fake_quant_weight_clip_pair(w: Tensor, spec: QuantSpec, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    """Weight (out, in) fake quantization per output channel or per group, with per-channel clipping logits (out, 1)
    (clamped first, as FlatQuant's weight quantizer does)."""
    if not spec.enabled:
        return w
    if spec.granularity == "channel":
        return fake_quant_clip_pair(w, spec, lo, hi, clamp=True)
    if spec.granularity != "group":
        raise ConfigError(f"flatquant quantizes weights per channel or per group, not w_granularity={spec.granularity}")
    out_f, in_f = w.shape
    g = spec.group_size
    if in_f % g:
        raise ConfigError(f"group_size {g} does not divide the input size {in_f}; "
                          "pick a divisor or w_granularity=channel")
    rep = in_f // g
    lo_g = None if lo is None else lo.repeat_interleave(rep, dim=0)
    hi_g = None if hi is None else hi.repeat_interleave(rep, dim=0)
    return fake_quant_clip_pair(w.reshape(-1, g), spec, lo_g, hi_g, clamp=True).reshape(out_f, in_f)
