"""The quantizer protocol and the bit settings every method shares.

A quantizer changes a model in place: `quantize(model, calib, token_weights)`. Methods that need
data say so with `requires_calibration`; the layer-wise ones run through `fair_calib.quant.engine`
and receive the per-token weights of the FAIR-Calib weighting (uniform when there is no prior).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.grids import QuantSpec
from fair_calib.registry import ConfigError


@dataclass(frozen=True)
class BitSettings:
    """WxAy(KVz) settings from a quantizer config; 16 = leave in full precision. scale_convention "auto" becomes
    "halfstep" for weight-only settings (a_bits = kv_bits = 16) and "absmax" otherwise."""

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 16
    w_symmetric: bool = True
    a_symmetric: bool = True
    kv_symmetric: bool = False
    w_granularity: str = "channel"
    group_size: int = 128
    scale_convention: str = "absmax"
    a_clip_ratio: float = 1.0
    kv_clip_ratio: float = 1.0
    w_clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name, f in self.__dataclass_fields__.items():
            check_type(f"quantizer.{name}", getattr(self, name), str(f.type), f.default)
        if self.scale_convention == "auto":  # weight-only: halfstep (compressed-tensors); quantized activations: absmax
            weight_only = self.a_bits >= 16 and self.kv_bits >= 16
            object.__setattr__(self, "scale_convention", "halfstep" if weight_only else "absmax")
        try:
            self.weight_spec()
            self.act_spec()
            self.kv_spec()
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(self.w_bits, self.w_symmetric, self.scale_convention, self.w_granularity, self.group_size,
                         self.w_clip_ratio)

    def act_spec(self) -> QuantSpec:
        return QuantSpec(self.a_bits, self.a_symmetric, self.scale_convention, "channel", self.group_size,
                         self.a_clip_ratio)

    def kv_spec(self) -> QuantSpec:
        return QuantSpec(self.kv_bits, self.kv_symmetric, self.scale_convention, "channel", self.group_size,
                         self.kv_clip_ratio)

    @property
    def label(self) -> str:
        g = f"-g{self.group_size}" if self.w_granularity == "group" and self.w_bits < 16 else ""
        kv = f"KV{self.kv_bits}" if self.kv_bits < 16 else ""
        return f"W{self.w_bits}A{self.a_bits}{kv}{g}"


_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def check_type(key: str, value: Any, kind: str, example: Any) -> None:
    """A config value of the declared kind (YAML gives `maybe` as a string and `4.5` as a float: both refused).
    Booleans are not integers here, and an integer is a fine float."""
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool),
          "str": isinstance(value, str)}.get(kind, True)
    if not ok:
        shown = str(example).lower() if isinstance(example, bool) else example
        what = "an integer bit width 2..16 (16 = full precision)" if key.endswith("_bits") else _KINDS[kind]
        raise ConfigError(f"{key}={value!r}: must be {what}, e.g. {key}={shown}")


class Quantizer(ABC):
    """Turns a full-precision model into a (fake-)quantized one, in place."""

    requires_calibration: bool = False
    uses_token_weights: bool = False  # True: per-token weights change the result (weighted Hessian / losses)

    def __init__(self, **bits: Any) -> None:
        self.bits = BitSettings(**bits)

    @property
    def label(self) -> str:
        return self.bits.label

    @abstractmethod
    def quantize(self, model: DiffusionLM, calib: Any = None, token_weights: Tensor | None = None) -> dict[str, Any]:
        """Quantize `model` in place; return a report (timings, per-block errors, ...)."""
