"""W4A4 GEMM: reference vs exact integer math, Triton (interpreter) vs reference for every weight format."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import assert_within_ulps, needs_cuda

from fair_calib.kernels import (
    pack_int4_ref,
    pack_int32_ref,
    quantize_per_token_ref,
    w4a4_gemm,
    w4a4_gemm_ref,
    w4a4_gemm_triton,
    w4a4_linear,
)

M, N, K = 37, 40, 100  # none divides the 16 x 16 x 32 tiles used below


@pytest.fixture
def operands(gen):
    a = torch.randint(-8, 8, (M, K), generator=gen, dtype=torch.int8)
    w = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    sa = torch.rand(M, generator=gen) + 0.05
    sw = torch.rand(N, generator=gen) + 0.05
    return a, w, sa, sw


def _exact(a, w, sa, sw, z=None):
    acc = a.long() - (0 if z is None else z.long()[:, None])
    return (acc @ w.long().t()).double() * sa.double()[:, None] * sw.double()[None, :]


def test_reference_is_exact_integer_gemm(operands):
    a, w, sa, sw = operands
    out = w4a4_gemm_ref(a, sa, w, sw)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    acc = (a.long() @ w.long().t()).to(torch.float32)
    assert torch.equal(out, acc * sa[:, None] * sw[None, :])
    torch.testing.assert_close(out.double(), _exact(a, w, sa, sw), rtol=1e-6, atol=1e-5)
    for packed in (pack_int32_ref(w), pack_int4_ref(w)):
        assert torch.equal(w4a4_gemm_ref(a, sa, packed, sw), out)


@pytest.mark.parametrize("fmt", ["int8", "int32", "uint8"])
def test_triton_matches_reference_bitwise(fmt, operands, interp):
    a, w, sa, sw = operands
    wf = {"int8": w, "int32": pack_int32_ref(w), "uint8": pack_int4_ref(w)}[fmt]
    ref = w4a4_gemm_ref(a, sa, wf, sw)
    out = w4a4_gemm_triton(a, sa, wf, sw, block_m=16, block_n=16, block_k=32)
    assert torch.equal(out, ref)


def test_asymmetric_activations_and_out_dtypes(operands, interp, gen):
    a, w, sa, sw = operands
    au = torch.randint(0, 16, (M, K), generator=gen, dtype=torch.int8)
    z = torch.randint(0, 16, (M,), generator=gen, dtype=torch.int32)
    ref = w4a4_gemm_ref(au, sa, w, sw, a_zero=z)
    torch.testing.assert_close(ref.double(), _exact(au, w, sa, sw, z), rtol=1e-6, atol=1e-5)
    assert torch.equal(w4a4_gemm_triton(au, sa, pack_int32_ref(w), sw, a_zero=z), ref)
    h = w4a4_gemm_triton(a, sa, w, sw, out_dtype=torch.float16)
    assert h.dtype == torch.float16 and torch.equal(h, w4a4_gemm_ref(a, sa, w, sw, out_dtype=torch.float16))
    bf = w4a4_gemm_triton(a, sa, w, sw, out_dtype=torch.bfloat16)
    assert_within_ulps(bf, w4a4_gemm_ref(a, sa, w, sw, out_dtype=torch.bfloat16))


def test_linear_end_to_end(interp, gen):
    x = torch.randn(2, 5, 72, generator=gen)
    wf = torch.randn(24, 72, generator=gen)
    sw = wf.abs().amax(dim=1) / 7
    wq = torch.clamp(torch.round(wf / sw[:, None]), -8, 7).to(torch.int8)
    bias = torch.randn(24, generator=gen)
    ref = w4a4_linear(x, wq, sw, bias)
    tri = w4a4_linear(x, pack_int32_ref(wq), sw, bias, force_triton=True)
    assert tri.shape == (2, 5, 24) and torch.equal(tri, ref)
    # equals the fake-quant formulation up to fp32 rounding
    xf = quantize_per_token_ref(x, 4)
    torch.testing.assert_close(ref, xf @ (wq.float() * sw[:, None]).t() + bias, rtol=1e-5, atol=1e-4)
    asym = w4a4_linear(x, wq, sw, act_sym=False)
    fq = quantize_per_token_ref(x, 4, sym=False)
    torch.testing.assert_close(asym, fq @ (wq.float() * sw[:, None]).t(), rtol=1e-5, atol=1e-4)


def test_shape_errors(operands):
    a, w, sa, sw = operands
    with pytest.raises(ValueError):
        w4a4_gemm_ref(a, sa, w[:, :50], sw)
    with pytest.raises(ValueError):
        w4a4_gemm_ref(a, sa, pack_int32_ref(w)[:, :5], sw)
    with pytest.raises(TypeError):
        w4a4_gemm_ref(a, sa, w.float(), sw)
    with pytest.raises(ValueError):
        w4a4_gemm_ref(a, sa[:3], w, sw)


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 300])
def test_cuda_matches_reference(m):
    a = torch.randint(-8, 8, (m, 4096), device="cuda", dtype=torch.int8)
    w = torch.randint(-8, 8, (1024, 4096), device="cuda", dtype=torch.int8)
    sa = torch.rand(m, device="cuda")
    sw = torch.rand(1024, device="cuda")
    ref = w4a4_gemm_ref(a, sa, w, sw)
    assert torch.equal(w4a4_gemm(a, sa, pack_int32_ref(w.cpu()).cuda(), sw), ref)
    assert torch.equal(w4a4_gemm(a, sa, w, sw), ref)
