"""Triton kernels with pure-PyTorch references for W4A4 inference of (diffusion) LLMs.

Every kernel ``f`` comes as ``f_ref`` (PyTorch, the specification), ``f_triton`` (the Triton kernel, same
arguments plus optional tile sizes) and ``f`` (dispatcher with an extra ``force_triton`` flag): the
Triton path runs for CUDA inputs, when ``TRITON_INTERPRET=1`` is set or when ``force_triton=True``
(CPU inputs then go through Triton's interpreter); otherwise the reference runs.

Modules: :mod:`.quant` (per-token activation quantization), :mod:`.kron` (FlatQuant online Kronecker
transform fused with quantization), :mod:`.hadamard` (online fast Walsh-Hadamard transform),
:mod:`.pack` (int4 packing, incl. the compressed-tensors ``pack-quantized`` int32 layout),
:mod:`.gemm` (W4A4 integer GEMM with per-token x per-channel scales).
"""

from ._dispatch import HAS_TRITON, compile_only, interpret_requested, use_triton
from .gemm import w4a4_gemm, w4a4_gemm_ref, w4a4_gemm_triton, w4a4_linear
from .hadamard import fast_hadamard_transform, fast_hadamard_transform_ref, fast_hadamard_transform_triton
from .kron import kron_factors, kron_quantize, kron_quantize_ref, kron_quantize_triton, kron_transform
from .pack import (
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
from .quant import (
    QuantizedActivation,
    qrange,
    quantize_per_token,
    quantize_per_token_ref,
    quantize_per_token_triton,
)

__all__ = [
    "HAS_TRITON",
    "QuantizedActivation",
    "compile_only",
    "fast_hadamard_transform",
    "fast_hadamard_transform_ref",
    "fast_hadamard_transform_triton",
    "interpret_requested",
    "kron_factors",
    "kron_quantize",
    "kron_quantize_ref",
    "kron_quantize_triton",
    "kron_transform",
    "pack_int4",
    "pack_int4_ref",
    "pack_int4_triton",
    "pack_int32",
    "pack_int32_ref",
    "pack_int32_triton",
    "qrange",
    "quantize_per_token",
    "quantize_per_token_ref",
    "quantize_per_token_triton",
    "unpack_int4",
    "unpack_int4_ref",
    "unpack_int4_triton",
    "unpack_int32",
    "unpack_int32_ref",
    "unpack_int32_triton",
    "use_triton",
    "w4a4_gemm",
    "w4a4_gemm_ref",
    "w4a4_gemm_triton",
    "w4a4_linear",
]
