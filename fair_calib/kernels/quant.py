"""Per-token (dynamic) activation quantization over the last dimension, Triton kernel + PyTorch reference.

Grids (DESIGN.md 4.1), all computed in fp32 whatever the input dtype:

* symmetric, ``sym_scale="absmax"`` (QuaRot / SmoothQuant / FlatQuant, /7 at 4 bits):
  ``scale = clip * absmax / (2^(b-1) - 1)``
* symmetric, ``sym_scale="halfstep"`` (IST-GPTQ / compressed-tensors, /7.5 at 4 bits):
  ``scale = 2 * clip * absmax / (2^b - 1)``
  and in both cases ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)``;
* asymmetric: ``lo = clip * min(min(x), 0)``, ``hi = clip * max(max(x), 0)``,
  ``scale = (hi - lo) / (2^b - 1)``, ``zero = clamp(round(-lo / scale), 0, 2^b - 1)``,
  ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)``. Including 0 in the range (as QuaRot and FlatQuant
  do) keeps zero exactly representable; the scale equals ``(max - min) * clip / (2^b - 1)`` up to one
  rounding.

``scale`` is clamped to ``>= 1e-8`` so an all-zero token gives zeros instead of NaN. ``round`` is
round-half-to-even, as ``torch.round``. ``clip`` is a python float, a 0-d/1-element tensor or one value
per token (already passed through the sigmoid by the caller) in (0, 1].

Two output modes: fake-quant (dequantized values in the input dtype) and real
(:class:`QuantizedActivation`: int8 values, fp32 per-token scales, int32 zero points or None).
These functions are forward-only (no autograd); the straight-through estimator for training lives in
the quantizer modules. The Triton kernel produces bit-identical results to the reference (it uses
IEEE division and an exact round-half-even), which the tests check under the interpreter.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ._dispatch import LazyKernel, as_clip_tensor, next_power_of_2, tl, use_triton

__all__ = [
    "QuantizedActivation",
    "SymScale",
    "quantize_per_token",
    "quantize_per_token_ref",
    "quantize_per_token_triton",
    "qrange",
]

SymScale = Literal["absmax", "halfstep"]
SCALE_EPS = 1e-8


class QuantizedActivation(NamedTuple):
    """Real-mode output: integer values (int8), per-token fp32 scale, per-token int32 zero point (asym)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to real values: ``(q - zero) * scale``, computed in fp32 then cast to ``dtype``."""
        q = self.q.to(torch.float32)
        if self.zero is not None:
            q = q - self.zero.to(torch.float32).unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).to(dtype)


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Integer range of the grid: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8] (values are held in int8), got {bits}")
    if sym:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _check_args(bits: int, sym: bool, sym_scale: str, real: bool) -> None:
    qrange(bits, sym)
    if sym_scale not in ("absmax", "halfstep"):
        raise ValueError(f"sym_scale must be 'absmax' or 'halfstep', got {sym_scale!r}")
    if real and not sym and bits > 7:
        raise ValueError("real-mode asymmetric codes are held in int8: use bits <= 7 (or fake mode)")


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def _quantize_rows_ref(
    y: torch.Tensor, clip: torch.Tensor, bits: int, sym: bool, sym_scale: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize fp32 rows ``y`` (..., n); returns fp32 integer-valued q, fp32 scale (..., 1), fp32 zero."""
    qmin, qmax = qrange(bits, sym)
    if sym:
        absmax = y.abs().amax(dim=-1, keepdim=True)
        if sym_scale == "halfstep":
            scale = 2.0 * clip * absmax / float((1 << bits) - 1)
        else:
            scale = clip * absmax / float(qmax)
        scale = scale.clamp(min=SCALE_EPS)
        q = torch.clamp(torch.round(y / scale), qmin, qmax)
        return q, scale, None
    lo = clip * y.amin(dim=-1, keepdim=True).clamp(max=0.0)
    hi = clip * y.amax(dim=-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / float(qmax)).clamp(min=SCALE_EPS)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(y / scale) + zero, 0, qmax)
    return q, scale, zero


def _finish_ref(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, real: bool, dtype: torch.dtype
) -> torch.Tensor | QuantizedActivation:
    """Turn reference integer grid values into the fake or real output format."""
    if real:
        z = None if zero is None else zero.squeeze(-1).to(torch.int32)
        return QuantizedActivation(q.to(torch.int8), scale.squeeze(-1), z)
    deq = (q - zero) * scale if zero is not None else q * scale
    return deq.to(dtype)


def _clip_ref(clip: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reference-side clip: fp32, broadcastable against (..., 1)."""
    lead = x.shape[:-1]
    rows = 1
    for d in lead:
        rows *= d
    c = as_clip_tensor(clip, rows, lead, x.device)
    return c.reshape(1) if c.numel() == 1 and rows != 1 else c.reshape(*lead, 1)


def quantize_per_token_ref(
    x: torch.Tensor,
    bits: int = 4,
    *,
    sym: bool = True,
    clip: float | torch.Tensor = 1.0,
    sym_scale: SymScale = "absmax",
    real: bool = False,
) -> torch.Tensor | QuantizedActivation:
    """PyTorch reference of per-token quantization over the last dim (see module docstring)."""
    _check_args(bits, sym, sym_scale, real)
    y = x.to(torch.float32)
    q, scale, zero = _quantize_rows_ref(y, _clip_ref(clip, x), bits, sym, sym_scale)
    return _finish_ref(q, scale, zero, real, x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel (shared with kron.py: TRANSFORM=True fuses FlatQuant's P1^T X P2 in front)
# --------------------------------------------------------------------------------------------------


def _rowquant_kernel(
    x_ptr,
    tmp_ptr,
    p1_ptr,
    p2_ptr,
    smooth_ptr,
    clip_ptr,
    out_ptr,
    scale_ptr,
    zero_ptr,
    n,
    n1,
    n2,
    stride_xm,
    stride_om,
    stride_tmp,
    clip_stride,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    SYM: tl.constexpr,
    SYM_RANGE: tl.constexpr,
    REAL: tl.constexpr,
    QUANT: tl.constexpr,
    TRANSFORM: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BN1: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per token row.

    Phase 1 gathers the row statistics (absmax, or min/max). With TRANSFORM it first computes
    T = P1^T (X / s) into the fp32 scratch row ``tmp[:n]``, then (after a barrier) Y = T P2 tile by tile
    into ``tmp[n:2n]`` (or straight into ``out`` when QUANT is off), reducing the statistics on the fly;
    both products use tl.dot and no product is recomputed. Phase 2 streams the row again (from x, or from
    the Y scratch after a barrier) and writes fake-quant values or int8 codes. Rounding is an exact
    round-half-even built from floor(); divisions are IEEE (div_rn), so results match torch bit for bit.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    tmp_row = tmp_ptr + row * stride_tmp
    out_row = out_ptr + row * stride_om

    amax = tl.zeros([BLOCK_N], dtype=tl.float32)  # |x| max (sym) or max(x, 0) (asym), per lane
    amin = tl.zeros([BLOCK_N], dtype=tl.float32)  # min(x, 0) per lane (asym)
    if TRANSFORM:
        ri = tl.arange(0, BN1)
        row_ok = ri < n1
        # T = P1^T @ (X / s), (n1, n2), into tmp[:n]
        for k0 in range(0, n2, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            t = tl.zeros([BN1, BLOCK_K], dtype=tl.float32)
            for j0 in range(0, n1, BLOCK_J):
                rj = j0 + tl.arange(0, BLOCK_J)
                # p1t[i, j] = P1[j, i]
                p1t = tl.load(
                    p1_ptr + rj[None, :] * n1 + ri[:, None],
                    mask=row_ok[:, None] & (rj[None, :] < n1),
                    other=0.0,
                ).to(tl.float32)
                xm = (rj[:, None] < n1) & (rk[None, :] < n2)
                xoff = rj[:, None] * n2 + rk[None, :]
                xt = tl.load(x_row + xoff, mask=xm, other=0.0).to(tl.float32)
                if HAS_SMOOTH:
                    st = tl.load(smooth_ptr + xoff, mask=xm, other=1.0).to(tl.float32)
                    xt = tl.div_rn(xt, st)
                t += tl.dot(p1t, xt, input_precision=DOT_PRECISION)
            tl.store(tmp_row + ri[:, None] * n2 + rk[None, :], t, mask=row_ok[:, None] & (rk[None, :] < n2))
        tl.debug_barrier()  # T written above is read back by other threads of this program
        if QUANT:
            y_row = tmp_row + n
        else:
            y_row = out_row
        # Y = T @ P2, (n1, n2)
        for c0 in range(0, n2, BLOCK_C):
            rc = c0 + tl.arange(0, BLOCK_C)
            acc = tl.zeros([BN1, BLOCK_C], dtype=tl.float32)
            for k0 in range(0, n2, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                tt = tl.load(
                    tmp_row + ri[:, None] * n2 + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < n2), other=0.0
                )
                p2t = tl.load(
                    p2_ptr + rk[:, None] * n2 + rc[None, :],
                    mask=(rk[:, None] < n2) & (rc[None, :] < n2),
                    other=0.0,
                ).to(tl.float32)
                acc += tl.dot(tt, p2t, input_precision=DOT_PRECISION)
            om = row_ok[:, None] & (rc[None, :] < n2)
            tl.store(y_row + ri[:, None] * n2 + rc[None, :], acc.to(y_row.dtype.element_ty), mask=om)
            # padded rows/cols of acc are exactly 0 (zero-padded P1, P2), so they cannot change the stats
            if SYM:
                amax = tl.maximum(amax, tl.max(tl.abs(acc)))
            else:
                amax = tl.maximum(amax, tl.max(acc))
                amin = tl.minimum(amin, tl.min(acc))
    else:
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m = cols < n
            v = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                v = tl.div_rn(v, tl.load(smooth_ptr + cols, mask=m, other=1.0).to(tl.float32))
            if SYM:
                amax = tl.maximum(amax, tl.abs(v))
            else:
                amax = tl.maximum(amax, v)
                amin = tl.minimum(amin, v)

    if QUANT:
        if TRANSFORM:
            tl.debug_barrier()  # make this program's Y scratch writes visible to all of its threads
        clip = tl.load(clip_ptr + row * clip_stride).to(tl.float32)
        hi = tl.max(amax)
        if SYM:
            if SYM_RANGE:
                scale = tl.div_rn(2.0 * clip * hi, QMAX - QMIN + 0.0)
            else:
                scale = tl.div_rn(clip * hi, QMAX + 0.0)
            scale = tl.maximum(scale, 1e-8)
            zero = 0.0
            lo_b = QMIN + 0.0
            hi_b = QMAX + 0.0
        else:
            hi_c = clip * hi
            lo_c = clip * tl.min(amin)
            scale = tl.maximum(tl.div_rn(hi_c - lo_c, QMAX + 0.0), 1e-8)
            zr = tl.div_rn(-lo_c, scale)
            zf = tl.floor(zr)
            zd = zr - zf
            zodd = zf - 2.0 * tl.floor(zf * 0.5)
            zero = tl.where(zd > 0.5, zf + 1.0, tl.where(zd < 0.5, zf, zf + zodd))
            zero = tl.minimum(tl.maximum(zero, 0.0), QMAX + 0.0)
            lo_b = -zero
            hi_b = QMAX - zero
        if REAL:
            tl.store(scale_ptr + row, scale)
            if not SYM:
                tl.store(zero_ptr + row, zero.to(tl.int32))
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            m = cols < n
            if TRANSFORM:
                v = tl.load(tmp_row + n + cols, mask=m, other=0.0)
            else:
                v = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
                if HAS_SMOOTH:
                    v = tl.div_rn(v, tl.load(smooth_ptr + cols, mask=m, other=1.0).to(tl.float32))
            u = tl.div_rn(v, scale)
            # clamp first: round() is monotone and the bounds are integers, so this equals clamp(round())
            u = tl.minimum(tl.maximum(u, lo_b), hi_b)
            f = tl.floor(u)
            d = u - f
            odd = f - 2.0 * tl.floor(f * 0.5)
            r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))
            if REAL:
                tl.store(out_row + cols, (r + zero).to(tl.int8), mask=m)
            else:
                tl.store(out_row + cols, (r * scale).to(out_ptr.dtype.element_ty), mask=m)


rowquant_kernel = LazyKernel(_rowquant_kernel)


def launch_rowquant(
    x2: torch.Tensor,
    *,
    bits: int | None,
    sym: bool,
    clip: float | torch.Tensor,
    sym_scale: str,
    real: bool,
    lead_shape: torch.Size,
    out_dtype: torch.dtype,
    p1: torch.Tensor | None = None,
    p2: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    block_n: int | None = None,
    block_j: int | None = None,
    block_k: int | None = None,
    block_c: int | None = None,
    dot_precision: str = "ieee",
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the row kernel on a 2-D view ``x2`` (rows, n) with unit last stride.

    Returns (out, scale, zero): out is (rows, n) in ``out_dtype`` (fake / transform-only) or int8 (real).
    """
    rows, n = x2.shape
    dev = x2.device
    quant = bits is not None
    transform = p1 is not None
    sym_range = sym_scale == "halfstep"
    qmin, qmax = qrange(bits, sym) if quant else (0, 1)
    out = torch.empty((rows, n), device=dev, dtype=torch.int8 if (quant and real) else out_dtype)
    scale = torch.empty(rows, device=dev, dtype=torch.float32) if (quant and real) else None
    zero = torch.empty(rows, device=dev, dtype=torch.int32) if (quant and real and not sym) else None
    if rows == 0:
        return out, scale, zero
    clip_t = as_clip_tensor(clip, rows, lead_shape, dev)
    n1 = p1.shape[0] if transform else 1
    n2 = p2.shape[0] if transform else n
    if transform:
        # fp32 scratch per row: T = P1^T X in [:n], Y = T P2 in [n:2n] (Y goes to `out` when not quantizing)
        tmp = torch.empty((rows, 2 * n if quant else n), device=dev, dtype=torch.float32)
        p1c = p1.to(device=dev).contiguous()
        p2c = p2.to(device=dev).contiguous()
        bn1 = max(16, next_power_of_2(n1))
        # defaults keep sm_80 register use in check (spill-free or nearly at n1, n2 <= 128 with 8 warps)
        bj = block_j or min(bn1, 32)
        bk = block_k or 32
        bc = block_c or min(max(16, next_power_of_2(n2)), 32)
    else:
        tmp, p1c, p2c = x2, x2, x2
        bn1 = bj = bk = bc = 16
    sm = smooth.to(device=dev).reshape(n).contiguous() if smooth is not None else x2
    bn = block_n or min(max(16, next_power_of_2(n)), 1024)
    rowquant_kernel[(rows,)](
        x2,
        tmp,
        p1c,
        p2c,
        sm,
        clip_t,
        out,
        scale if scale is not None else clip_t,
        zero if zero is not None else clip_t,
        n,
        n1,
        n2,
        x2.stride(0),
        out.stride(0),
        tmp.stride(0),
        0 if clip_t.numel() == 1 else 1,
        QMIN=qmin,
        QMAX=qmax,
        SYM=sym,
        SYM_RANGE=sym_range,
        REAL=real,
        QUANT=quant,
        TRANSFORM=transform,
        HAS_SMOOTH=smooth is not None,
        BLOCK_N=bn,
        BN1=bn1,
        BLOCK_J=bj,
        BLOCK_K=bk,
        BLOCK_C=bc,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps or (8 if bn1 >= 64 else 4),
        enable_fp_fusion=False,  # no FMA contraction: scales/zero points must round exactly like torch
    )
    return out, scale, zero


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) view with unit stride on the last dim (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def quantize_per_token_triton(
    x: torch.Tensor,
    bits: int = 4,
    *,
    sym: bool = True,
    clip: float | torch.Tensor = 1.0,
    sym_scale: SymScale = "absmax",
    real: bool = False,
    block_n: int | None = None,
) -> torch.Tensor | QuantizedActivation:
    """Triton per-token quantization; same contract as :func:`quantize_per_token_ref`.

    ``block_n`` (power of two >= 16) only tunes the tile width; rows longer than it are looped over.
    """
    _check_args(bits, sym, sym_scale, real)
    out, scale, zero = launch_rowquant(
        as_rows(x),
        bits=bits,
        sym=sym,
        clip=clip,
        sym_scale=sym_scale,
        real=real,
        lead_shape=x.shape[:-1],
        out_dtype=x.dtype,
        block_n=block_n,
    )
    out = out.reshape(x.shape)
    if not real:
        return out
    lead = x.shape[:-1]
    return QuantizedActivation(out, scale.reshape(lead), None if zero is None else zero.reshape(lead))


def quantize_per_token(
    x: torch.Tensor,
    bits: int = 4,
    *,
    sym: bool = True,
    clip: float | torch.Tensor = 1.0,
    sym_scale: SymScale = "absmax",
    real: bool = False,
    force_triton: bool = False,
) -> torch.Tensor | QuantizedActivation:
    """Per-token quantization of ``x`` over its last dim; Triton on CUDA / interpreter, reference otherwise.

    Args:
        x: activations (..., n), any float dtype.
        bits: 2..8.
        sym: symmetric (signed grid) or asymmetric (unsigned grid + integer zero point).
        clip: clipping factor in (0, 1]: python float, single-element tensor or one value per token.
        sym_scale: "absmax" (absmax/(2^(b-1)-1)) or "halfstep" (2*absmax/(2^b-1)); ignored when asymmetric.
        real: False -> fake-quant tensor in x.dtype; True -> :class:`QuantizedActivation`.
        force_triton: run the Triton kernel even on CPU (through the interpreter).
    """
    if use_triton(x, force_triton):
        return quantize_per_token_triton(x, bits, sym=sym, clip=clip, sym_scale=sym_scale, real=real)
    return quantize_per_token_ref(x, bits, sym=sym, clip=clip, sym_scale=sym_scale, real=real)
