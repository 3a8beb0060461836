"""W4A4 GEMM: int4 activations (per-token scale) x int4 weights (per-output-channel scale).

``out[m, o] = (acc[m, o] * a_scale[m]) * w_scale[o]`` with the exact integer accumulation
``acc = sum_k a_q[m, k] * w_q[o, k]`` (int32 in the kernel), computed in fp32 and cast to ``out_dtype``.
With asymmetric activations (codes 0..2^b-1 and an integer zero point per token) pass ``a_zero``:
``acc - a_zero[m] * sum_k w_q[o, k]`` is used instead, i.e. ``(a_q - z) @ w_q^T``.

The weight may be given as int8 codes (N, K), compressed-tensors int32 words (N, ceil(K/8)) or uint8
nibbles (N, ceil(K/2)) (layouts in :mod:`fair_calib.kernels.pack`); the format is taken from the dtype.
The kernel unpacks packed weights in registers, so they are read from memory at 4 bits per value.
int8 codes of any width in [-128, 127] also work (e.g. W8A8) with the int8 weight format.

Reference: float64 matmul (exact for these integer ranges), then the same fp32 epilogue, so the Triton
output is bit-identical to the reference as long as |acc| < 2^24 (always true at 4 bits for K < 2^18).
"""

from __future__ import annotations

import torch

from ._dispatch import LazyKernel, tl, use_triton
from .pack import unpack_int4_ref, unpack_int32_ref
from .quant import QuantizedActivation, quantize_per_token

__all__ = [
    "w4a4_gemm",
    "w4a4_gemm_ref",
    "w4a4_gemm_triton",
    "w4a4_linear",
]

_W_INT8, _W_INT32, _W_UINT8 = 0, 1, 2


def _weight_format(w: torch.Tensor, k: int) -> int:
    """Weight format code from the dtype, after checking the packed width matches K."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K or packed K), got shape {tuple(w.shape)}")
    expect = {torch.int8: (_W_INT8, k), torch.int32: (_W_INT32, -(-k // 8)), torch.uint8: (_W_UINT8, -(-k // 2))}
    if w.dtype not in expect:
        raise TypeError(f"weight dtype must be int8 (codes), int32 (8 per word) or uint8 (2 per byte), got {w.dtype}")
    fmt, width = expect[w.dtype]
    if w.shape[1] != width:
        raise ValueError(f"weight of dtype {w.dtype} must have {width} columns for K={k}, got {w.shape[1]}")
    return fmt


def _flat(t: torch.Tensor, numel: int, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-token / per-channel vector as a contiguous 1-D tensor of ``dtype`` on ``device``."""
    if t.numel() != numel:
        raise ValueError(f"{name} must have {numel} entries, got shape {tuple(t.shape)}")
    return t.reshape(numel).to(device=device, dtype=dtype).contiguous()


def w4a4_gemm_ref(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    a_zero: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """PyTorch reference: exact integer matmul emulated in float64, fp32 epilogue.

    Args:
        a_q: activation codes (..., K), int8.
        a_scale: per-token scales (...) or (..., 1), fp32.
        w: weight codes (N, K) int8, or packed (int32 compressed-tensors / uint8 nibbles).
        w_scale: per-output-channel scales (N,) or (N, 1).
        a_zero: optional per-token integer zero points (asymmetric activations).
        out_dtype: output dtype (the epilogue is fp32).
    Returns:
        (..., N) tensor.
    """
    k = a_q.shape[-1]
    fmt = _weight_format(w, k)
    lead = a_q.shape[:-1]
    a2 = a_q.reshape(-1, k)
    m = a2.shape[0]
    if fmt == _W_INT32:
        wq = unpack_int32_ref(w, 4, (w.shape[0], k))
    elif fmt == _W_UINT8:
        wq = unpack_int4_ref(w, k)
    else:
        wq = w
    wd = wq.to(torch.float64)
    acc = a2.to(torch.float64) @ wd.t()
    if a_zero is not None:
        z = _flat(a_zero, m, "a_zero", torch.float64, a2.device)
        acc = acc - z[:, None] * wd.sum(dim=1)[None, :]
    sa = _flat(a_scale, m, "a_scale", torch.float32, a2.device)
    sw = _flat(w_scale, wq.shape[0], "w_scale", torch.float32, a2.device)
    out = acc.to(torch.float32) * sa[:, None] * sw[None, :]
    return out.to(out_dtype).reshape(*lead, wq.shape[0])


def _w4a4_gemm_kernel(
    a_ptr,
    w_ptr,
    sa_ptr,
    sw_ptr,
    za_ptr,
    out_ptr,
    M,
    N,
    K,
    KW,
    stride_am,
    stride_wn,
    stride_om,
    W_FORMAT: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tiled int8 x int8 -> int32 tl.dot; packed weights are unpacked in registers; fp32 epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    wsum = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(a_ptr + rm64[:, None] * stride_am + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        if W_FORMAT == 0:
            w = tl.load(w_ptr + rn64[None, :] * stride_wn + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        elif W_FORMAT == 1:
            # compressed-tensors: 8 codes per int32 word, code i in bits [4i, 4i+4), offset +8
            rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(
                w_ptr + rn64[None, :] * stride_wn + rw[:, None], mask=(rw[:, None] < KW) & n_ok[None, :], other=0
            )
            sh = tl.arange(0, 8) * 4
            nib = (words[:, None, :] >> sh[None, :, None]) & 15
            w = tl.reshape(nib - 8, (BLOCK_K, BLOCK_N))
            w = tl.where(k_ok[:, None], w, 0).to(tl.int8)
        else:
            # uint8 nibbles: even index in the low nibble, two's complement
            rw = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byts = tl.load(
                w_ptr + rn64[None, :] * stride_wn + rw[:, None], mask=(rw[:, None] < KW) & n_ok[None, :], other=0
            ).to(tl.int32)
            sh = tl.arange(0, 2) * 4
            nib = (byts[:, None, :] >> sh[None, :, None]) & 15
            nib = nib - ((nib >> 3) << 4)
            w = tl.reshape(nib, (BLOCK_K, BLOCK_N))
            w = tl.where(k_ok[:, None], w, 0).to(tl.int8)
        acc += tl.dot(a, w, out_dtype=tl.int32)
        if HAS_ZERO:
            wsum += tl.sum(w.to(tl.int32), axis=0)
    if HAS_ZERO:
        za = tl.load(za_ptr + rm, mask=m_ok, other=0).to(tl.int32)
        acc = acc - za[:, None] * wsum[None, :]
    sa = tl.load(sa_ptr + rm, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    tl.store(
        out_ptr + rm64[:, None] * stride_om + rn[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


w4a4_gemm_kernel = LazyKernel(_w4a4_gemm_kernel)


def w4a4_gemm_triton(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    a_zero: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`w4a4_gemm_ref`; block sizes (powers of two, >= 16, BLOCK_K >= 32) tune only."""
    if a_q.dtype != torch.int8:
        raise TypeError(f"a_q must hold int8 codes, got {a_q.dtype}")
    k = a_q.shape[-1]
    fmt = _weight_format(w, k)
    lead = a_q.shape[:-1]
    a2 = a_q.reshape(-1, k)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    m, n = a2.shape[0], w.shape[0]
    wc = w.to(device=a2.device).contiguous()
    sa = _flat(a_scale, m, "a_scale", torch.float32, a2.device)
    sw = _flat(w_scale, n, "w_scale", torch.float32, a2.device)
    za = _flat(a_zero, m, "a_zero", torch.int32, a2.device) if a_zero is not None else sa
    out = torch.empty((m, n), device=a_q.device, dtype=out_dtype)
    if m and n:
        bm = block_m or (16 if m <= 16 else 32 if m <= 32 else 64)
        bn = block_n or 64
        bk = block_k or 64
        grid = (-(-m // bm), -(-n // bn))
        w4a4_gemm_kernel[grid](
            a2,
            wc,
            sa,
            sw,
            za,
            out,
            m,
            n,
            k,
            wc.shape[1],
            a2.stride(0),
            wc.stride(0),
            out.stride(0),
            W_FORMAT=fmt,
            HAS_ZERO=a_zero is not None,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
        )
    return out.reshape(*lead, n)


def w4a4_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    a_zero: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    force_triton: bool = False,
) -> torch.Tensor:
    """Integer GEMM with per-token x per-channel dequantization (see :func:`w4a4_gemm_ref` for the args)."""
    if use_triton(a_q, force_triton):
        return w4a4_gemm_triton(a_q, a_scale, w, w_scale, a_zero=a_zero, out_dtype=out_dtype)
    return w4a4_gemm_ref(a_q, a_scale, w, w_scale, a_zero=a_zero, out_dtype=out_dtype)


def w4a4_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    act_bits: int = 4,
    act_clip: float | torch.Tensor = 1.0,
    act_sym: bool = True,
    force_triton: bool = False,
) -> torch.Tensor:
    """Quantized linear layer: dynamic per-token activation quantization then :func:`w4a4_gemm`.

    Returns ``x.dtype`` output of shape (..., N); ``w`` / ``w_scale`` as in :func:`w4a4_gemm`.
    """
    qa = quantize_per_token(x, act_bits, sym=act_sym, clip=act_clip, real=True, force_triton=force_triton)
    assert isinstance(qa, QuantizedActivation)
    out = w4a4_gemm(qa.q, qa.scale, w, w_scale, a_zero=qa.zero, out_dtype=x.dtype, force_triton=force_triton)
    return out if bias is None else out + bias.to(out.dtype)
