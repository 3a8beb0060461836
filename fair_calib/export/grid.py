"""Integer codes and scales of a fake-quantized weight, recovered from the weight itself.

Every quantizer leaves each block linear with a weight on its grid, ``W_hat = (q - z) * s`` per output channel
or per group of ``group_size`` inputs (GPTQ, AWQ and FlatQuant included: the grid is what they all share). The
export writes ``q``, ``s`` and ``z`` instead of ``W_hat``. Recovery per row ``r`` of the (channel or group) view:

    symmetric:   s = max_j |W_hat_rj| / k   for the first k in (2^(b-1) - 1, 2^(b-1), 2^(b-1) - 2, ..., 1)
    asymmetric:  s = (max_j W_hat_rj - min_j W_hat_rj) / k   for the first k in (2^b - 1, ..., 1)

that reproduces the row: ``q = round(W_hat / s)`` in range and ``|q s - W_hat| <= tol * max_j |W_hat_rj|``, tol a
few units of the weight dtype's precision. ``k`` is the largest code magnitude (range) the row reaches: 7 for
RTN rows, less for some GPTQ rows. Any ``(q, s)`` that passes reproduces ``W_hat`` to its storage precision, so
the dequantized export computes the same linear as the fake-quant model. A row that no ``k`` reproduces is not on
a ``b``-bit grid and fails with the layer's name.

Codes are stored signed as compressed-tensors does: symmetric ``q`` in [-2^(b-1), 2^(b-1) - 1]; asymmetric codes
and zero points shifted by ``-2^(b-1)`` (``(q - z)`` unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ROWS_PER_CHUNK = 16384


class GridError(ValueError):
    """A weight that is not on the grid it claims; the message names the layer."""


@dataclass
class GridWeight:
    """``W = (codes - zero) * scale`` per row group: codes (out, in) int8, scale / zero (out, in // group)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    group_size: int | None  # None = one scale per output channel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_size, dtype)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor | None, group_size: int | None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``(codes - zero) * scale`` in fp32 with one scale per row (channel) or per group of ``group_size`` inputs."""
    out_f, in_f = codes.shape
    g = in_f if group_size is None else group_size
    q = codes.to(torch.float32).reshape(out_f, in_f // g, g)
    if zero is not None:
        q = q - zero.to(torch.float32).reshape(out_f, -1, 1)
    return (q * scale.to(torch.float32).reshape(out_f, -1, 1)).reshape(out_f, in_f).to(dtype)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative reconstruction tolerance: four units of roundoff of the stored weight's dtype (fp32: 4.8e-7)."""
    return 4.0 * torch.finfo(dtype).eps if dtype.is_floating_point else 1e-6


def _candidates(bits: int, symmetric: bool) -> list[int]:
    """Largest code magnitude (symmetric) or code range (asymmetric) to try, the most common first."""
    if symmetric:
        top = 2 ** (bits - 1)
        return [top - 1, top] + list(range(top - 2, 0, -1))
    return list(range(2**bits - 1, 0, -1))


def _recover_rows(rows: Tensor, bits: int, symmetric: bool, tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For float64 rows (R, g): (codes (R, g) float, scale (R,), zero (R,), ok (R,) bool) in unsigned-free form:
    symmetric codes signed, asymmetric codes in [0, 2^b - 1] with zero points in the same range."""
    n_rows = rows.shape[0]
    absmax = rows.abs().amax(dim=1)
    hi, lo = rows.amax(dim=1), rows.amin(dim=1)
    span = absmax if symmetric else hi - lo
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    codes = torch.zeros_like(rows)
    scale = torch.ones(n_rows, dtype=rows.dtype, device=rows.device)
    zero = torch.zeros(n_rows, dtype=rows.dtype, device=rows.device)
    done = span == 0  # all-zero (symmetric) or constant-zero rows: codes 0, scale 1
    if not symmetric:
        const = (span == 0) & (absmax > 0)  # constant non-zero row: one step of size |c|
        done = done & ~const
        if const.any():
            v = torch.sign(rows[const])
            scale[const] = absmax[const]
            zero[const] = (v[:, 0] < 0).to(rows.dtype)
            codes[const] = v + zero[const, None]
            done = done | const
    limit = tol * absmax
    for k in _candidates(bits, symmetric):
        todo = ~done
        if not todo.any():
            break
        s = span[todo] / k
        v = torch.round(rows[todo] / s[:, None])
        fits = ((v * s[:, None] - rows[todo]).abs().amax(dim=1) <= limit[todo])
        if symmetric:
            fits &= (v.amin(dim=1) >= -qmax - 1) & (v.amax(dim=1) <= qmax)
            z = torch.zeros_like(s)
        else:
            z = (-v.amin(dim=1)).clamp(min=0)
            fits &= (v.amax(dim=1) + z <= qmax) & (z <= qmax)
        idx = todo.nonzero().squeeze(1)[fits]
        codes[idx] = v[fits] + z[fits, None]
        scale[idx] = s[fits]
        zero[idx] = z[fits]
        done[idx] = True
    return codes, scale, zero, done


@torch.no_grad()
def recover_grid(weight: Tensor, bits: int, symmetric: bool, group_size: int | None, name: str = "") -> GridWeight:
    """Codes, scales (in the weight's dtype) and zero points of a weight on a ``bits``-bit grid (module docstring)."""
    out_f, in_f = weight.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise GridError(f"layer {name}: group_size {g} does not divide the input size {in_f}")
    rows = weight.detach().reshape(-1, g)
    tol = _tolerance(weight.dtype)
    codes, scales, zeros = [], [], []
    for start in range(0, rows.shape[0], ROWS_PER_CHUNK):
        chunk = rows[start: start + ROWS_PER_CHUNK].to(torch.float64)
        c, s, z, ok = _recover_rows(chunk, bits, symmetric, tol)
        if not ok.all():
            bad = start + int((~ok).nonzero()[0])
            kind = "symmetric" if symmetric else "asymmetric"
            raise GridError(f"layer {name}: the weight is not on a {bits}-bit {kind} grid (output channel "
                            f"{bad // (in_f // g)}); export a model whose quantizer froze its weights (every method "
                            "here does) with the bit settings it was quantized with")
        codes.append(c)
        scales.append(s)
        zeros.append(z)
    shift = 0 if symmetric else 2 ** (bits - 1)  # compressed-tensors stores asymmetric codes signed too
    q = (torch.cat(codes) - shift).to(torch.int8).reshape(out_f, in_f)
    scale = torch.cat(scales).reshape(out_f, in_f // g).to(weight.dtype)
    zero = None if symmetric else (torch.cat(zeros) - shift).to(torch.int8).reshape(out_f, in_f // g)
    return GridWeight(q, scale, zero, bits, group_size)
