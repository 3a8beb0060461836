"""From the Stage I position prior to per-token loss weights (DESIGN section 3, "Weighting").

uniform     w = 1 everywhere (padding 0): the unweighted objective, exactly
frontier    w_i ∝ F_i
reliability w_i ∝ R_i
fair        w_i ∝ alpha * F_i + beta * R_i   (F, R each normalized to mean 1 first, so alpha : beta is
            the share of the two maps)

The window weights are normalized to mean 1 over the K answer positions; tokens outside the window
(the prompt, offset -1, or answer offsets >= K) get `floor` (relative to that mean of 1) so every
token still contributes; padding gets 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fair_calib.prior.position_prior import PositionPrior
from fair_calib.registry import ConfigError, register

if TYPE_CHECKING:
    from fair_calib.data.calibration import CalibrationSet
    from fair_calib.models.dllm import DiffusionLM


@dataclass
class PositionWeight:
    """Callable view offset -> weight: window weights for offsets in [0, K), `floor` elsewhere."""

    weights: Tensor | None  # (K,) mean-1 window weights; None = 1 everywhere (uniform)
    floor: float = 0.05

    @property
    def window(self) -> int | None:
        return None if self.weights is None else int(self.weights.numel())

    def __call__(self, offsets: Tensor) -> Tensor:
        """Weights (float32, same shape and device as `offsets`) for answer offsets (-1 = prompt)."""
        offsets = torch.as_tensor(offsets)
        if self.weights is None:
            return torch.ones(offsets.shape, dtype=torch.float32, device=offsets.device)
        w = self.weights.to(device=offsets.device, dtype=torch.float32)
        k = w.numel()
        inside = (offsets >= 0) & (offsets < k)
        idx = offsets.clamp(0, k - 1).long()
        return torch.where(inside, w[idx], torch.full(offsets.shape, self.floor, dtype=torch.float32,
                                                       device=offsets.device))


class Weighting:
    """Base: subclasses define `mix(prior)` -> unnormalized (K,) window weights.

    The pipeline asks `calibration_weights(calib, prior, teacher)`; the prior-based weightings read only the
    answer offsets and padding of the calibration set, a weighting with `needs_teacher` also runs the FP teacher
    on its inputs (and then only makes sense with a quantizer that takes per-token weights).
    """

    name = "base"
    needs_prior = True
    needs_teacher = False

    def __init__(self, floor: float = 0.05) -> None:
        if floor < 0:
            raise ConfigError(f"weighting.floor must be >= 0, got {floor}")
        self.floor = float(floor)

    def mix(self, prior: PositionPrior) -> Tensor:
        raise NotImplementedError

    def _require(self, prior: PositionPrior | None) -> PositionPrior:
        if prior is None:
            raise ConfigError(f"weighting={self.name} needs a prior: set prior=fair")
        return prior

    def position_weights(self, prior: PositionPrior | None) -> Tensor:
        """(K,) float32 window weights normalized to mean 1: w = m / mean(m) with m = `mix(prior)`."""
        m = self.mix(self._require(prior)).double()
        if m.numel() == 0 or not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ValueError(f"weighting={self.name}: the prior map must be finite and non-negative")
        mean = m.mean()
        if float(mean) <= 0:
            raise ValueError(f"weighting={self.name}: the prior map is all zero; re-run Stage I (prior=fair)")
        return (m / mean).float()

    def position_weight(self, prior: PositionPrior | None) -> PositionWeight:
        """The offset -> weight function (for the diagnostics and for `token_weights`)."""
        return PositionWeight(self.position_weights(prior), self.floor)

    def token_weights(self, answer_offset: Tensor, attention_mask: Tensor | None,
                      prior: PositionPrior | None) -> Tensor:
        """(N, L) weights for calibration tokens: window weight, `floor` outside it, 0 on padding."""
        w = self.position_weight(prior)(answer_offset)
        if attention_mask is not None:
            w = w * (attention_mask.to(w.device) != 0).float()
        return w

    def calibration_weights(self, calib: CalibrationSet, prior: PositionPrior | None,
                            teacher: DiffusionLM | None = None) -> Tensor:
        """(N, L) weights of the calibration set, what the quantizer receives; here `token_weights` of its offsets."""
        return self.token_weights(calib.answer_offset, calib.attention_mask, prior)

    def summary(self, calib: CalibrationSet, weights: Tensor) -> dict[str, float]:
        """Figures of the weights for the run's report; none for the prior-based weightings (their prior is saved)."""
        return {}


@register("weighting", "uniform")
class Uniform(Weighting):
    """w = 1 for every real token (padding 0), with or without a prior; `floor` is accepted and unused."""

    name = "uniform"
    needs_prior = False

    def position_weights(self, prior: PositionPrior | None, window: int | None = None) -> Tensor:
        """(K,) ones; K = `window`, else the prior's window."""
        k = window if window is not None else (prior.window if prior is not None else None)
        if k is None:
            raise ValueError("uniform weighting without a prior has no window: pass window=K")
        return torch.ones(k, dtype=torch.float32)

    def position_weight(self, prior: PositionPrior | None) -> PositionWeight:
        return PositionWeight(None, 1.0)


@register("weighting", "frontier")
class Frontier(Weighting):
    """w ∝ F, the (early-boosted) frontier-hit map."""

    name = "frontier"

    def mix(self, prior: PositionPrior) -> Tensor:
        return prior.frontier_hits


@register("weighting", "reliability")
class Reliability(Weighting):
    """w ∝ R, the masked-stage reliability map."""

    name = "reliability"

    def mix(self, prior: PositionPrior) -> Tensor:
        return prior.masked_reliability


@register("weighting", "fair")
class Fair(Weighting):
    """w ∝ alpha * F + beta * R (normalized maps), the FAIR-Calib weighting."""

    name = "fair"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, floor: float = 0.05) -> None:
        super().__init__(floor)
        if alpha < 0 or beta < 0 or alpha + beta <= 0:
            raise ConfigError(f"weighting.alpha and weighting.beta must be >= 0 with a positive sum, "
                              f"got {alpha} and {beta}")
        self.alpha, self.beta = float(alpha), float(beta)

    def mix(self, prior: PositionPrior) -> Tensor:
        return self.alpha * prior.frontier_hits + self.beta * prior.masked_reliability
