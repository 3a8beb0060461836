"""INT4 packing: hand-computed layouts, compressed-tensors pack-quantized compatibility, round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_test_utils import needs_cuda

from fair_calib.kernels import (
    pack_int4,
    pack_int4_ref,
    pack_int4_triton,
    pack_int32,
    pack_int32_ref,
    pack_int32_triton,
    unpack_int4,
    unpack_int4_ref,
    unpack_int4_triton,
    unpack_int32,
    unpack_int32_ref,
    unpack_int32_triton,
)


def _layout_pack_to_int32(value: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The pack-quantized layout restated literally (columns): +2^(b-1), zero-pad to a multiple of
    32 // b, then word |= value[:, i::pack_factor] << (b * i) in uint32, viewed as int32."""
    v = (value.to(torch.int32) + (1 << (num_bits - 1))).numpy().astype(np.uint32)
    pf = 32 // num_bits
    packed_size = -(-v.shape[1] // pf)
    v = np.pad(v, [(0, 0), (0, packed_size * pf - v.shape[1])], constant_values=0)
    packed = np.zeros((v.shape[0], packed_size), dtype=np.uint32)
    for i in range(pf):
        packed |= v[:, i::pf] << np.uint32(num_bits * i)
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32))


def test_int32_hand_example():
    v = torch.tensor([[1, 2, -8, 7, 0, 0, 0, 0, 3]], dtype=torch.int8)
    # +8 -> [9, 10, 0, 15, 8, 8, 8, 8 | 11, pad 0 ...]: 0x8888F0A9 and 0x0000000B
    expected = torch.tensor([[0x8888F0A9 - 2**32, 11]], dtype=torch.int32)
    assert torch.equal(pack_int32_ref(v), expected)
    assert torch.equal(unpack_int32_ref(expected, 4, v.shape), v)


@pytest.mark.parametrize("num_bits", [4, 2, 3, 8])
def test_int32_matches_pack_quantized_layout(num_bits, gen):
    lo = -(1 << (num_bits - 1))
    v = torch.randint(lo, -lo, (7, 99), generator=gen, dtype=torch.int8)
    packed = pack_int32_ref(v, num_bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, -(-99 // (32 // num_bits)))
    assert torch.equal(packed, _layout_pack_to_int32(v, num_bits))
    assert torch.equal(unpack_int32_ref(packed, num_bits, v.shape), v)


def test_int32_packed_dim0_ref(gen):
    v = torch.randint(-8, 8, (21, 5), generator=gen, dtype=torch.int8)
    packed = pack_int32_ref(v, 4, packed_dim=0)
    assert packed.shape == (3, 5)
    assert torch.equal(packed, _layout_pack_to_int32(v.t().contiguous(), 4).t())
    assert torch.equal(unpack_int32_ref(packed, 4, v.shape, packed_dim=0), v)


def test_int4_nibble_hand_example():
    v = torch.tensor([1, -1, -8, 7, 3], dtype=torch.int8)
    packed = pack_int4_ref(v)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0xF1, 0x78, 0x03]  # low nibble = even index, two's complement, zero pad
    assert torch.equal(unpack_int4_ref(packed, 5), v)
    u = torch.tensor([[0, 15, 9]], dtype=torch.uint8)
    assert pack_int4_ref(u).tolist() == [[0xF0, 0x09]]
    assert unpack_int4_ref(pack_int4_ref(u), 3, signed=False).tolist() == [[0, 15, 9]]


@pytest.mark.parametrize("num_bits,packed_dim", [(4, 1), (4, 0), (3, 1), (8, 0)])
def test_int32_triton_matches_reference(num_bits, packed_dim, interp, gen):
    lo = -(1 << (num_bits - 1))
    v = torch.randint(lo, -lo, (37, 99), generator=gen, dtype=torch.int8)
    a = pack_int32_ref(v, num_bits, packed_dim)
    b = pack_int32_triton(v, num_bits, packed_dim)
    assert torch.equal(a, b)
    assert torch.equal(unpack_int32_triton(b, num_bits, v.shape, packed_dim), v)


def test_int4_triton_matches_reference(interp, gen):
    v = torch.randint(-8, 8, (3, 5, 37), generator=gen, dtype=torch.int8)
    a, b = pack_int4_ref(v), pack_int4_triton(v)
    assert b.shape == (3, 5, 19) and torch.equal(a, b)
    assert torch.equal(unpack_int4_triton(b, 37), v)
    u = torch.randint(0, 16, (6, 10), generator=gen, dtype=torch.int8)
    assert torch.equal(pack_int4_triton(u), pack_int4_ref(u))
    assert torch.equal(unpack_int4_triton(pack_int4_ref(u), 10, signed=False), u)


def test_dispatchers_and_errors(interp, gen):
    v = torch.randint(-8, 8, (4, 16), generator=gen, dtype=torch.int8)
    assert torch.equal(pack_int32(v), pack_int32(v, force_triton=True))
    assert torch.equal(unpack_int32(pack_int32(v), 4, v.shape, force_triton=True), v)
    assert torch.equal(unpack_int4(pack_int4(v, force_triton=True), 16), v)
    with pytest.raises(TypeError):
        pack_int32_ref(v.float())
    with pytest.raises(TypeError):
        unpack_int32_ref(pack_int4_ref(v), 4, v.shape)
    with pytest.raises(ValueError):
        pack_int32_ref(v, 9)
    with pytest.raises(ValueError):
        pack_int32_ref(v[None], 4)


@needs_cuda
def test_cuda_round_trip():
    v = torch.randint(-8, 8, (4096, 4096), device="cuda", dtype=torch.int8)
    p = pack_int32(v)
    assert torch.equal(p.cpu(), pack_int32_ref(v.cpu()))
    assert torch.equal(unpack_int32(p, 4, v.shape), v)
    assert torch.equal(unpack_int4(pack_int4(v), 4096), v)
