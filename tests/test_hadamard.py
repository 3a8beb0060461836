"""Tests for fair_calib.quant.hadamard (QuaRot Hadamard constructions and the fast transform)."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib.quant.hadamard import apply_hadamard, hadamard_factor, hadamard_matrix, random_hadamard

# Sizes required by DESIGN 4.5 / the model widths (tiny models, Dream, LLaDA).
REQUIRED = [1, 2, 4, 8, 32, 64, 12, 20, 28, 36, 40, 52, 60, 96, 108, 140, 148, 156, 172, 192, 384, 448]


@pytest.mark.parametrize("n", REQUIRED)
def test_hadamard_is_hadamard(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (1, 1)),
        (4096, (1, 4096)),
        (12, (12, 1)),
        (40, (20, 2)),  # 5 and 10 have no Hadamard matrix, 20 = 19 + 1 (Paley I)
        (96, (12, 8)),
        (192, (12, 16)),
        (384, (12, 32)),
        (448, (28, 16)),
        (3584, (28, 128)),  # Dream hidden
        (18944, (148, 128)),  # Dream intermediate
        (12288, (12, 1024)),  # LLaDA MLP hidden
        (11008, (172, 64)),
    ],
)
def test_hadamard_factor(n: int, expected: tuple[int, int]) -> None:
    assert hadamard_factor(n) == expected


def test_coverage_of_multiples_of_four() -> None:
    """Every multiple of 4 up to 256 is built except those needing constructions we do not have."""
    missing = []
    for n in range(4, 257, 4):
        try:
            hadamard_factor(n)
        except ValueError:
            missing.append(n)
    assert missing == [92, 116, 184, 188, 232, 236]


def test_prime_power_paley_sizes() -> None:
    # 28 = 27 + 1 over GF(27), 52 = 2 (25 + 1) over GF(25), 244 = 243 + 1 over GF(3^5), 100 = 2 (49 + 1)
    for n in (28, 52, 100, 244):
        h = hadamard_matrix(n)
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_dtype_and_fresh_copy() -> None:
    h = hadamard_matrix(12, dtype=torch.float32)
    assert h.dtype == torch.float32
    h.zero_()  # must not corrupt the cache
    assert torch.equal(hadamard_matrix(12).abs(), torch.ones(12, 12, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 14, 92, 184])
def test_unknown_size_raises(n: int) -> None:
    with pytest.raises(ValueError, match=f"n={n}") as err:
        hadamard_factor(n)
    assert "tried n = K * 2^m" in str(err.value)
    with pytest.raises(ValueError):
        hadamard_matrix(n)


def test_error_message_lists_factorizations() -> None:
    with pytest.raises(ValueError, match=r"\(3, 2\), \(6, 1\)") as err:
        hadamard_factor(6)
    assert "multiple of 4" in str(err.value)
    with pytest.raises(ValueError, match=r"\(23, 4\), \(46, 2\), \(92, 1\)"):
        hadamard_factor(92)
    for bad in (0, -4):
        with pytest.raises(ValueError, match="positive"):
            hadamard_factor(bad)


@pytest.mark.parametrize("n", [12, 40, 156, 192, 448])
def test_random_hadamard_orthogonal(n: int) -> None:
    q = random_hadamard(n, seed=3)
    assert q.dtype == torch.float64
    eye = torch.eye(n, dtype=torch.float64)
    assert (q @ q.T - eye).abs().max().item() < 1e-12
    assert (q.T @ q - eye).abs().max().item() < 1e-12
    assert torch.allclose(q.abs(), torch.full_like(q, 1.0 / math.sqrt(n)), rtol=0, atol=1e-15)


def test_random_hadamard_seeded() -> None:
    state = torch.get_rng_state()
    a, b, c = random_hadamard(64, seed=1), random_hadamard(64, seed=1), random_hadamard(64, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    # rows are sign-flipped rows of the normalized Hadamard matrix: Q = diag(d) H / sqrt(n)
    d = (a * math.sqrt(64) / hadamard_matrix(64))[:, 0]
    assert torch.equal(a, d[:, None] * hadamard_matrix(64) / 8.0)


@pytest.mark.parametrize("n", [1, 2, 16, 192, 448, 148 * 4, 156 * 2])
def test_apply_hadamard_matches_matmul(n: int) -> None:
    h = hadamard_matrix(n)
    g = torch.Generator().manual_seed(n)
    # integer inputs: unnormalized transform is bit-exact in float64
    xi = torch.randint(-8, 9, (3, 2, n), generator=g).to(torch.float64)
    assert torch.equal(apply_hadamard(xi, normalize=False), xi @ h)
    # random inputs: orthonormal transform equals x @ (H / sqrt(n)) to float64 rounding
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    y = apply_hadamard(x)
    ref = x @ (h / math.sqrt(n))
    assert y.shape == x.shape and y.dtype == torch.float64
    assert (y - ref).abs().max().item() < 1e-12
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)


def test_apply_hadamard_float32_and_explicit_k() -> None:
    n = 192
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    ref = x.double() @ (hadamard_matrix(n) / math.sqrt(n))
    y = apply_hadamard(x)
    assert y.dtype == torch.float32
    assert (y.double() - ref).abs().max().item() < 1e-5
    # explicit K matrix (same H_12 -> same result); a different H_K is honoured: x @ (H_K (x) H_16) / sqrt(n)
    hk = hadamard_matrix(12)
    assert torch.equal(apply_hadamard(x, k_matrix=hk), y)
    hk2 = -hk.flip(0)
    ref2 = x.double() @ (torch.kron(hk2, hadamard_matrix(16)) / math.sqrt(n))
    assert (apply_hadamard(x.double(), k_matrix=hk2) - ref2).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="does not fit"):
        apply_hadamard(x, k_matrix=hadamard_matrix(20))
    # input untouched, output is a new tensor even for n == 1
    x1 = torch.ones(3, 1)
    out = apply_hadamard(x1, normalize=False)
    out.add_(1.0)
    assert torch.equal(x1, torch.ones(3, 1))


def test_apply_hadamard_large_width_is_orthonormal() -> None:
    x = torch.randn(2, 18944, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = apply_hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    # H_n is symmetric up to the K part: applying twice with H_K^T gives back x (H H^T = n I)
    hk = hadamard_matrix(148)
    back = apply_hadamard(y, k_matrix=hk.T.contiguous())
    assert (back - x).abs().max().item() < 1e-10
