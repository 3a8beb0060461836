"""QuaRot (DESIGN 4.5): rotate the model with Hadamards so activations lose their outliers, then quantize.

1. Rotation (``fair_calib.quant.rotation``, exact in full precision): RMSNorm weights fused into the following
   linears, residual stream rotated by a random Hadamard ``Q`` (embeddings and LM head rotated, kept FP),
   V/O per-head Hadamard, online Hadamards before o_proj and down_proj (and on Q/K after RoPE with KV quantization).
2. Every block linear becomes a QLinear: activations per token, symmetric, clip ratio 0.9 (``a_clip_ratio``);
   weights by GPTQ (layer-wise on the rotated model, Hessians of the rotated inputs) or RTN.
3. KV cache (``kv_bits < 16``): K after RoPE and the online ``H_hd``, V after the offline per-head Hadamard, both
   per token per head, asymmetric, clip ratio 0.95 (``kv_clip_ratio``).
"""

from __future__ import annotations

import time
from typing import Any

from torch import Tensor, nn

from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.gptq import GPTQ
from fair_calib.quant.grids import QuantSpec
from fair_calib.quant.qlinear import ActQuantizer, set_quant_enabled, wrap_block_linears
from fair_calib.quant.rotation import O_MODES, rotate_model
from fair_calib.registry import ConfigError, register

WEIGHT_METHODS = ("gptq", "rtn")


def install_quarot_kv_quantizers(model: DiffusionLM, spec: QuantSpec) -> int:
    """K quantized after its online Hadamard (k_rope tap -> Sequential(H_hd, Q)); V per head (v_heads tap)."""
    if not spec.enabled:
        return 0
    for block in model.blocks:
        block.taps["k_rope"] = nn.Sequential(block.taps["k_rope"], ActQuantizer(spec))
        block.taps["v_heads"] = ActQuantizer(spec)
    return len(model.blocks)


@register("quantizer", "quarot")
class QuaRot(GPTQ):
    """Hadamard rotations, then weights by GPTQ (layer-wise engine) or RTN; A per token (clip 0.9), KV asym (0.95).

    GPTQ settings (blocksize, percdamp, act_order, static_groups, true_sequential, max_damp_retries) and engine
    settings (propagate, default "weights" as in QuaRot's GPTQ; batch_size, device, offload, ...) pass through.
    """

    name = "quarot"

    def __init__(self, weight_method: str = "gptq", rotation_seed: int = 0, o_hadamard: str = "auto",
                 a_clip_ratio: float = 0.9, kv_clip_ratio: float = 0.95, **kwargs: Any) -> None:
        super().__init__(a_clip_ratio=a_clip_ratio, kv_clip_ratio=kv_clip_ratio, **kwargs)
        if weight_method not in WEIGHT_METHODS:
            raise ConfigError(f"quarot weight_method {weight_method!r} unknown; valid: {', '.join(WEIGHT_METHODS)}")
        if o_hadamard not in O_MODES:
            raise ConfigError(f"quarot o_hadamard {o_hadamard!r} unknown; valid: {', '.join(O_MODES)}")
        self.weight_method = weight_method
        self.rotation_seed = int(rotation_seed)
        self.o_hadamard = o_hadamard
        self.requires_calibration = weight_method == "gptq" and self.bits.w_bits < 16
        self.uses_token_weights = self.requires_calibration  # GPTQ weights: weighted Hessian; RTN: no data
        self._rotation: dict[str, Any] = {}

    @property
    def label(self) -> str:
        """WxAy(KVz) for QuaRot with GPTQ weights (the paper's baseline); '-rtn' appended for RTN weights."""
        return self.bits.label + ("-rtn" if self.weight_method == "rtn" else "")

    def rotate(self, model: DiffusionLM) -> dict[str, Any]:
        """Step 1 only: the rotated FP model with its online Hadamards (function-preserving)."""
        t0 = time.perf_counter()
        try:
            info = rotate_model(model, self.rotation_seed, self.o_hadamard, rotate_qk=self.bits.kv_spec().enabled,
                                progress=self.engine.progress)
        except ValueError as err:
            raise ConfigError(f"quantizer=quarot: {err}") from err
        info["rotate_s"] = round(time.perf_counter() - t0, 3)
        return info

    def prepare_model(self, model: DiffusionLM, calib: Any) -> None:
        """Engine hook: rotate, wrap the block linears (A per token, clip 0.9), install the K/V quantizers."""
        self._rotation = self.rotate(model)
        wrap_block_linears(model, self.bits.weight_spec(), self.bits.act_spec())
        self._rotation["kv_quantized_blocks"] = install_quarot_kv_quantizers(model, self.bits.kv_spec())

    def finalize(self, model: DiffusionLM) -> dict[str, Any]:
        return {"rotation": self._rotation, "weight_method": self.weight_method}

    def quantize(self, model: DiffusionLM, calib: Any = None, token_weights: Tensor | None = None) -> dict[str, Any]:
        if self.requires_calibration:
            return super().quantize(model, calib, token_weights)
        t0 = time.perf_counter()
        self.setup(model, calib)
        layers = [q for block in model.blocks for q in block.linears().values()]
        for q in layers:
            q.freeze()
        set_quant_enabled(model, True)
        return {"method": self.name, "bits": self.label, "layers": len(layers),
                "time_s": time.perf_counter() - t0, **self.finalize(model)}
