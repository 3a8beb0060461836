"""Modules that run an exported model for real: packed INT weights, integer activations, online transforms.

Every op calls a dispatcher of ``fair_calib.kernels`` (Triton on CUDA, the PyTorch reference on CPU):

* :class:`PackedLinear` — weights stay packed (compressed-tensors int32 words). With quantized activations and
  symmetric per-channel weights: per-token quantization to integer codes, then the integer GEMM
  ``out = (q_a q_w^T) * s_a * s_w`` (:func:`~fair_calib.kernels.w4a4_gemm`; 4-bit weights are read packed).
  Group-wise or asymmetric weights: codes unpacked and dequantized, integer activations dequantized, fp32 matmul.
  Weight-only (A16): unpack + dequantize, then the matmul in the activation dtype.
* :class:`KronOp`, :class:`HadamardOp`, :class:`CrossHeadHadamardOp` — FlatQuant / QuaRot online transforms.
* :class:`QuantOp` — per-token (per head) quantize-dequantize of K/V.

Clipping pairs ``(lo, hi)`` (ratios after the sigmoid) that differ: symmetric grids pass the per-token ratio
``max(lo |min(x, 0)|, hi max(x, 0)) / max|x|`` to the kernel; asymmetric grids with two ratios have no kernel
form and use the clipping-pair grid of ``fair_calib.quant.grids``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fair_calib.export.grid import dequantize_codes
from fair_calib.export.layout import ExportError
from fair_calib.kernels import (
    QuantizedActivation,
    fast_hadamard_transform,
    kron_transform,
    quantize_per_token,
    unpack_int32,
    w4a4_gemm,
)
from fair_calib.models.block import LINEAR_ROLES, TAP_POINTS
from fair_calib.quant.grids import asym_scale_zero, clip_pair_range, quantize_asym
from fair_calib.quant.hadamard import hadamard_matrix


def packed_width(n: int, bits: int) -> int:
    """int32 words holding ``n`` codes of ``bits`` bits (32 / bits per word)."""
    return -(-n // (32 // bits))


class Fp32State(nn.Module):
    """Floating buffers (transform factors, clipping ratios, weight scales) are held in fp32 whatever dtype the
    checkpoint loads in: the kernels compute scales and transforms in fp32."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self._buffers:
            key = prefix + name
            if key in state_dict and state_dict[key].is_floating_point():
                state_dict[key] = state_dict[key].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---- per-token quantization with a fixed ratio or a clipping pair ---------------------------------------------
def _pair_or_ratio(clip: float | Tensor) -> float | Tensor | tuple[Tensor, Tensor]:
    """A fixed ratio, one learned ratio (lo == hi), or the pair ``(lo, hi)``."""
    if not isinstance(clip, Tensor):
        return float(clip)
    lo, hi = clip[0], clip[1]
    return hi if bool(lo == hi) else (lo, hi)


def _pair_rows_ref(x: Tensor, bits: int, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric grid with two ratios (FlatQuant): float codes, scale (..., 1), zero (..., 1)."""
    xf = x.float()
    s, z = asym_scale_zero(*clip_pair_range(xf, lo, hi), bits)
    return quantize_asym(xf, s, z, bits), s, z


def _per_token_ratio(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Symmetric grid with two ratios as one ratio per token: ``max(lo |min(x,0)|, hi max(x,0)) / max|x|``."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    xmin, xmax = clip_pair_range(xf, lo, hi)
    clipped = torch.maximum(xmin.abs(), xmax)
    return torch.where(absmax > 0, clipped / absmax.clamp(min=1e-30), torch.ones_like(absmax))


def quantize_tokens(x: Tensor, bits: int, symmetric: bool, convention: str, clip: float | Tensor,
                    real: bool) -> Tensor | QuantizedActivation:
    """Per-token quantization of ``x`` (last dim): integer codes (``real``) or quantize-dequantize."""
    mode = _pair_or_ratio(clip)
    if isinstance(mode, tuple):
        lo, hi = mode
        if symmetric:
            mode = _per_token_ratio(x, lo, hi)
        else:
            q, s, z = _pair_rows_ref(x, bits, lo, hi)
            if real:
                return QuantizedActivation(q.to(torch.int8), s.squeeze(-1), z.squeeze(-1).to(torch.int32))
            return ((q - z) * s).to(x.dtype)
    return quantize_per_token(x, bits, sym=symmetric, clip=mode, sym_scale=convention, real=real)  # type: ignore[arg-type]


# ---- the linear ---------------------------------------------------------------------------------------------
class PackedLinear(Fp32State):
    """A block linear with packed integer weights (buffers named as compressed-tensors ``pack-quantized``)."""

    def __init__(self, in_features: int, out_features: int, spec: dict[str, Any], bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", name: str = "") -> None:
        super().__init__()
        w, a = spec["weights"], spec["input_activations"]
        self.in_features, self.out_features, self.name = int(in_features), int(out_features), name
        self.bits, self.symmetric = int(w["num_bits"]), bool(w["symmetric"])
        self.group_size = None if w["group_size"] is None else int(w["group_size"])
        if self.group_size is not None and in_features % self.group_size:
            raise ExportError(f"{name}: group_size {self.group_size} does not divide in_features {in_features}")
        self.act = a
        groups = 1 if self.group_size is None else in_features // self.group_size
        self.register_buffer("weight_packed", torch.empty(out_features, packed_width(in_features, self.bits),
                                                          dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype, device=device))
        if not self.symmetric:
            self.register_buffer("weight_zero_point", torch.empty(packed_width(out_features, self.bits), groups,
                                                                  dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        if a is not None and a["clip"] == "learned":
            self.register_buffer("input_clip", torch.empty(2, dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        a = self.act
        g = f"-g{self.group_size}" if self.group_size else ""
        return (f"{self.name} in={self.in_features} out={self.out_features} "
                f"W{self.bits}{'' if self.symmetric else 'asym'}A{a['num_bits'] if a else 16}{g}")

    def codes(self) -> Tensor:
        """Signed int8 weight codes (out, in), unpacked from the int32 words."""
        return unpack_int32(self.weight_packed, self.bits, (self.out_features, self.in_features))

    def zero_points(self) -> Tensor | None:
        if self.symmetric:
            return None
        return unpack_int32(self.weight_zero_point, self.bits, tuple(self.weight_scale.shape), packed_dim=0)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_codes(self.codes(), self.weight_scale, self.zero_points(), self.group_size, dtype)

    def _clip(self) -> float | Tensor:
        return self.input_clip if self.act["clip"] == "learned" else float(self.act["clip"])

    def forward(self, x: Tensor) -> Tensor:
        a = self.act
        if a is None:
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        qa = quantize_tokens(x, a["num_bits"], a["symmetric"], a["scale_convention"], self._clip(), real=True)
        assert isinstance(qa, QuantizedActivation)
        if self.symmetric and self.group_size is None:  # integer GEMM, per-token x per-channel dequantization
            w = self.weight_packed if self.bits == 4 else self.codes()
            out = w4a4_gemm(qa.q, qa.scale, w, self.weight_scale.reshape(-1), a_zero=qa.zero, out_dtype=x.dtype)
        else:
            out = F.linear(qa.dequantize(torch.float32), self.dequantized_weight(torch.float32)).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


# ---- online ops ---------------------------------------------------------------------------------------------
def _real_device(device: torch.device | str) -> torch.device:
    """Where constant (non-saved) buffers live: the model's device, or the CPU while the model is on meta."""
    d = torch.device(device)
    return torch.device("cpu") if d.type == "meta" else d


class KronOp(Fp32State):
    """FlatQuant's deployed transform ``x -> (x * inv_scale) (P1 (x) P2)`` (a missing factor is the identity)."""

    def __init__(self, n1: int, n2: int, left: bool, right: bool, scale: bool,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.n1, self.n2 = int(n1), int(n2)
        const = _real_device(device)
        for side, n, present in (("left", self.n1, left), ("right", self.n2, right)):
            if present:
                self.register_buffer(side, torch.empty(n, n, dtype=torch.float32, device=device))
            else:
                self.register_buffer(side, torch.eye(n, dtype=torch.float32, device=const), persistent=False)
        self.register_buffer("inv_scale", torch.empty(self.n1 * self.n2, dtype=torch.float32, device=device)
                             if scale else None)

    def extra_repr(self) -> str:
        return f"n1={self.n1}, n2={self.n2}, scale={self.inv_scale is not None}"

    def forward(self, x: Tensor) -> Tensor:
        h = x.float() if self.inv_scale is None else x.float() * self.inv_scale
        return kron_transform(h, self.left, self.right).to(x.dtype)


def _normalized_k(k: int, device: torch.device | str) -> Tensor | None:
    return None if k == 1 else (hadamard_matrix(k) / math.sqrt(k)).to(torch.float32).to(_real_device(device))


class HadamardOp(nn.Module):
    """QuaRot's online ``x -> x H_n / sqrt(n)``, ``H_n = H_K (x) H_{2^m}`` (fast Walsh-Hadamard + a K x K matmul)."""

    def __init__(self, n: int, k: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.n, self.k = int(n), int(k)
        self.register_buffer("hadamard_k", _normalized_k(self.k, device), persistent=False)

    def extra_repr(self) -> str:
        return f"n={self.n}, K={self.k}"

    def forward(self, x: Tensor) -> Tensor:
        return fast_hadamard_transform(x, self.hadamard_k)


class CrossHeadHadamardOp(nn.Module):
    """QuaRot's online Hadamard across heads before o_proj: ``x -> x ((H_heads / sqrt(heads)) (x) I_head_dim)``."""

    def __init__(self, heads: int, head_dim: int, k: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.heads, self.head_dim = int(heads), int(head_dim)
        self.register_buffer("hadamard_k", _normalized_k(int(k), device), persistent=False)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = x.reshape(*lead, self.heads, self.head_dim).transpose(-1, -2).contiguous()
        y = fast_hadamard_transform(y, self.hadamard_k)
        return y.transpose(-1, -2).reshape(*lead, self.heads * self.head_dim)


class QuantOp(Fp32State):
    """K/V cache quantizer: per token (per head) quantize-dequantize with a fixed ratio or a learned pair."""

    def __init__(self, spec: dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("clip", torch.empty(2, dtype=torch.float32, device=device)
                             if spec["clip"] == "learned" else None)

    def extra_repr(self) -> str:
        s = self.spec
        return f"INT{s['num_bits']} {'sym' if s['symmetric'] else 'asym'} clip={s['clip']}"

    def forward(self, x: Tensor) -> Tensor:
        s = self.spec
        clip = self.clip if self.clip is not None else float(s["clip"])
        out = quantize_tokens(x, s["num_bits"], s["symmetric"], s["scale_convention"], clip, real=False)
        assert isinstance(out, Tensor)
        return out


def build_op(op: dict[str, Any], device: torch.device | str) -> nn.Module:
    kind = op.get("op")
    if kind == "kron":
        return KronOp(op["n1"], op["n2"], op["left"], op["right"], op["scale"], device)
    if kind == "hadamard":
        return HadamardOp(op["n"], op["k"], device)
    if kind == "cross_head_hadamard":
        from fair_calib.quant.hadamard import hadamard_factor

        return CrossHeadHadamardOp(op["heads"], op["head_dim"], hadamard_factor(int(op["heads"]))[0], device)
    if kind == "quant":
        return QuantOp(op, device)
    raise ExportError(f"unknown online op {kind!r} in quantization_config; valid: kron, hadamard, "
                      "cross_head_hadamard, quant")


def build_tap(ops: list[dict[str, Any]], device: torch.device | str) -> nn.Module:
    return nn.Sequential(*(build_op(op, device) for op in ops)) if ops else nn.Identity()


def install_runtime(model: nn.Module, blocks: list[dict[str, Any]], dtype: torch.dtype = torch.float32) -> None:
    """Turn an FP model skeleton (any device, meta included) into the exported structure: PackedLinear for every
    block linear, the online ops in the taps. Values come from the state dict loaded afterwards."""
    for i, (block, spec) in enumerate(zip(model.blocks, blocks, strict=True)):
        for role in LINEAR_ROLES:
            lin = block.role(role)
            dev = lin.weight.device
            block.set_role(role, PackedLinear(lin.in_features, lin.out_features, spec["linears"][role],
                                              lin.bias is not None, dtype, dev, name=f"blocks.{i}.{role}"))
        dev = block.role("q").weight_packed.device
        for point in TAP_POINTS:
            block.taps[point] = build_tap(spec["taps"].get(point, []), dev)
