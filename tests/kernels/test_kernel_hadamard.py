"""Online Walsh-Hadamard transform: matrices, reference vs dense Kronecker product, Triton vs reference."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_test_utils import assert_within_ulps, needs_cuda

from fair_calib.kernels import fast_hadamard_transform, fast_hadamard_transform_ref, fast_hadamard_transform_triton
from fair_calib.quant.hadamard import apply_hadamard, hadamard_factor, hadamard_matrix


def h_k(k: int, device: str | None = None) -> torch.Tensor | None:
    """Normalised K x K Hadamard matrix from the project's constructions (None for K = 1)."""
    if k == 1:
        return None
    assert hadamard_factor(k) == (k, 1)  # hadamard_matrix(k) is then H_K itself
    return (hadamard_matrix(k) / math.sqrt(k)).to(device=device, dtype=torch.float32)


def sylvester(m: int) -> torch.Tensor:
    """Natural-order Sylvester matrix H[i, j] = (-1)^popcount(i & j), built independently of the code under test."""
    parity = torch.tensor([[bin(a & b).count("1") % 2 for b in range(m)] for a in range(m)])
    return (1 - 2 * parity).to(torch.float64)


@pytest.mark.parametrize("n,k", [(64, 1), (192, 12), (448, 28), (12, 12)])
def test_reference_matches_dense_kronecker_and_project_convention(n, k, gen):
    x = torch.randn(5, n, generator=gen)
    hk = h_k(k)
    m = n // k
    hk64 = torch.ones(1, 1, dtype=torch.float64) if hk is None else hk.double()
    dense = torch.kron(hk64, sylvester(m) / math.sqrt(m))
    y = fast_hadamard_transform_ref(x, hk)
    torch.testing.assert_close(y.double(), x.double() @ dense, rtol=0, atol=2e-6)  # row vectors: x @ H
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)  # orthogonal
    # same matrix and ordering as fair_calib.quant.hadamard.apply_hadamard (unnormalised H_K, 1/sqrt(n))
    hk_pm1 = None if k == 1 else hadamard_matrix(k).to(torch.float32)
    torch.testing.assert_close(y, apply_hadamard(x, hk_pm1), rtol=0, atol=2e-6)


def test_power_of_two_is_self_inverse(gen):
    x = torch.randn(3, 256, generator=gen)
    torch.testing.assert_close(fast_hadamard_transform_ref(fast_hadamard_transform_ref(x)), x, rtol=0, atol=1e-5)
    assert fast_hadamard_transform_ref(torch.ones(1, 16))[0, 0].item() == pytest.approx(4.0)  # sqrt(16)


def test_triton_power_of_two_is_bitwise(interp, gen):
    x = torch.randn(37, 64, generator=gen)
    assert torch.equal(fast_hadamard_transform_triton(x), fast_hadamard_transform_ref(x))


@pytest.mark.parametrize(
    "n,k,tiles",
    [
        (192, 12, {}),  # 12 x 16, default tiles
        (448, 28, {"block_r": 4, "block_k": 16, "block_mc": 16}),  # loops over K sub-rows, K tiles, M tiles
        (384, 12, {"block_r": 8, "block_k": 16}),  # 12 x 32
        (12, 12, {}),  # M = 1
    ],
)
def test_triton_kron_extension_matches_reference(n, k, tiles, interp, gen):
    tokens = 37 if n == 192 else 6
    x = torch.randn(tokens, n, generator=gen)
    hk = h_k(k)
    a = fast_hadamard_transform_ref(x, hk)
    b = fast_hadamard_transform_triton(x, hk, **tiles)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-6)


def test_half_precision_batched_and_dispatch(interp, gen, monkeypatch):
    x = torch.randn(2, 3, 96, generator=gen).to(torch.float16)
    hk = h_k(12)
    a = fast_hadamard_transform_ref(x, hk)
    b = fast_hadamard_transform(x, hk, force_triton=True)
    assert b.dtype == torch.float16 and b.shape == x.shape
    assert_within_ulps(b, a)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert_within_ulps(fast_hadamard_transform(x, hk), a)


def test_invalid_sizes():
    with pytest.raises(ValueError):
        fast_hadamard_transform_ref(torch.randn(2, 96))  # not a power of two without H_K
    with pytest.raises(ValueError):
        fast_hadamard_transform_ref(torch.randn(2, 100), h_k(12))
    with pytest.raises(ValueError):
        fast_hadamard_transform_ref(torch.randn(2, 120), h_k(12))  # 120 / 12 = 10


@needs_cuda
@pytest.mark.parametrize("n", [4096, 12288, 3584, 18944])
def test_cuda_matches_reference(n):
    k, _ = hadamard_factor(n)
    hk = h_k(k, device="cuda")
    x = torch.randn(64, n, device="cuda")
    torch.testing.assert_close(fast_hadamard_transform(x, hk), fast_hadamard_transform_ref(x, hk), rtol=0, atol=1e-5)
    assert math.isfinite(fast_hadamard_transform(x.half(), hk).float().sum().item())
