"""SmoothQuant (Xiao et al. 2023; DESIGN 4.4): migrate activation outliers into the weights, then RTN.

Per block, from the FP calibration pass: per-channel activation abs-max max|X_j| of the q/k/v input
(after attn_norm) and of the gate/up input (after mlp_norm), over tokens with weight > 0. Then

    s_j = clamp( max|X_j|^alpha / max|W_j|^(1 - alpha), min_scale )

with max|W_j| the largest |weight| in input column j over the following linears (clamped at
min_scale). The norm's weight is divided by s and the linears' input columns multiplied by s (in
float64, then cast), which leaves the FP function unchanged: norm(x) / s @ (W * s)^T = norm(x) @ W^T.
Finally every linear is RTN-quantized (W8A8 by default; W4A4 with w_bits=a_bits=4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fair_calib.models.block import NORM_BEFORE, tap_readers
from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.engine import BlockContext, Collector, LayerwiseMethod, freeze_linears
from fair_calib.registry import ConfigError, register

# (norm role, linears after it, the role whose input is recorded)
SMOOTH_GROUPS = tuple((norm, tap_readers(tap), tap_readers(tap)[0]) for tap, norm in NORM_BEFORE.items())


class AbsMax:
    """Per-channel max |x| over tokens with weight > 0 (zero-weight tokens, e.g. padding, do not count)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    @torch.no_grad()
    def add(self, x: Tensor, w: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])[w.reshape(-1) > 0]
        if x.numel() == 0:
            return
        m = x.abs().float().amax(0)
        self.value = m if self.value is None else torch.maximum(self.value, m)


def smoothing_scales(act_absmax: Tensor, weights: Sequence[Tensor], alpha: float = 0.5,
                     min_scale: float = 1e-5) -> Tensor:
    """s_j = clamp(max|X_j|^alpha / clamp(max_k max_o |W_k[o, j]|, min_scale)^(1 - alpha), min_scale), float64."""
    w_max = torch.stack([w.detach().abs().double().amax(0) for w in weights]).amax(0).clamp(min=min_scale)
    a_max = act_absmax.detach().double().to(w_max.device)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=min_scale)


@torch.no_grad()
def fold_norm_scale(norm: nn.Module, linears: Sequence[nn.Module], s: Tensor) -> None:
    """norm.weight /= s and each linear's input columns *= s, in float64 (the FP function is unchanged)."""
    s = s.double().to(norm.weight.device)
    norm.weight.data = (norm.weight.double() / s).to(norm.weight.dtype)
    for lin in linears:
        lin.weight.data = (lin.weight.double() * s[None, :]).to(lin.weight.dtype)


@torch.no_grad()
def fold_linear_scale(prev: nn.Module, nxt: nn.Module, s: Tensor) -> None:
    """prev's output rows (and bias) /= s, nxt's input columns *= s, in float64 (exact when nothing nonlinear
    sits between them, or only an elementwise product with another branch, as up_proj in SwiGLU)."""
    s = s.double().to(prev.weight.device)
    prev.weight.data = (prev.weight.double() / s[:, None]).to(prev.weight.dtype)
    if getattr(prev, "bias", None) is not None:
        prev.bias.data = (prev.bias.double() / s).to(prev.bias.dtype)
    nxt.weight.data = (nxt.weight.double() * s[None, :]).to(nxt.weight.dtype)


@register("quantizer", "smoothquant")
class SmoothQuant(LayerwiseMethod):
    """Smoothing of the two norm -> linears pairs per block, then round-to-nearest (W8A8 default)."""

    name = "smoothquant"
    default_propagate = "fp"  # statistics of the FP model, as the reference collects them in one FP pass

    def __init__(self, alpha: float = 0.5, min_scale: float = 1e-5, freeze_weights: bool = True,
                 w_bits: int = 8, a_bits: int = 8, **kwargs: Any) -> None:
        super().__init__(w_bits=w_bits, a_bits=a_bits, **kwargs)
        if not 0.0 <= alpha <= 1.0 or min_scale <= 0:
            raise ConfigError(f"quantizer=smoothquant needs 0 <= alpha <= 1 and min_scale > 0; "
                              f"got {alpha}, {min_scale}")
        self.alpha, self.min_scale, self.freeze_weights = float(alpha), float(min_scale), bool(freeze_weights)
        self._stats: dict[str, AbsMax] = {}

    def prepare_model(self, model: DiffusionLM, calib: Any) -> None:
        super().prepare_model(model, calib)

    def collect(self, block: nn.Module, ctx: BlockContext) -> dict[str, Collector]:
        self._stats = {role: AbsMax() for _, _, role in SMOOTH_GROUPS}
        return {role: stat.add for role, stat in self._stats.items()}

    def quantize_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        for norm_role, roles, stat_role in SMOOTH_GROUPS:
            act = self._stats[stat_role].value
            if act is None:
                raise ConfigError("smoothquant: every calibration token has weight 0; check the token weights")
            linears = [block.role(r) for r in roles]
            s = smoothing_scales(act, [lin.weight for lin in linears], self.alpha, self.min_scale)
            fold_norm_scale(block.role(norm_role), linears, s)
            extras[f"{norm_role}_scale_min"], extras[f"{norm_role}_scale_max"] = float(s.min()), float(s.max())
        self._stats = {}
        if self.freeze_weights:
            freeze_linears(block)
        return extras
