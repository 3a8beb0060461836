"""Stage I of FAIR-Calib: the position prior probed from the full-precision teacher (registry group `prior`)."""

from fair_calib.prior.position_prior import PositionPrior

__all__ = ["PositionPrior"]
