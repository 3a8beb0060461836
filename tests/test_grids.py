"""Quantization grids against hand-computed examples: absmax / halfstep / asymmetric, granularity, STE, bit checks."""

from __future__ import annotations

import pytest
import torch

from fair_calib.quant.base import BitSettings
from fair_calib.quant.grids import (
    QuantSpec,
    asym_scale_zero,
    clip_pair_clamp,
    clip_pair_range,
    fake_quant_clip_pair,
    fake_quant_lastdim,
    fake_quant_weight,
    fake_quant_weight_clip_pair,
    quant_dequant,
    round_ste,
    sym_scale,
    weight_scale_zero,
)
from fair_calib.registry import ConfigError

W4 = QuantSpec(bits=4)


def test_spec_ranges() -> None:
    assert (W4.qmin, W4.qmax, W4.enabled) == (-8, 7, True)
    assert (QuantSpec(bits=3, symmetric=False).qmin, QuantSpec(bits=3, symmetric=False).qmax) == (0, 7)
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (-128, 127)
    assert not QuantSpec(bits=16).enabled


def test_symmetric_absmax_representable() -> None:
    # absmax 3.5 -> scale 3.5 / 7 = 0.5; x / s = [2, -4, 1, 7] are integers: every value survives exactly
    x = torch.tensor([1.0, -2.0, 0.5, 3.5])
    assert sym_scale(x.abs().amax(), 4).item() == 0.5
    assert torch.equal(fake_quant_lastdim(x, W4), x)


def test_symmetric_absmax_rounding() -> None:
    # absmax 1.4 -> s = 0.2; x / s = [1.25, -5, 3.7, 7] -> [1, -5, 4, 7] -> [0.2, -1.0, 0.8, 1.4]
    x = torch.tensor([0.25, -1.0, 0.74, 1.4])
    torch.testing.assert_close(fake_quant_lastdim(x, W4), torch.tensor([0.2, -1.0, 0.8, 1.4]))


def test_symmetric_clip_ratio_clamps_both_ends() -> None:
    # clip 0.5: s = 0.5 * 3.5 / 7 = 0.25; x / s = [4, -8, 2, 14] -> clamp to [-8, 7] -> [1, -2, 0.5, 1.75]
    x = torch.tensor([1.0, -2.0, 0.5, 3.5])
    expected = torch.tensor([1.0, -2.0, 0.5, 1.75])
    assert torch.equal(fake_quant_lastdim(x, QuantSpec(bits=4, clip_ratio=0.5)), expected)
    assert torch.equal(fake_quant_lastdim(x, W4, clip=torch.tensor(0.5)), expected)
    with pytest.raises(ValueError, match=r"clip_ratio must be in \(0, 1\]"):
        QuantSpec(bits=4, clip_ratio=1.5)


def test_halfstep_convention() -> None:
    # s = 2 * absmax / 15; absmax 7.5 -> s = 1; round-half-even: -7.5 -> -8, 7.5 -> 8 -> clamped to 7
    spec = QuantSpec(bits=4, scale_convention="halfstep")
    assert sym_scale(torch.tensor(7.5), 4, "halfstep").item() == 1.0
    x = torch.tensor([-7.5, 7.5, 1.2, -0.4])
    assert fake_quant_lastdim(x, spec).tolist() == [-8.0, 7.0, 1.0, 0.0]
    # on x = [1, -2, 0.5, 3.5]: s = 7/15, codes round(x / s) = [2, -4, 1, 7.5 -> 8 -> 7]
    x = torch.tensor([1.0, -2.0, 0.5, 3.5])
    s = 7 / 15
    torch.testing.assert_close(fake_quant_lastdim(x, spec), torch.tensor([2 * s, -4 * s, 1 * s, 7 * s]))
    # codes stay in [-8, 7] on random data and use the full 16-level range
    y = torch.randn(64, 256)
    scale = sym_scale(y.abs().amax(-1, keepdim=True), 4, "halfstep")
    codes = fake_quant_lastdim(y, spec) / scale
    torch.testing.assert_close(codes, codes.round())
    q = codes.round()
    assert q.min() == -8 and q.max() == 7 and q.unique().numel() == 16
    with pytest.raises(ValueError, match="scale_convention 'half' unknown; valid: absmax, halfstep"):
        QuantSpec(bits=4, scale_convention="half")


def test_asymmetric_with_zero_point() -> None:
    # 3 bits: s = (5 - (-1)) / 7 = 6/7, z = round(1 / s) = round(1.1667) = 1
    # x / s = [-1.17, 0, 2.33, 5.83] -> round [-1, 0, 2, 6] + z -> codes [0, 1, 3, 7] -> (q - z) * s
    x = torch.tensor([-1.0, 0.0, 2.0, 5.0])
    s, z = asym_scale_zero(x.amin(), x.amax(), 3)
    torch.testing.assert_close(s, torch.tensor(6 / 7))
    assert z.item() == 1.0
    spec = QuantSpec(bits=3, symmetric=False)
    out = fake_quant_lastdim(x, spec)
    torch.testing.assert_close(out, torch.tensor([-1.0, 0.0, 2.0, 6.0]) * (6 / 7))
    assert out[1].item() == 0.0  # zero is exactly representable
    # an all-positive row keeps 0 in the grid: min is taken as 0, s = 4 / 7, z = 0
    s, z = asym_scale_zero(torch.tensor(1.0), torch.tensor(4.0), 3)
    torch.testing.assert_close(s, torch.tensor(4 / 7))
    assert z.item() == 0.0


def test_per_token_rows_are_independent() -> None:
    x = torch.tensor([[[1.0, -2.0, 0.5, 3.5], [0.1, 0.2, -0.7, 0.3]]])  # (B=1, L=2, D=4)
    out = fake_quant_lastdim(x, W4)
    assert torch.equal(out[0, 0], x[0, 0])  # s = 0.5
    torch.testing.assert_close(out[0, 1], x[0, 1])  # s = 0.1: codes [1, 2, -7, 3]
    # quantized with the first token's scale the second token would collapse to [0, 0, -0.5, 0.5]
    torch.testing.assert_close(fake_quant_lastdim(x.reshape(1, -1), W4)[0, 4:], torch.tensor([0.0, 0.0, -0.5, 0.5]))


def test_weight_granularities() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5, 3.5, 0.1, 0.2, -0.7, 0.3],
                      [0.25, -1.0, 0.74, 1.4, 4.0, 0.0, 0.0, 0.0]])
    grouped = fake_quant_weight(w, QuantSpec(bits=4, granularity="group", group_size=4))
    # group scales: 0.5, 0.1, 0.2, 4/7
    torch.testing.assert_close(grouped[0], w[0])
    torch.testing.assert_close(grouped[1], torch.tensor([0.2, -1.0, 0.8, 1.4, 4.0, 0.0, 0.0, 0.0]))
    channel = fake_quant_weight(w, W4)
    # one scale per output row: row 0 s = 0.5 -> second group collapses to [0, 0, -0.5, 0.5]
    torch.testing.assert_close(channel[0], torch.tensor([1.0, -2.0, 0.5, 3.5, 0.0, 0.0, -0.5, 0.5]))
    tensor = fake_quant_weight(w, QuantSpec(bits=4, granularity="tensor"))
    # one scale for everything: 4 / 7
    torch.testing.assert_close(tensor, (w / (4 / 7)).round().clamp(-8, 7) * (4 / 7))
    with pytest.raises(ValueError, match="group_size 3 does not divide the input size 8"):
        fake_quant_weight(w, QuantSpec(bits=4, granularity="group", group_size=3))
    with pytest.raises(ValueError, match="granularity 'row' unknown"):
        QuantSpec(bits=4, granularity="row")


def test_group_weights_with_per_channel_clip() -> None:
    w = torch.randn(3, 8)
    clip = torch.tensor([[1.0], [0.5], [0.8]])
    spec = QuantSpec(bits=4, granularity="group", group_size=4)
    out = fake_quant_weight(w, spec, clip)
    for r in range(3):
        for g in range(2):
            blk = w[r, 4 * g: 4 * g + 4]
            torch.testing.assert_close(out[r, 4 * g: 4 * g + 4], fake_quant_lastdim(blk, W4, clip[r, 0]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_scale_zero_matches_fake_quant(symmetric: bool) -> None:
    """GPTQ's column-wise quant_dequant with the row scales reproduces per-channel fake quantization."""
    w = torch.randn(6, 10)
    spec = QuantSpec(bits=3, symmetric=symmetric, clip_ratio=0.9)
    scale, zero = weight_scale_zero(w, spec)
    assert scale.shape == (6, 1) and (zero is None) == symmetric
    cols = torch.stack([quant_dequant(w[:, j: j + 1], scale, zero, spec)[:, 0] for j in range(10)], 1)
    torch.testing.assert_close(cols, fake_quant_weight(w, spec))


def test_zero_rows_and_full_precision() -> None:
    x = torch.zeros(2, 4)
    assert torch.equal(fake_quant_lastdim(x, W4), x)  # scale floor 1e-8: no 0/0
    assert torch.equal(fake_quant_lastdim(x, QuantSpec(bits=4, symmetric=False)), x)
    y = torch.randn(3, 5)
    assert fake_quant_lastdim(y, QuantSpec(bits=16)) is y
    assert fake_quant_weight(y, QuantSpec(bits=16)) is y


def test_more_bits_less_error() -> None:
    x = torch.randn(32, 128)
    errs = [(fake_quant_lastdim(x, QuantSpec(bits=b)) - x).pow(2).mean().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0
    # uniform rounding error ~ s^2 / 12 per element: at 8 bits s = absmax / 127
    s = x.abs().amax(-1) / 127
    assert errs[2] == pytest.approx((s.pow(2) / 12).mean().item(), rel=0.15)


def test_round_ste_gradient_is_identity() -> None:
    x = torch.tensor([0.2, 1.7, -2.5, 3.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0, 3.0]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_fake_quant_gradient_with_fixed_scale() -> None:
    # scale 0.5 at 4 bits covers [-4, 3.5]: inside the range the STE passes the gradient, the clamp stops it
    x = torch.tensor([0.3, -1.1, 10.0, -20.0], requires_grad=True)
    quant_dequant(x, torch.tensor(0.5), None, W4).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # learnable clipping receives a gradient through the scale
    clip = torch.tensor(0.8, requires_grad=True)
    fake_quant_lastdim(torch.randn(4, 16), W4, clip).pow(2).sum().backward()
    assert clip.grad is not None and clip.grad.abs() > 0


@pytest.mark.parametrize("bits", [0, 1, 17, 32])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match=f"bit width {bits} is out of range: use 2..16"):
        QuantSpec(bits=bits)
    with pytest.raises(ConfigError, match=f"bit width {bits} is out of range"):
        BitSettings(w_bits=bits)


def test_bit_settings_specs_and_label() -> None:
    b = BitSettings(w_bits=4, a_bits=8, kv_bits=4, w_granularity="group", group_size=64, a_clip_ratio=0.9)
    assert b.label == "W4A8KV4-g64"
    assert b.weight_spec() == QuantSpec(4, True, "absmax", "group", 64, 1.0)
    assert b.act_spec().bits == 8 and b.act_spec().clip_ratio == 0.9
    assert b.kv_spec().bits == 4 and not b.kv_spec().symmetric
    assert BitSettings().label == "W4A4"


# ---- FlatQuant's clipping pair -----------------------------------------------------------------------------------
def test_clip_pair_range_and_quantizer_hand_values() -> None:
    x = torch.tensor([[-1.0, 0.5, 3.5], [2.0, 4.0, 1.0]])
    lo, hi = clip_pair_range(x, 0.5, 0.25)
    assert torch.equal(lo, torch.tensor([[-0.5], [0.0]])) and torch.equal(hi, torch.tensor([[0.875], [1.0]]))
    w4 = QuantSpec(4)
    row = x[:1]
    big = torch.tensor(50.0)  # sigmoid -> 1: plain absmax grid, s = 3.5 / 7 = 0.5
    assert torch.equal(fake_quant_clip_pair(row, w4, big, big), torch.tensor([[-1.0, 0.5, 3.5]]))
    zero = torch.tensor(0.0)  # sigmoid(0) = 0.5 on both sides: absmax 1.75, s = 0.25; clamp to [-0.5, 1.75]
    assert torch.equal(fake_quant_clip_pair(row, w4, zero, zero, clamp=True), torch.tensor([[-0.5, 0.5, 1.75]]))
    assert torch.equal(clip_pair_clamp(row, zero, zero), torch.tensor([[-0.5, 0.5, 1.75]]))
    # no logits: spec.clip_ratio on both sides; asymmetric 2-bit grid over [-1, 3.5]: s = 1.5, z = 1
    a2 = QuantSpec(2, symmetric=False)
    assert torch.equal(fake_quant_clip_pair(row, a2, None, None), torch.tensor([[-1.5, 0.0, 3.0]]))


def test_weight_clip_pair_per_group_uses_each_channel_logits() -> None:
    """Per-group weights: the (out, 1) clipping logits of a channel apply to each of its groups."""
    w = torch.tensor([[4.0, -2.0, 1.0, 8.0], [1.0, 1.0, -3.0, 0.5]])
    spec = QuantSpec(4, granularity="group", group_size=2)
    lo = hi = torch.tensor([[50.0], [0.0]])  # channel 0 unclipped, channel 1 clipped to half its range
    out = fake_quant_weight_clip_pair(w, spec, lo, hi)
    rows = torch.cat([fake_quant_clip_pair(w[:1].reshape(2, 2), spec, lo[:1], hi[:1], clamp=True).reshape(1, 4),
                      fake_quant_clip_pair(w[1:].reshape(2, 2), spec, lo[1:], hi[1:], clamp=True).reshape(1, 4)])
    assert torch.equal(out, rows)
    assert torch.equal(out[0], fake_quant_weight(w, spec)[0])  # sigmoid(50) = 1: the plain grid
    assert float(out[1].abs().max()) <= 1.5 + 1e-6  # group (-3, 0.5): range clamped to [-1.5, 0.25]
    with pytest.raises(ConfigError, match="group_size"):
        fake_quant_weight_clip_pair(w, QuantSpec(4, granularity="group", group_size=3), lo, hi)
    with pytest.raises(ConfigError, match="per channel or per group"):
        fake_quant_weight_clip_pair(w, QuantSpec(4, granularity="tensor"), lo, hi)



@pytest.mark.parametrize("spec", [W4, QuantSpec(bits=3, symmetric=False)])
def test_quant_dequant_in_place_path_equals_the_straight_through_path_bit_for_bit(spec) -> None:
    """GPTQ's no-gradient quant_dequant gives the values and the signs of zeros of the differentiable one (round_ste
    turns round(-0.3) = -0 into +0), also written into `out`."""
    g = torch.Generator().manual_seed(0)
    edge = torch.tensor([-0.3, -0.0, 0.0, 0.5, -0.5, 1.5, -2.5, 1e-9, -1e-9])
    x = torch.cat([edge, torch.randn(500, generator=g) * 3])
    before = x.clone()
    scale = torch.rand(509, generator=g) + 0.2
    zero = None if spec.symmetric else torch.randint(0, 8, (509,), generator=g).float()
    x_grad = x.clone().requires_grad_(True)
    ste = quant_dequant(x_grad, scale, zero, spec).detach()
    out = torch.empty_like(x)
    with torch.no_grad():
        fast = quant_dequant(x, scale, zero, spec, out=out)
    assert fast.data_ptr() == out.data_ptr()
    assert torch.equal(fast.view(torch.int32), ste.view(torch.int32))  # bit patterns, so -0 != +0
    assert torch.equal(x, before)  # the input is not modified
