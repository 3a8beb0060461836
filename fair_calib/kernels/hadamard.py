"""Online (fast) Walsh-Hadamard transform over the last dimension, Triton kernel + PyTorch reference.

Definition. Activations are row vectors (as everywhere in fair_calib). For n = K * M with M = 2^m and an
orthogonal K x K matrix ``H_K`` (already normalised, e.g. a +-1 Hadamard matrix divided by sqrt(K); omit
it for K = 1), each row x is reshaped row-major to Z of shape (K, M), ``Z[k, j] = x[k * M + j]``::

    y = x @ (H_K kron H_M) / sqrt(M)  ==  flatten( H_K^T @ Z @ H_M ) / sqrt(M)

where H_M is the Sylvester (natural-order, symmetric, +-1) Walsh-Hadamard matrix,
``H_M[i, j] = (-1)^popcount(i & j)``: the K part acts on the slow index, the Sylvester part on the fast
index. This is the convention of :func:`fair_calib.quant.hadamard.apply_hadamard`:
``apply_hadamard(x, hk) == fast_hadamard_transform(x, hk / sqrt(K))`` for a +-1 matrix ``hk``, and
:func:`fair_calib.quant.hadamard.hadamard_factor` / ``hadamard_matrix`` build the (K, M) split and H_K
(e.g. 12288 -> 12 x 1024, 3584 -> 28 x 128, 18944 -> 148 x 128). The transform is orthogonal; for
K = 1 it is the normalised FWHT ``x @ H_n / sqrt(n)`` (its own inverse).

The M-axis transform uses the constant-geometry butterfly (m identical stages: pair element i with
i + M/2, write a+b, a-b to positions 2i, 2i+1); the reference runs the same stages, so that part is
bit-identical between the two paths. The K-axis product is a matmul (the Triton path uses ``tl.dot``
in IEEE fp32 through an fp32 scratch buffer when K > 1), so results agree to a few ulps.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import LazyKernel, next_power_of_2, tl, use_triton

__all__ = [
    "fast_hadamard_transform",
    "fast_hadamard_transform_ref",
    "fast_hadamard_transform_triton",
]


# --------------------------------------------------------------------------------------------------
# PyTorch reference
# --------------------------------------------------------------------------------------------------


def _split_n(n: int, hadamard_k: torch.Tensor | None) -> tuple[int, int]:
    k = 1 if hadamard_k is None else hadamard_k.shape[0]
    if hadamard_k is not None and (hadamard_k.dim() != 2 or hadamard_k.shape[1] != k):
        raise ValueError(f"hadamard_k must be a square matrix, got {tuple(hadamard_k.shape)}")
    if n % k:
        raise ValueError(f"last dim {n} is not a multiple of K={k}")
    m = n // k
    if m & (m - 1):
        raise ValueError(f"n / K = {m} must be a power of two (n={n}, K={k})")
    return k, m


def fast_hadamard_transform_ref(x: torch.Tensor, hadamard_k: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of the online Hadamard transform defined in the module docstring."""
    n = x.shape[-1]
    k, m = _split_n(n, hadamard_k)
    z = x.to(torch.float32).reshape(-1, k, m)
    for _ in range(m.bit_length() - 1):
        z = z.reshape(-1, k, 2, m // 2)
        a, b = z[:, :, 0, :], z[:, :, 1, :]
        z = torch.stack((a + b, a - b), dim=-1).reshape(-1, k, m)
    z = z * (1.0 / math.sqrt(m))
    if hadamard_k is not None and k > 1:
        z = torch.matmul(hadamard_k.to(device=z.device, dtype=torch.float32).t(), z)
    return z.reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


def _hadamard_kernel(
    x_ptr,
    h_ptr,
    tmp_ptr,
    out_ptr,
    K,
    stride_xm,
    stride_om,
    scale,
    M: tl.constexpr,
    LOG_M: tl.constexpr,
    HAS_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_KO: tl.constexpr,
    BLOCK_KI: tl.constexpr,
    BLOCK_MC: tl.constexpr,
):
    """One program per row. Phase 1: FWHT along M for BLOCK_R of the K sub-rows at a time (to out, or to
    the fp32 scratch when K > 1). Phase 2 (K > 1): out = H_K^T @ scratch, tiled, with tl.dot."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    n = K * M
    tmp_row = tmp_ptr + row * n
    rm = tl.arange(0, M)
    for r0 in range(0, K, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        msk = (rr[:, None] < K) & (rm[None, :] < M)
        offs = rr[:, None] * M + rm[None, :]
        z = tl.load(x_row + offs, mask=msk, other=0.0).to(tl.float32)
        for _ in tl.static_range(LOG_M):
            pairs = tl.permute(tl.reshape(z, (BLOCK_R, 2, M // 2)), (0, 2, 1))
            a, b = tl.split(pairs)
            z = tl.reshape(tl.join(a + b, a - b), (BLOCK_R, M))
        z = z * scale
        if HAS_K:
            tl.store(tmp_row + offs, z, mask=msk)
        else:
            tl.store(out_row + offs, z.to(out_ptr.dtype.element_ty), mask=msk)
    if HAS_K:
        tl.debug_barrier()  # scratch written above is read back by other threads of this program
        for o0 in range(0, K, BLOCK_KO):
            ro = o0 + tl.arange(0, BLOCK_KO)
            for c0 in range(0, M, BLOCK_MC):
                rc = c0 + tl.arange(0, BLOCK_MC)
                acc = tl.zeros([BLOCK_KO, BLOCK_MC], dtype=tl.float32)
                for i0 in range(0, K, BLOCK_KI):
                    ri = i0 + tl.arange(0, BLOCK_KI)
                    # h[o, i] = H_K[i, o]  (H_K^T)
                    h = tl.load(
                        h_ptr + ri[None, :] * K + ro[:, None], mask=(ro[:, None] < K) & (ri[None, :] < K), other=0.0
                    ).to(tl.float32)
                    zt = tl.load(
                        tmp_row + ri[:, None] * M + rc[None, :], mask=(ri[:, None] < K) & (rc[None, :] < M), other=0.0
                    )
                    acc += tl.dot(h, zt, input_precision="ieee")
                om = (ro[:, None] < K) & (rc[None, :] < M)
                tl.store(out_row + ro[:, None] * M + rc[None, :], acc.to(out_ptr.dtype.element_ty), mask=om)


hadamard_kernel = LazyKernel(_hadamard_kernel)


def fast_hadamard_transform_triton(
    x: torch.Tensor,
    hadamard_k: torch.Tensor | None = None,
    *,
    block_r: int | None = None,
    block_k: int | None = None,
    block_mc: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`fast_hadamard_transform_ref` (tile sizes are tuning-only, powers of two)."""
    n = x.shape[-1]
    k, m = _split_n(n, hadamard_k)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n), device=x.device, dtype=x.dtype)
    if rows == 0:
        return out.reshape(x.shape)
    has_k = hadamard_k is not None and k > 1
    if has_k:
        h = hadamard_k.to(device=x.device, dtype=torch.float32).contiguous()
        tmp = torch.empty((rows, n), device=x.device, dtype=torch.float32)
    else:
        h, tmp = out, out
    br = block_r or max(1, min(next_power_of_2(k), 4096 // m))
    bk = block_k or min(max(16, next_power_of_2(k)), 32)
    bmc = block_mc or min(max(16, m), 64)
    hadamard_kernel[(rows,)](
        x2,
        h,
        tmp,
        out,
        k,
        x2.stride(0),
        out.stride(0),
        1.0 / math.sqrt(m),
        M=m,
        LOG_M=m.bit_length() - 1,
        HAS_K=has_k,
        BLOCK_R=br,
        BLOCK_KO=bk,
        BLOCK_KI=bk,
        BLOCK_MC=bmc,
        num_warps=8 if br * m >= 4096 else 4,
    )
    return out.reshape(x.shape)


def fast_hadamard_transform(
    x: torch.Tensor, hadamard_k: torch.Tensor | None = None, *, force_triton: bool = False
) -> torch.Tensor:
    """Orthogonal online Hadamard transform of the last dim: ``x @ (H_K kron H_M) / sqrt(M)`` per row.

    Args:
        x: (..., n) with n = K * 2^m.
        hadamard_k: normalised orthogonal K x K matrix (None for power-of-two n); see module docstring
            for the exact index ordering.
        force_triton: run the Triton kernel even on CPU (through the interpreter).
    """
    if use_triton(x, force_triton):
        return fast_hadamard_transform_triton(x, hadamard_k)
    return fast_hadamard_transform_ref(x, hadamard_k)
