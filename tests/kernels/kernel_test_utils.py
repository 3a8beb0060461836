"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

from fair_calib.kernels import QuantizedActivation

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_orthogonal(n: int, gen: torch.Generator, scale_spread: float = 0.0) -> torch.Tensor:
    """Random orthogonal matrix (optionally times a diagonal with entries in [1, 1 + spread])."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    if scale_spread:
        q = q * (1.0 + scale_spread * torch.rand(n, generator=gen, dtype=torch.float64))[None, :]
    return q.to(torch.float32)


def assert_codes_close(a: QuantizedActivation, b: QuantizedActivation, max_frac: float = 0.01) -> None:
    """Real-mode outputs from two implementations whose inputs differ by float noise: same scales up to
    a few ulps, codes equal except for rare values on a rounding boundary (off by exactly one)."""
    assert a.q.dtype == b.q.dtype == torch.int8 and a.q.shape == b.q.shape
    torch.testing.assert_close(a.scale, b.scale, rtol=1e-5, atol=0.0)
    assert (a.zero is None) == (b.zero is None)
    if a.zero is not None:
        assert (a.zero - b.zero).abs().max().item() <= 1
    diff = (a.q.to(torch.int32) - b.q.to(torch.int32)).abs()
    assert diff.max().item() <= 1
    assert diff.to(torch.float32).mean().item() <= max_frac


def assert_fake_close(a: torch.Tensor, b: torch.Tensor, step: torch.Tensor, max_frac: float = 0.01) -> None:
    """Fake-quant outputs: equal up to one quantization step (``step`` broadcast per token) on rare values."""
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (a.to(torch.float32) - b.to(torch.float32)).abs()
    tol = step.to(torch.float32) * 1.001 + 1e-6
    assert bool((diff <= tol).all())
    assert (diff > 1e-5 * (1 + a.abs().to(torch.float32))).to(torch.float32).mean().item() <= max_frac


def assert_within_ulps(a: torch.Tensor, b: torch.Tensor, ulps: int = 1) -> None:
    """Low-precision outputs equal up to ``ulps`` units in the last place (Triton's interpreter truncates
    fp32 -> bf16 where compiled Triton and torch round to nearest even)."""
    assert a.dtype == b.dtype
    eps = torch.finfo(a.dtype).eps
    af, bf = a.to(torch.float32), b.to(torch.float32)
    tol = ulps * eps * torch.maximum(af.abs(), bf.abs()) + 1e-30
    assert bool(((af - bf).abs() <= tol).all())
