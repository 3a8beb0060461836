"""Per-token loss weights from the position prior (registry group `weighting`)."""

from fair_calib.weighting.weights import Fair, Frontier, PositionWeight, Reliability, Uniform, Weighting

__all__ = ["Fair", "Frontier", "PositionWeight", "Reliability", "Uniform", "Weighting"]
