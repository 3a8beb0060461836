"""FlatQuant's online Kronecker transform fused with per-token quantization (DESIGN.md 4.6).

For a token row x of length n = n1 * n2 (reshaped row-major to X of shape (n1, n2), i.e.
``X[i, j] = x[i * n2 + j]``) and factors P1 (n1 x n1), P2 (n2 x n2)::

    y = (x / s) @ (P1 kron P2)  ==  flatten(P1^T @ X_s @ P2),   X_s = reshape(x / s)

with the optional per-channel smoothing vector ``s`` (n,) applied first. The n x n Kronecker matrix is
never formed. ``y`` is then quantized per token exactly as :mod:`fair_calib.kernels.quant` does
(fake or real mode), or returned as is when ``bits=None``. All arithmetic is fp32; the fake-quant /
transform-only output has the input dtype.

The Triton path is one program per token: Y is accumulated tile by tile with ``tl.dot`` (IEEE fp32) in
a scratch buffer while the row statistics are reduced, then the row is quantized in a second pass.
Because the matmul summation order differs from ``torch.matmul``, Y can differ from the reference by a
few ulps, which may move a value sitting exactly on a rounding boundary by one quantization step.
"""

from __future__ import annotations

import torch

from fair_calib.quant.transforms import kronecker_factors as kron_factors  # noqa: F401 (re-exported)

from ._dispatch import use_triton
from .quant import (
    QuantizedActivation,
    SymScale,
    _check_args,
    _clip_ref,
    _finish_ref,
    _quantize_rows_ref,
    as_rows,
    launch_rowquant,
)

__all__ = [
    "kron_factors",
    "kron_quantize",
    "kron_quantize_ref",
    "kron_quantize_triton",
    "kron_transform",
]


def _check_factors(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, smooth: torch.Tensor | None) -> None:
    if p1.dim() != 2 or p1.shape[0] != p1.shape[1] or p2.dim() != 2 or p2.shape[0] != p2.shape[1]:
        raise ValueError(f"P1 and P2 must be square matrices, got {tuple(p1.shape)} and {tuple(p2.shape)}")
    n = x.shape[-1]
    if p1.shape[0] * p2.shape[0] != n:
        raise ValueError(f"last dim {n} != n1 * n2 = {p1.shape[0]} * {p2.shape[0]}")
    if smooth is not None and smooth.numel() != n:
        raise ValueError(f"smooth must have {n} entries, got {smooth.numel()}")


def kron_quantize_ref(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    smooth: torch.Tensor | None = None,
    bits: int | None = 4,
    sym: bool = True,
    clip: float | torch.Tensor = 1.0,
    sym_scale: SymScale = "absmax",
    real: bool = False,
) -> torch.Tensor | QuantizedActivation:
    """PyTorch reference: ``P1^T @ reshape(x / s) @ P2`` per token, then per-token quantization."""
    _check_factors(x, p1, p2, smooth)
    n1, n2 = p1.shape[0], p2.shape[0]
    y = x.to(torch.float32)
    if smooth is not None:
        y = y / smooth.to(torch.float32).reshape(-1)
    y = torch.matmul(p1.to(torch.float32).t(), y.reshape(*x.shape[:-1], n1, n2))
    y = torch.matmul(y, p2.to(torch.float32)).reshape(x.shape)
    if bits is None:
        return y.to(x.dtype)
    _check_args(bits, sym, sym_scale, real)
    q, scale, zero = _quantize_rows_ref(y, _clip_ref(clip, x), bits, sym, sym_scale)
    return _finish_ref(q, scale, zero, real, x.dtype)


def kron_quantize_triton(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    smooth: torch.Tensor | None = None,
    bits: int | None = 4,
    sym: bool = True,
    clip: float | torch.Tensor = 1.0,
    sym_scale: SymScale = "absmax",
    real: bool = False,
    block_j: int | None = None,
    block_k: int | None = None,
    block_c: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor | QuantizedActivation:
    """Fused Triton version of :func:`kron_quantize_ref`.

    ``block_j`` / ``block_k`` / ``block_c`` (powers of two >= 16) tile the reduction over n1, the
    reduction over n2 and the output columns; ``block_n`` tiles the quantization pass. Tuning only.
    """
    _check_factors(x, p1, p2, smooth)
    if bits is not None:
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
        p1=p1,
        p2=p2,
        smooth=smooth,
        block_n=block_n,
        block_j=block_j,
        block_k=block_k,
        block_c=block_c,
    )
    out = out.reshape(x.shape)
    if bits is None or not real:
        return out
    lead = x.shape[:-1]
    return QuantizedActivation(out, scale.reshape(lead), None if zero is None else zero.reshape(lead))


def kron_quantize(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    smooth: torch.Tensor | None = None,
    bits: int | None = 4,
    sym: bool = True,
    clip: float | torch.Tensor = 1.0,
    sym_scale: SymScale = "absmax",
    real: bool = False,
    force_triton: bool = False,
) -> torch.Tensor | QuantizedActivation:
    """Online FlatQuant transform ``(x / s) @ (P1 kron P2)`` followed by per-token quantization.

    Args:
        x: activations (..., n1 * n2).
        p1, p2: square factors (n1, n1), (n2, n2) (any float dtype; used in fp32).
        smooth: optional per-channel divisor (n,), applied before the transform.
        bits: 2..8, or None to return the transformed activations unquantized.
        sym, clip, sym_scale, real: as in :func:`fair_calib.kernels.quant.quantize_per_token`.
        force_triton: run the Triton kernel even on CPU (through the interpreter).
    """
    kw = dict(smooth=smooth, bits=bits, sym=sym, clip=clip, sym_scale=sym_scale, real=real)
    if use_triton(x, force_triton):
        return kron_quantize_triton(x, p1, p2, **kw)
    return kron_quantize_ref(x, p1, p2, **kw)


def kron_transform(
    x: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    *,
    smooth: torch.Tensor | None = None,
    force_triton: bool = False,
) -> torch.Tensor:
    """Transform only: ``(x / s) @ (P1 kron P2)`` in x.dtype (shorthand for ``kron_quantize(bits=None)``)."""
    out = kron_quantize(x, p1, p2, smooth=smooth, bits=None, force_triton=force_triton)
    assert isinstance(out, torch.Tensor)
    return out
