"""The fake-quant linear every method uses: optional online input transform, per-token activation
quantization, per-channel / per-group weight quantization, learnable clipping, straight-through rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fair_calib.errors import NonFiniteWeightError
from fair_calib.quant.grids import QuantSpec, fake_quant_lastdim, fake_quant_weight


class QLinear(nn.Module):
    """y = Q_a(x) @ Q_w(W)^T + b (online transforms of the input live in the block taps, not here).

    - `act_clip_logit`: learnable activation clipping, ratio = sigmoid(logit) (FlatQuant); when None,
      `a_spec.clip_ratio` is used (QuaRot's fixed 0.9).
    - `weight_clip_logit` (out, 1): learnable per-output-channel weight clipping.
    - `quant_enabled=False` switches both quantizers off (the debug invariant: transformed == FP).
    """

    def __init__(self, linear: nn.Linear, w_spec: QuantSpec, a_spec: QuantSpec, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.w_spec, self.a_spec = w_spec, a_spec
        self.name = name
        self.act_clip_logit: nn.Parameter | None = None
        self.weight_clip_logit: nn.Parameter | None = None
        self.quant_enabled = True
        self.weight_frozen = False  # True once `weight` already holds grid values (GPTQ, freeze())

    def extra_repr(self) -> str:
        return (f"{self.name or ''} in={self.in_features} out={self.out_features} "
                f"W{self.w_spec.bits if self.w_spec.enabled else 16}A{self.a_spec.bits if self.a_spec.enabled else 16}")

    def act_clip(self) -> Tensor | float | None:
        return torch.sigmoid(self.act_clip_logit) if self.act_clip_logit is not None else None

    def weight_clip(self) -> Tensor | float | None:
        return torch.sigmoid(self.weight_clip_logit) if self.weight_clip_logit is not None else None

    def quantized_weight(self) -> Tensor:
        if not self.quant_enabled or self.weight_frozen or not self.w_spec.enabled:
            return self.weight
        return fake_quant_weight(self.weight, self.w_spec, self.weight_clip())

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.quant_enabled and self.a_spec.enabled:
            x = fake_quant_lastdim(x, self.a_spec, self.act_clip())
        return x

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)

    @torch.no_grad()
    def freeze(self) -> None:
        """Write the fake-quantized weight into `weight` (so evaluation does not re-quantize each call)."""
        w = self.quantized_weight().detach()
        check_finite(w, self.name)
        self.weight.data.copy_(w)
        self.weight_clip_logit = None
        self.weight_frozen = True


def check_finite(w: Tensor, name: str) -> None:
    if not torch.isfinite(w).all():
        raise NonFiniteWeightError(f"non-finite values in the quantized weight of layer {name or '<unnamed>'}; "
                                   "lower the learning rate or raise the damping for this method")


def wrap_block_linears(model: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec) -> list[QLinear]:
    """Replace every linear inside the transformer blocks by a QLinear (embeddings and LM head stay FP)."""
    wrapped = []
    for i, block in enumerate(model.blocks):
        for role, lin in block.linears().items():
            q = lin if isinstance(lin, QLinear) else QLinear(lin, w_spec, a_spec, name=f"blocks.{i}.{role}")
            if not isinstance(lin, QLinear):
                block.set_role(role, q)
            wrapped.append(q)
    return wrapped


def qlinears(model: nn.Module) -> list[QLinear]:
    return [m for m in model.modules() if isinstance(m, QLinear)]


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for m in qlinears(model):
        m.quant_enabled = enabled
    for m in model.modules():
        if isinstance(m, ActQuantizer):
            m.enabled = enabled


class ActQuantizer(nn.Module):
    """Per-row fake quantization over the last dimension as a module (KV per token per head, online taps)."""

    def __init__(self, spec: QuantSpec, learnable_clip: bool = False, clip_init: float = 4.0) -> None:
        super().__init__()
        self.spec = spec
        self.clip_logit = nn.Parameter(torch.tensor(clip_init)) if learnable_clip else None
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        clip = torch.sigmoid(self.clip_logit) if self.clip_logit is not None else None
        return fake_quant_lastdim(x, self.spec, clip)


def install_kv_quantizers(model: nn.Module, spec: QuantSpec) -> int:
    """Quantize keys (after RoPE) and values per token per head through the block taps; returns #blocks."""
    if not spec.enabled:
        return 0
    for block in model.blocks:
        block.taps["k_rope"] = ActQuantizer(spec)
        block.taps["v_heads"] = ActQuantizer(spec)
    return len(model.blocks)
