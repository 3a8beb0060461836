"""Certainty-guided token weights (DLLMQuant's CGQ, Xu & Yang, arXiv 2508.14090; DESIGN section 10).

CGQ weights GPTQ's error compensation by each calibration token's mask status and the FP teacher's
confidence in its prediction there:

    H = (X ⊙ m)(X ⊙ m)^T,   m_i = lambda * 1[x_i = MASK] + sqrt(c_i)

so token i enters the Hessian with weight

    w_i = m_i^2 = (lambda * 1[x_i = MASK] + sqrt(c_i))^2            (CGQ; then H = sum_i w_i x_i x_i^T)

with c_i the teacher's top-1 probability at position i on the calibration input (softmax in fp32, the mask
token excluded as the samplers exclude it) and lambda the weight of the mask indicator (`mask_weight`).
Masked tokens the teacher is sure of dominate (they are committed at the next steps); unmasked and
low-confidence tokens count little. The weights are normalized to mean 1 over the real tokens (padding 0):
GPTQ's H = 2 S / sum w and the weighted block losses divide by sum w, so the scale changes nothing there and
mean 1 matches the other weightings. On teacher-forced rows (nothing masked) w_i = c_i, up to that scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fair_calib.decoding.base import forward_logits
from fair_calib.registry import ConfigError, register
from fair_calib.weighting.weights import Uniform

if TYPE_CHECKING:
    from fair_calib.data.calibration import CalibrationSet
    from fair_calib.models.dllm import DiffusionLM
    from fair_calib.prior.position_prior import PositionPrior


def certainty_weights(masked: Tensor, confidence: Tensor, mask_weight: float = 1.0) -> Tensor:
    """(lambda * 1[masked] + sqrt(c))^2 per token (CGQ), float32, not normalized."""
    m = mask_weight * masked.float() + confidence.float().clamp(0.0, 1.0).sqrt()
    return m * m


@torch.no_grad()
def teacher_confidence(teacher: DiffusionLM, input_ids: Tensor, attention_mask: Tensor | None,
                       batch_size: int = 8) -> Tensor:
    """(N, L) float32 top-1 probability of the teacher at every position of the (possibly masked) inputs:
    exp(max logit - logsumexp logits) in fp32, the mask token excluded; one batched forward, no grad."""
    device = teacher.device
    out = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start: start + batch_size].to(device)
        attn = torch.ones_like(ids) if attention_mask is None else attention_mask[start: start + batch_size].to(device)
        logits = forward_logits(teacher, ids, attn).float()
        out.append((logits.amax(-1) - torch.logsumexp(logits, -1)).exp().cpu())
    return torch.cat(out)


@register("weighting", "certainty")
class Certainty(Uniform):
    """w_i = (lambda * 1[masked] + sqrt(c_i))^2 from the FP teacher on the calibration inputs, mean 1 over real
    tokens. Needs no prior; its per-position view (prior plots, diagnostics) is flat, as uniform's."""

    name = "certainty"
    needs_prior = False
    needs_teacher = True

    def __init__(self, mask_weight: float = 1.0, batch_size: int = 8, floor: float = 0.05) -> None:
        super().__init__(floor)
        if isinstance(mask_weight, bool) or not isinstance(mask_weight, int | float) or mask_weight < 0:
            raise ConfigError(f"weighting.mask_weight={mask_weight!r}: must be a number >= 0, "
                              "e.g. weighting.mask_weight=1.0")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"weighting.batch_size={batch_size!r}: must be a positive integer, "
                              "e.g. weighting.batch_size=8")
        self.mask_weight, self.batch_size = float(mask_weight), int(batch_size)

    def token_weights(self, answer_offset: Tensor, attention_mask: Tensor | None,
                      prior: PositionPrior | None) -> Tensor:
        raise TypeError("weighting=certainty needs the teacher and the calibration inputs: "
                        "call calibration_weights(calib, prior, teacher)")

    def calibration_weights(self, calib: CalibrationSet, prior: PositionPrior | None,
                            teacher: DiffusionLM | None = None) -> Tensor:
        """(N, L) CGQ weights of the calibration set, normalized to mean 1 over real tokens, 0 on padding."""
        if teacher is None:
            raise ValueError("weighting=certainty needs the FP teacher: pass teacher=<the FP model>")
        conf = teacher_confidence(teacher, calib.input_ids, calib.attention_mask, self.batch_size)
        real = calib.attention_mask != 0
        w = certainty_weights(calib.mask_status(), conf, self.mask_weight) * real.float()
        total = float(w.sum())
        if not total > 0 or not bool(torch.isfinite(w).all()):
            raise ValueError("weighting=certainty: the teacher's confidences give no finite positive weight")
        return w * (float(real.sum()) / total)

    def summary(self, calib: CalibrationSet, weights: Tensor) -> dict[str, float]:
        """Mean weight on masked and on unmasked real tokens and the masked share (keys absent when empty)."""
        real = calib.attention_mask != 0
        masked = calib.mask_status() & real
        out = {"weight_masked_share": float(masked.sum()) / max(int(real.sum()), 1)}
        for key, sel in (("weight_mean_masked", masked), ("weight_mean_unmasked", real & ~masked)):
            if bool(sel.any()):
                out[key] = float(weights[sel].double().mean())
        return out
