"""What a quantized model runs besides its embeddings, norms and LM head, as plain JSON: one spec per block linear
(weight grid, activation quantizer) and one list of online ops per block tap.

    linear : {"weights": {"num_bits", "symmetric", "group_size"},            group_size null = per output channel
              "input_activations": null | {"num_bits", "symmetric", "scale_convention", "clip"}}
    tap ops: {"op": "kron", "n1", "n2", "left", "right", "scale"}             FlatQuant x -> (x * inv_scale) (P1 (x) P2)
             {"op": "hadamard", "n", "k"}                                     QuaRot x -> x H_n / sqrt(n), n = k * 2^m
             {"op": "cross_head_hadamard", "heads", "head_dim"}              QuaRot (H_heads / sqrt(heads)) (x) I
             {"op": "quant", "num_bits", "symmetric", "scale_convention", "clip"}   K/V per token per head (fake)

``clip`` is a fixed ratio (a number, e.g. QuaRot's 0.9) or ``"learned"`` (FlatQuant's clipping pair, stored as the
tensor ``input_clip`` / ``clip`` = (sigmoid(lo), sigmoid(hi))). The description is structural: it reads module types
and settings, never weight values, so it also works on a meta-device model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fair_calib.errors import ConfigError
from fair_calib.models.block import LINEAR_ROLES, TAP_POINTS
from fair_calib.quant.flat_linear import FlatActTap, FlatLinear
from fair_calib.quant.hadamard import hadamard_factor
from fair_calib.quant.qlinear import ActQuantizer, QLinear
from fair_calib.quant.rotation import CrossHeadHadamard, OnlineHadamard
from fair_calib.quant.transforms import FrozenKron, LiveOp

PACKABLE_BITS = (2, 4, 8)  # 32 / bits codes per int32 word, no code straddles two words
MAX_ACT_BITS = 8


class ExportError(ConfigError):
    """A model (or folder) the export cannot represent; the message says which part and why."""


def _clip_of_linear(q: QLinear) -> float | str:
    if isinstance(q, FlatLinear) and (q.act_clip_logit is not None or q.act_clip_logit_lo is not None):
        return "learned"
    if not isinstance(q, FlatLinear) and q.act_clip_logit is not None:
        return "learned"
    return float(q.a_spec.clip_ratio)


def describe_linear(q: nn.Module, where: str) -> dict[str, Any]:
    if not isinstance(q, QLinear):
        raise ExportError(f"{where} is a {type(q).__name__}, not a quantized linear: quantize the model before export")
    if not q.quant_enabled:
        raise ExportError(f"{where}: its quantizers are switched off (set_quant_enabled(model, True) first)")
    if isinstance(q, FlatLinear) and not q.merged:
        raise ExportError(f"{where}: FlatQuant transform not merged; finalize the block before export")
    w, a = q.w_spec, q.a_spec
    if not w.enabled:
        raise ExportError(f"{where}: weights are in full precision (w_bits=16); the export packs quantized weights")
    if w.bits not in PACKABLE_BITS:
        raise ExportError(f"{where}: w_bits={w.bits} cannot be packed; exportable weight bits: {PACKABLE_BITS}")
    if w.granularity not in ("channel", "group"):
        raise ExportError(f"{where}: w_granularity={w.granularity} is not exportable; use channel or group")
    acts = None
    if a.enabled:
        if a.bits > MAX_ACT_BITS:
            raise ExportError(f"{where}: a_bits={a.bits} has no integer kernel; use a_bits <= {MAX_ACT_BITS} or 16")
        if not a.symmetric and a.bits == MAX_ACT_BITS:
            raise ExportError(f"{where}: asymmetric {a.bits}-bit activation codes (0..255) do not fit the kernels' "
                              "int8 codes; use symmetric activations")
        acts = {"num_bits": a.bits, "symmetric": a.symmetric, "scale_convention": a.scale_convention,
                "clip": _clip_of_linear(q)}
    return {"weights": {"num_bits": w.bits, "symmetric": w.symmetric,
                        "group_size": w.group_size if w.granularity == "group" else None},
            "input_activations": acts}


def _quant_op(m: ActQuantizer) -> dict[str, Any]:
    learned = m.clip_logit is not None or getattr(m, "clip_logit_lo", None) is not None
    s = m.spec
    return {"op": "quant", "num_bits": s.bits, "symmetric": s.symmetric, "scale_convention": s.scale_convention,
            "clip": "learned" if learned else float(s.clip_ratio)}


def describe_tap(m: nn.Module, where: str) -> list[dict[str, Any]]:
    """The online ops of one tap, in order."""
    if isinstance(m, nn.Identity):
        return []
    if isinstance(m, nn.Sequential):
        return [op for i, sub in enumerate(m) for op in describe_tap(sub, f"{where}.{i}")]
    if isinstance(m, FrozenKron):
        return [{"op": "kron", "n1": m.n1, "n2": m.n2, "left": m.left is not None, "right": m.right is not None,
                 "scale": m.inv_scale is not None}]
    if isinstance(m, OnlineHadamard):
        return [{"op": "hadamard", "n": m.n, "k": hadamard_factor(m.n)[0]}]
    if isinstance(m, CrossHeadHadamard):
        return [{"op": "cross_head_hadamard", "heads": m.n_heads, "head_dim": m.head_dim}]
    if isinstance(m, ActQuantizer):
        if m.spec.enabled and not m.enabled:
            raise ExportError(f"{where}: the quantizer is switched off (set_quant_enabled(model, True) first)")
        ops = describe_tap(m.op, f"{where}.op") if isinstance(m, FlatActTap) and m.op is not None else []
        return ops + ([_quant_op(m)] if m.spec.enabled else [])
    if isinstance(m, LiveOp):
        raise ExportError(f"{where}: a live FlatQuant transform; finalize the calibration before export")
    raise ExportError(f"{where}: online module {type(m).__name__} has no exportable form")


def describe_block(block: nn.Module, where: str) -> dict[str, Any]:
    return {"linears": {r: describe_linear(block.role(r), f"{where}.{r}") for r in LINEAR_ROLES},
            "taps": {p: describe_tap(block.taps[p], f"{where}.taps.{p}") for p in TAP_POINTS}}


def describe_blocks(model: nn.Module) -> list[dict[str, Any]]:
    return [describe_block(b, f"blocks.{i}") for i, b in enumerate(model.blocks)]


def pack_layout(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"block": spec}`` when every block is alike (the usual case), else ``{"blocks": [spec, ...]}``."""
    return {"block": blocks[0]} if all(b == blocks[0] for b in blocks) else {"blocks": blocks}


def unpack_layout(section: dict[str, Any], n_layers: int) -> list[dict[str, Any]]:
    if "block" in section:
        return [section["block"]] * n_layers
    blocks = section.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != n_layers:
        raise ExportError(f"quantization_config describes {len(blocks) if isinstance(blocks, list) else 'no'} "
                          f"blocks, the model has {n_layers}")
    return blocks


def has_online_ops(blocks: list[dict[str, Any]]) -> bool:
    return any(ops for b in blocks for ops in b["taps"].values())


def weight_only(blocks: list[dict[str, Any]]) -> bool:
    return all(spec["input_activations"] is None for b in blocks for spec in b["linears"].values())
