"""Per-token loss weights from the position prior or the FP teacher (registry group `weighting`)."""

from fair_calib.weighting.certainty import Certainty
from fair_calib.weighting.weights import Fair, Frontier, PositionWeight, Reliability, Uniform, Weighting

__all__ = ["Certainty", "Fair", "Frontier", "PositionWeight", "Reliability", "Uniform", "Weighting"]
