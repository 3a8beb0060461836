"""FlatQuant online Kronecker transform + quantization: reference vs dense kron, Triton vs reference."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import assert_codes_close, assert_fake_close, needs_cuda, random_orthogonal

from fair_calib.kernels import (
    kron_factors,
    kron_quantize,
    kron_quantize_ref,
    kron_quantize_triton,
    kron_transform,
    quantize_per_token_ref,
)


def test_kron_factors_design_examples():
    assert kron_factors(4096) == (64, 64)
    assert kron_factors(12288) == (96, 128)
    assert kron_factors(3584) == (56, 64)
    assert kron_factors(18944) == (128, 148)
    assert kron_factors(192) == (12, 16)
    assert kron_factors(384) == (16, 24)
    assert kron_factors(448) == (16, 28)


@pytest.mark.parametrize("n1,n2", [(12, 16), (16, 28)])
def test_reference_matches_dense_kron(n1, n2, gen):
    x = torch.randn(3, 4, n1 * n2, generator=gen)
    p1, p2 = torch.randn(n1, n1, generator=gen), torch.randn(n2, n2, generator=gen)
    s = torch.rand(n1 * n2, generator=gen) + 0.5
    dense = (x.double() / s.double()) @ torch.kron(p1.double(), p2.double())
    y = kron_quantize_ref(x, p1, p2, smooth=s, bits=None)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), dense, rtol=1e-5, atol=1e-4)
    q = kron_quantize_ref(x, p1, p2, smooth=s, bits=4, real=True)
    ref_q = quantize_per_token_ref(y, 4, real=True)
    assert torch.equal(q.q, ref_q.q) and torch.equal(q.scale, ref_q.scale)


def test_identity_factors_reduce_to_plain_quantization(gen):
    x = torch.randn(5, 96, generator=gen)
    eye8, eye12 = torch.eye(8), torch.eye(12)
    assert torch.equal(kron_quantize_ref(x, eye8, eye12, bits=4), quantize_per_token_ref(x, 4))


def test_triton_transform_only(interp, gen):
    n1, n2 = 12, 16  # n = 192; 37 tokens
    x = torch.randn(37, n1 * n2, generator=gen)
    p1, p2 = random_orthogonal(n1, gen, 0.5), random_orthogonal(n2, gen, 0.5)
    s = torch.rand(n1 * n2, generator=gen) + 0.5
    a = kron_quantize_ref(x, p1, p2, smooth=s, bits=None)
    b = kron_transform(x, p1, p2, smooth=s, force_triton=True)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n1,n2,sym,real,sym_scale,tiles",
    [
        (12, 16, True, True, "absmax", {}),  # n = 192
        (16, 24, True, False, "absmax", {"block_j": 16, "block_k": 16, "block_c": 16, "block_n": 128}),  # n = 384
        (16, 28, False, True, "absmax", {"block_k": 16, "block_c": 16}),  # n = 448, asymmetric
        (24, 20, False, False, "absmax", {"block_j": 16}),  # reduction over n1 split in two tiles
        (16, 24, True, True, "halfstep", {}),
    ],
)
def test_triton_quantized_matches_reference(n1, n2, sym, real, sym_scale, tiles, interp, gen):
    tokens = 37 if n1 * n2 == 192 else 7
    x = torch.randn(tokens, n1 * n2, generator=gen) * (1 + 3 * torch.rand(tokens, 1, generator=gen))
    p1, p2 = random_orthogonal(n1, gen, 0.5), random_orthogonal(n2, gen, 0.5)
    s = torch.rand(n1 * n2, generator=gen) + 0.5
    clip = 0.7 + 0.3 * torch.rand(tokens, generator=gen)
    kw = dict(smooth=s, bits=4, sym=sym, clip=clip, sym_scale=sym_scale, real=real)
    a = kron_quantize_ref(x, p1, p2, **kw)
    b = kron_quantize_triton(x, p1, p2, **kw, **tiles)
    if real:
        assert_codes_close(a, b)
    else:
        step = quantize_per_token_ref(kron_quantize_ref(x, p1, p2, smooth=s, bits=None), 4, sym=sym, real=True)
        assert_fake_close(a, b, step.scale[:, None])


def test_half_precision_and_dispatch(interp, gen, monkeypatch):
    n1, n2 = 12, 16
    x = torch.randn(2, 3, n1 * n2, generator=gen).to(torch.float16)
    p1, p2 = random_orthogonal(n1, gen), random_orthogonal(n2, gen)
    a = kron_quantize_ref(x, p1, p2, bits=4, real=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    b = kron_quantize(x, p1, p2, bits=4, real=True)
    assert b.q.shape == x.shape and b.scale.shape == (2, 3)
    assert_codes_close(a, b)


def test_invalid_arguments():
    x = torch.randn(2, 96)
    with pytest.raises(ValueError):
        kron_quantize_ref(x, torch.eye(8), torch.eye(8))
    with pytest.raises(ValueError):
        kron_quantize_ref(x, torch.eye(8), torch.ones(12, 11))
    with pytest.raises(ValueError):
        kron_quantize_ref(x, torch.eye(8), torch.eye(12), smooth=torch.ones(5))


@needs_cuda
@pytest.mark.parametrize("n", [4096, 12288])
def test_cuda_matches_reference(n):
    n1, n2 = kron_factors(n)
    gen = torch.Generator().manual_seed(0)
    p1, p2 = random_orthogonal(n1, gen).cuda(), random_orthogonal(n2, gen).cuda()
    x = torch.randn(64, n, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(kron_transform(x, p1, p2), kron_quantize_ref(x, p1, p2, bits=None), rtol=2e-3, atol=2e-3)
    assert_codes_close(kron_quantize_ref(x, p1, p2, real=True), kron_quantize(x, p1, p2, real=True))
