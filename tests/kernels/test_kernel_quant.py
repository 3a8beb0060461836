"""Per-token activation quantization: hand-computed cases, reference vs Triton (interpreter), dispatch."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import assert_within_ulps, needs_cuda

import fair_calib.kernels.quant as quant_mod
from fair_calib.kernels import (
    QuantizedActivation,
    quantize_per_token,
    quantize_per_token_ref,
    quantize_per_token_triton,
)

IMPLS = ["ref", "triton"]


def _impl(name: str):
    return quantize_per_token_ref if name == "ref" else quantize_per_token_triton


def _use(name: str, request: pytest.FixtureRequest) -> None:
    if name == "triton":
        request.getfixturevalue("interp")


# ---------------------------------------------------------------------------------------------- hand cases


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_symmetric_absmax(impl, request):
    _use(impl, request)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5]])
    out = _impl(impl)(x, 4, real=True)
    assert isinstance(out, QuantizedActivation) and out.zero is None
    assert out.q.dtype == torch.int8 and out.scale.dtype == torch.float32
    assert out.scale.tolist() == [0.5]  # 3.5 / 7
    assert out.q.tolist() == [[2, -4, 1, 7]]
    fake = _impl(impl)(x, 4)
    assert fake.dtype == x.dtype and torch.equal(fake, x)  # every value is on the grid


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_symmetric_range_convention_and_clip(impl, request):
    _use(impl, request)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5]])
    out = _impl(impl)(x, 4, real=True, sym_scale="halfstep")  # 2 * 3.5 / 15
    torch.testing.assert_close(out.scale, torch.tensor([7.0 / 15.0]))
    assert out.q.tolist() == [[2, -4, 1, 7]]  # 3.5 / (7/15) = 7.5 -> clamped to 7
    clipped = _impl(impl)(x, 4, real=True, clip=0.5)  # scale 0.25: 3.5/0.25 = 14 -> 7, -2/0.25 = -8
    assert clipped.scale.tolist() == [0.25]
    assert clipped.q.tolist() == [[4, -8, 2, 7]]


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_round_half_to_even(impl, request):
    _use(impl, request)
    x = torch.tensor([[7.0, 2.5, 1.5, -0.5, 0.5, -2.5, 3.5, -7.0]])  # scale exactly 1
    out = _impl(impl)(x, 4, real=True)
    assert out.scale.tolist() == [1.0]
    assert out.q.tolist() == [[7, 2, 2, 0, 0, -2, 4, -7]]


@pytest.mark.parametrize("impl", IMPLS)
def test_hand_asymmetric(impl, request):
    _use(impl, request)
    x = torch.tensor([[-1.0, 0.0, 1.0, 2.0]])
    out = _impl(impl)(x, 2, sym=False, real=True)  # scale (2 - -1)/3 = 1, zero = 1
    assert out.scale.tolist() == [1.0] and out.zero.tolist() == [1] and out.zero.dtype == torch.int32
    assert out.q.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(out.dequantize(), x)
    y = torch.tensor([[-1.0, 0.4, 2.0]])
    o4 = _impl(impl)(y, 4, sym=False, real=True)  # scale 3/15 = 0.2, zero = 5
    torch.testing.assert_close(o4.scale, torch.tensor([0.2]))
    assert o4.zero.tolist() == [5] and o4.q.tolist() == [[0, 7, 15]]
    # positive-only rows keep 0 in the range: lo = 0 -> zero point 0
    p = _impl(impl)(torch.tensor([[1.0, 3.0]]), 4, sym=False, real=True)
    assert p.zero.tolist() == [0] and p.q.tolist() == [[5, 15]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sym", [True, False])
def test_all_zero_token_is_finite(impl, sym, request):
    _use(impl, request)
    x = torch.zeros(2, 5)
    x[1] = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.25])
    fake = _impl(impl)(x, 4, sym=sym)
    assert torch.isfinite(fake).all() and torch.equal(fake[0], torch.zeros(5))
    real = _impl(impl)(x, 4, sym=sym, real=True)
    assert real.scale[0].item() == pytest.approx(1e-8) and torch.isfinite(real.scale).all()
    assert torch.equal(real.q[0].to(torch.int32), torch.full((5,), 0 if sym else int(real.zero[0])))


# ---------------------------------------------------------------------------------------------- ref vs triton

CASES = [
    # (sym, sym_scale, real, per-token clip)
    (True, "absmax", False, True),
    (True, "absmax", True, False),
    (True, "halfstep", False, False),
    (True, "halfstep", True, True),
    (False, "absmax", False, False),
    (False, "absmax", True, True),
]


@pytest.mark.parametrize("sym,sym_scale,real,per_token_clip", CASES)
def test_triton_matches_reference_bitwise(sym, sym_scale, real, per_token_clip, interp, gen):
    # 37 tokens x 96 channels; block_n=64 makes every row span a full and a masked partial tile
    x = torch.randn(37, 96, generator=gen) * torch.rand(37, 1, generator=gen) * 4
    x[3] = 0.0
    clip = 0.5 + 0.5 * torch.rand(37, generator=gen) if per_token_clip else 0.9
    kw = dict(sym=sym, sym_scale=sym_scale, real=real, clip=clip)
    a = quantize_per_token_ref(x, 4, **kw)
    b = quantize_per_token_triton(x, 4, block_n=64, **kw)
    if real:
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
        assert (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
        assert b.scale.shape == (37,)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits,sym", [(8, True), (3, False), (2, True)])
def test_other_bit_widths(bits, sym, interp, gen):
    x = torch.randn(5, 40, generator=gen)
    a = quantize_per_token_ref(x, bits, sym=sym, real=True)
    b = quantize_per_token_triton(x, bits, sym=sym, real=True)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert a.q.min() >= lo and a.q.max() <= hi


def test_half_precision_and_batched_shapes(interp, gen):
    x = torch.randn(2, 3, 40, generator=gen).to(torch.float16)
    clip = 0.6 + 0.4 * torch.rand(2, 3, generator=gen)
    a = quantize_per_token_ref(x, 4, clip=clip)
    b = quantize_per_token_triton(x, 4, clip=clip)
    assert b.dtype == torch.float16 and b.shape == x.shape and torch.equal(a, b)
    ra = quantize_per_token_ref(x, 4, real=True, sym=False)
    rb = quantize_per_token_triton(x, 4, real=True, sym=False)
    assert rb.scale.shape == (2, 3) and rb.zero.shape == (2, 3)
    assert torch.equal(ra.q, rb.q) and torch.equal(ra.zero, rb.zero)
    xb = x.to(torch.bfloat16)
    assert_within_ulps(quantize_per_token_ref(xb, 4), quantize_per_token_triton(xb, 4))


def test_strided_input(interp, gen):
    base = torch.randn(9, 64, generator=gen)
    x = base[:, 5:45]  # row stride 64, unit last stride: used in place
    assert torch.equal(quantize_per_token_ref(x, 4), quantize_per_token_triton(x, 4))
    xt = torch.randn(40, 9, generator=gen).t()  # non-unit last stride: copied
    assert torch.equal(quantize_per_token_ref(xt, 4, sym=False), quantize_per_token_triton(xt, 4, sym=False))


def test_fake_equals_dequantized_real(gen):
    x = torch.randn(6, 33, generator=gen)
    for sym in (True, False):
        real = quantize_per_token_ref(x, 4, sym=sym, real=True)
        assert torch.equal(real.dequantize(), quantize_per_token_ref(x, 4, sym=sym))


@pytest.mark.parametrize("sym,convention", [(True, "absmax"), (True, "halfstep"), (False, "absmax")])
def test_reference_agrees_with_project_grids(sym, convention, gen):
    """Same grid, bit for bit, as the training-time fake quantizer in fair_calib.quant.grids."""
    from fair_calib.quant.grids import QuantSpec, fake_quant_lastdim

    x = torch.randn(9, 50, generator=gen) * 3
    clip = 0.6 + 0.4 * torch.rand(9, 1, generator=gen)
    spec = QuantSpec(bits=4, symmetric=sym, scale_convention=convention)
    ours = quantize_per_token_ref(x, 4, sym=sym, sym_scale=convention, clip=clip.squeeze(1))
    assert torch.equal(ours, fake_quant_lastdim(x, spec, clip=clip))


def test_quantization_error_bounded_by_half_step(gen):
    x = torch.randn(16, 64, generator=gen)
    real = quantize_per_token_ref(x, 4, real=True)
    err = (real.dequantize() - x).abs()
    assert bool((err <= real.scale[:, None] / 2 + 1e-6).all())


# ---------------------------------------------------------------------------------------------- validation, dispatch


def test_invalid_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError):
        quantize_per_token_ref(x, 1)
    with pytest.raises(ValueError):
        quantize_per_token_ref(x, 9)
    with pytest.raises(ValueError):
        quantize_per_token_ref(x, 4, sym_scale="nope")
    with pytest.raises(ValueError):
        quantize_per_token_ref(x, 8, sym=False, real=True)  # codes 0..255 do not fit int8
    with pytest.raises(ValueError):
        quantize_per_token_ref(x, 4, clip=torch.ones(2))


def test_dispatch_cpu_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def boom(*a, **k):
        raise AssertionError("triton path taken")

    monkeypatch.setattr(quant_mod, "quantize_per_token_triton", boom)
    x = torch.randn(2, 8)
    assert torch.equal(quantize_per_token(x, 4), quantize_per_token_ref(x, 4))


def test_dispatch_env_and_force(monkeypatch, interp):
    calls = []
    orig = quant_mod.quantize_per_token_triton

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(quant_mod, "quantize_per_token_triton", spy)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.5]])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(quantize_per_token(x, 4), x)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert quantize_per_token(x, 4, real=True, force_triton=True).q.tolist() == [[2, -4, 1, 7]]
    assert len(calls) == 2


@needs_cuda
@pytest.mark.parametrize("sym,real", [(True, False), (True, True), (False, True)])
def test_cuda_matches_reference(sym, real):
    x = torch.randn(300, 4096, device="cuda", dtype=torch.float16)
    a = quantize_per_token_ref(x, 4, sym=sym, real=real, clip=0.9)
    b = quantize_per_token(x, 4, sym=sym, real=real, clip=0.9)
    if real:
        assert torch.equal(a.scale, b.scale) and torch.equal(a.q, b.q)
    else:
        assert torch.equal(a, b)
