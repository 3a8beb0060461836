"""Sub-byte integer packing, Triton kernels + PyTorch references.

Two layouts:

* **uint8 nibbles** (:func:`pack_int4` / :func:`unpack_int4`): two 4-bit values per byte along the last
  dim, element 2i in the low nibble and element 2i+1 in the high nibble. Signed values are stored as
  4-bit **two's complement** (``v & 0xF``: -8 -> 0x8, -1 -> 0xF); unsigned codes 0..15 are stored as is
  and unpacked with ``signed=False``. An odd last dim is padded with a zero nibble.
* **int32, compressed-tensors ``pack-quantized``** (:func:`pack_int32` / :func:`unpack_int32`, same
  argument order as ``compressed_tensors...pack_to_int32`` / ``unpack_from_int32``): ``32 // num_bits``
  values per int32 word along ``packed_dim`` (1 = columns, the weight layout; 0 = rows, used for zero
  points), value i of a word in bits ``[num_bits*i, num_bits*(i+1))``, stored offset-binary (signed value
  + 2^(num_bits-1)). The packed dim is zero-padded (in the unsigned domain) to a multiple of the pack
  factor; unpacking takes the original shape to drop the padding. For 4 bits: 8 values per word, +8.

All functions accept integer tensors (int8 usually) holding in-range values; results are int8 codes,
uint8 bytes or int32 words. The Triton and reference paths are bit-identical.
"""

from __future__ import annotations

import torch

from ._dispatch import LazyKernel, next_power_of_2, tl, use_triton

__all__ = [
    "pack_int4",
    "pack_int4_ref",
    "pack_int4_triton",
    "pack_int32",
    "pack_int32_ref",
    "pack_int32_triton",
    "unpack_int4",
    "unpack_int4_ref",
    "unpack_int4_triton",
    "unpack_int32",
    "unpack_int32_ref",
    "unpack_int32_triton",
]


def _pack_factor(num_bits: int) -> int:
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in [1, 8], got {num_bits}")
    return 32 // num_bits


def _check_int(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got {t.dtype}")


# --------------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------------


def _pack_last_ref(values: torch.Tensor, bits: int, per_word: int, offset: int) -> torch.Tensor:
    """Pack along the last dim into int64 words (unsigned value < 2^(bits*per_word))."""
    n = values.shape[-1]
    nw = -(-n // per_word)
    u = (values.to(torch.int64) + offset) & ((1 << bits) - 1)
    pad = nw * per_word - n
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=0)
    u = u.reshape(*values.shape[:-1], nw, per_word)
    shifts = torch.arange(per_word, device=values.device, dtype=torch.int64) * bits
    return (u << shifts).sum(dim=-1)  # bit fields are disjoint: sum == bitwise or


def _unpack_last_ref(words: torch.Tensor, n: int, bits: int, per_word: int, offset: int, twos: bool) -> torch.Tensor:
    """Inverse of :func:`_pack_last_ref` from (..., nw) words; returns int8 (..., n)."""
    w = words.to(torch.int64)
    if words.dtype == torch.int32:
        w = w & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    u = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    v = u - ((u >> (bits - 1)) << bits) if twos else u - offset
    v = v.reshape(*words.shape[:-1], words.shape[-1] * per_word)[..., :n]
    return v.to(torch.int8)


def pack_int4_ref(values: torch.Tensor) -> torch.Tensor:
    """Two int4 per uint8 (low nibble = even index, two's complement) along the last dim."""
    _check_int(values, "values")
    return _pack_last_ref(values, 4, 2, 0).to(torch.uint8)


def unpack_int4_ref(packed: torch.Tensor, n: int, *, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4_ref`: (..., ceil(n/2)) uint8 -> (..., n) int8."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    return _unpack_last_ref(packed, n, 4, 2, 0, twos=signed)


def _to_int32_words(w64: torch.Tensor) -> torch.Tensor:
    return torch.where(w64 >= 2**31, w64 - 2**32, w64).to(torch.int32)


def pack_int32_ref(values: torch.Tensor, num_bits: int = 4, packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors ``pack_to_int32`` layout for a 2-D tensor of signed codes (see module docstring)."""
    _check_int(values, "values")
    per_word = _pack_factor(num_bits)
    if values.dim() != 2 or packed_dim not in (0, 1):
        raise ValueError("pack_int32 expects a 2-D tensor and packed_dim in {0, 1}")
    v = values if packed_dim == 1 else values.t()
    words = _to_int32_words(_pack_last_ref(v, num_bits, per_word, 1 << (num_bits - 1)))
    return words if packed_dim == 1 else words.t().contiguous()


def _unpack_int32_args(
    packed: torch.Tensor, num_bits: int, shape: torch.Size | tuple[int, int], packed_dim: int
) -> tuple[int, tuple[int, ...], torch.Tensor]:
    """Checks shared by the unpack reference and kernel: (values per word, shape, words with packing on dim 1)."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    per_word = _pack_factor(num_bits)
    if packed.dim() != 2 or packed_dim not in (0, 1):
        raise ValueError("unpack_int32 expects a 2-D tensor and packed_dim in {0, 1}")
    return per_word, tuple(int(s) for s in shape), packed if packed_dim == 1 else packed.t()


def unpack_int32_ref(
    packed: torch.Tensor, num_bits: int, shape: torch.Size | tuple[int, int], packed_dim: int = 1
) -> torch.Tensor:
    """compressed-tensors ``unpack_from_int32``: int32 words -> int8 codes of the original ``shape``."""
    per_word, shape, p = _unpack_int32_args(packed, num_bits, shape, packed_dim)
    n = shape[packed_dim]
    out = _unpack_last_ref(p, n, num_bits, per_word, 1 << (num_bits - 1), twos=False)
    return out if packed_dim == 1 else out.t().contiguous()


# --------------------------------------------------------------------------------------------------
# Triton kernels (pack / unpack along the last dim of a contiguous (rows, n) view)
# --------------------------------------------------------------------------------------------------


def _pack_kernel(
    v_ptr,
    w_ptr,
    rows,
    n,
    nw,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Each program packs a (BLOCK_R, BLOCK_W) tile of words; value i of a word goes to bits [BITS*i, ...)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rr64 = rr.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    for i in tl.static_range(PER_WORD):
        col = rw * PER_WORD + i
        m = (rr[:, None] < rows) & (col[None, :] < n)
        v = tl.load(v_ptr + rr64[:, None] * n + col[None, :], mask=m, other=0).to(tl.int32)
        u = tl.where(m, (v + OFFSET) & ((1 << BITS) - 1), 0)  # padding is 0 in the stored (unsigned) domain
        acc = acc | (u << (BITS * i))
    wm = (rr[:, None] < rows) & (rw[None, :] < nw)
    tl.store(w_ptr + rr64[:, None] * nw + rw[None, :], acc.to(w_ptr.dtype.element_ty), mask=wm)


def _unpack_kernel(
    w_ptr,
    v_ptr,
    rows,
    n,
    nw,
    BITS: tl.constexpr,
    PER_WORD: tl.constexpr,
    OFFSET: tl.constexpr,
    TWOS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Each program unpacks a (BLOCK_R, BLOCK_W) tile of words into int8 codes (padding dropped by mask)."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rw = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rr64 = rr.to(tl.int64)
    wm = (rr[:, None] < rows) & (rw[None, :] < nw)
    word = tl.load(w_ptr + rr64[:, None] * nw + rw[None, :], mask=wm, other=0).to(tl.int32)
    for i in tl.static_range(PER_WORD):
        col = rw * PER_WORD + i
        u = (word >> (BITS * i)) & ((1 << BITS) - 1)
        if TWOS:
            v = u - ((u >> (BITS - 1)) << BITS)
        else:
            v = u - OFFSET
        m = (rr[:, None] < rows) & (col[None, :] < n)
        tl.store(v_ptr + rr64[:, None] * n + col[None, :], v.to(tl.int8), mask=m)


pack_kernel = LazyKernel(_pack_kernel)
unpack_kernel = LazyKernel(_unpack_kernel)


def _blocks(rows: int, nw: int) -> tuple[int, int]:
    bw = min(128, max(16, next_power_of_2(nw)))
    br = min(8, max(1, next_power_of_2(rows)))
    return br, bw


def _pack_last_triton(values: torch.Tensor, bits: int, per_word: int, offset: int, word_dtype: torch.dtype):
    n = values.shape[-1]
    nw = -(-n // per_word)
    v2 = values.reshape(-1, n).contiguous()
    rows = v2.shape[0]
    out = torch.empty((rows, nw), device=values.device, dtype=word_dtype)
    if rows and nw:
        br, bw = _blocks(rows, nw)
        grid = (-(-rows // br), -(-nw // bw))
        pack_kernel[grid](v2, out, rows, n, nw, BITS=bits, PER_WORD=per_word, OFFSET=offset, BLOCK_R=br, BLOCK_W=bw)
    return out.reshape(*values.shape[:-1], nw)


def _unpack_last_triton(words: torch.Tensor, n: int, bits: int, per_word: int, offset: int, twos: bool):
    nw = words.shape[-1]
    if nw * per_word < n:
        raise ValueError(f"{nw} words cannot hold {n} values")
    w2 = words.reshape(-1, nw).contiguous()
    rows = w2.shape[0]
    out = torch.empty((rows, n), device=words.device, dtype=torch.int8)
    if rows and nw:
        br, bw = _blocks(rows, nw)
        grid = (-(-rows // br), -(-nw // bw))
        unpack_kernel[grid](
            w2, out, rows, n, nw, BITS=bits, PER_WORD=per_word, OFFSET=offset, TWOS=twos, BLOCK_R=br, BLOCK_W=bw
        )
    return out.reshape(*words.shape[:-1], n)


def pack_int4_triton(values: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`pack_int4_ref`."""
    _check_int(values, "values")
    return _pack_last_triton(values, 4, 2, 0, torch.uint8)


def unpack_int4_triton(packed: torch.Tensor, n: int, *, signed: bool = True) -> torch.Tensor:
    """Triton version of :func:`unpack_int4_ref`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    return _unpack_last_triton(packed, n, 4, 2, 0, twos=signed)


def pack_int32_triton(values: torch.Tensor, num_bits: int = 4, packed_dim: int = 1) -> torch.Tensor:
    """Triton version of :func:`pack_int32_ref`."""
    _check_int(values, "values")
    per_word = _pack_factor(num_bits)
    if values.dim() != 2 or packed_dim not in (0, 1):
        raise ValueError("pack_int32 expects a 2-D tensor and packed_dim in {0, 1}")
    v = values if packed_dim == 1 else values.t()
    words = _pack_last_triton(v, num_bits, per_word, 1 << (num_bits - 1), torch.int32)
    return words if packed_dim == 1 else words.t().contiguous()


def unpack_int32_triton(
    packed: torch.Tensor, num_bits: int, shape: torch.Size | tuple[int, int], packed_dim: int = 1
) -> torch.Tensor:
    """Triton version of :func:`unpack_int32_ref`."""
    per_word, shape, p = _unpack_int32_args(packed, num_bits, shape, packed_dim)
    out = _unpack_last_triton(p, shape[packed_dim], num_bits, per_word, 1 << (num_bits - 1), twos=False)
    return out if packed_dim == 1 else out.t().contiguous()


# --------------------------------------------------------------------------------------------------
# Dispatchers
# --------------------------------------------------------------------------------------------------


def pack_int4(values: torch.Tensor, *, force_triton: bool = False) -> torch.Tensor:
    """Pack int4 codes (..., n) into uint8 (..., ceil(n/2)): low nibble = even index, two's complement."""
    if use_triton(values, force_triton):
        return pack_int4_triton(values)
    return pack_int4_ref(values)


def unpack_int4(packed: torch.Tensor, n: int, *, signed: bool = True, force_triton: bool = False) -> torch.Tensor:
    """Unpack uint8 nibbles (..., ceil(n/2)) into int8 codes (..., n); ``signed=False`` for codes 0..15."""
    if use_triton(packed, force_triton):
        return unpack_int4_triton(packed, n, signed=signed)
    return unpack_int4_ref(packed, n, signed=signed)


def pack_int32(
    values: torch.Tensor, num_bits: int = 4, packed_dim: int = 1, *, force_triton: bool = False
) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` packing of signed codes into int32 words (module docstring)."""
    if use_triton(values, force_triton):
        return pack_int32_triton(values, num_bits, packed_dim)
    return pack_int32_ref(values, num_bits, packed_dim)


def unpack_int32(
    packed: torch.Tensor,
    num_bits: int,
    shape: torch.Size | tuple[int, int],
    packed_dim: int = 1,
    *,
    force_triton: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`pack_int32` (compressed-tensors ``unpack_from_int32``), int8 codes of ``shape``."""
    if use_triton(packed, force_triton):
        return unpack_int32_triton(packed, num_bits, shape, packed_dim)
    return unpack_int32_ref(packed, num_bits, shape, packed_dim)
