"""RTN (round-to-nearest, DESIGN 4.2) and the full-precision reference."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.base import Quantizer
from fair_calib.quant.qlinear import install_kv_quantizers, wrap_block_linears
from fair_calib.registry import register


@register("quantizer", "fp")
class FullPrecision(Quantizer):
    """No quantization: the teacher itself."""

    def __init__(self, **_: Any) -> None:
        super().__init__(w_bits=16, a_bits=16)

    @property
    def label(self) -> str:
        return "FP"

    def quantize(self, model: DiffusionLM, calib: Any = None, token_weights: Tensor | None = None) -> dict[str, Any]:
        return {}


@register("quantizer", "rtn")
class RTN(Quantizer):
    """Every block linear: weights rounded to the nearest grid point, activations quantized per token on the fly."""

    def quantize(self, model: DiffusionLM, calib: Any = None, token_weights: Tensor | None = None) -> dict[str, Any]:
        layers = wrap_block_linears(model, self.bits.weight_spec(), self.bits.act_spec())
        for q in layers:
            q.freeze()
        install_kv_quantizers(model, self.bits.kv_spec())
        return {"layers": len(layers)}
