"""Dispatch rule, interpreter isolation, and ahead-of-time compilation of every kernel for sm_80 (no GPU)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

import fair_calib.kernels as K
from fair_calib.kernels import _dispatch


def test_use_triton_rule(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _dispatch.use_triton(x) is False
    if K.HAS_TRITON:
        assert _dispatch.use_triton(x, force_triton=True) is True
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _dispatch.use_triton(x) is True
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert _dispatch.use_triton(x) is False
    else:  # pragma: no cover
        with pytest.raises(RuntimeError):
            _dispatch.use_triton(x, force_triton=True)


def test_next_power_of_2():
    assert [_dispatch.next_power_of_2(n) for n in (0, 1, 2, 3, 16, 17, 100)] == [1, 1, 2, 4, 16, 32, 128]


def test_interpreted_launch_leaves_triton_language_untouched(interp):
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    before_lang = dict(vars(tl))
    before_core = dict(vars(tl.core))
    before_tensor = dict(vars(tl.core.tensor))
    K.quantize_per_token_triton(torch.randn(2, 8), 4)
    K.kron_quantize_triton(torch.randn(2, 256), torch.eye(16), torch.eye(16))
    # every pre-existing attribute is back (the interpreter may add its own helper globals to modules)
    for space, before in ((tl, before_lang), (tl.core, before_core)):
        now = vars(space)
        assert all(now.get(k) is v for k, v in before.items())
    assert dict(vars(tl.core.tensor)) == before_tensor
    assert isinstance(tl.zeros, JITFunction) or os.environ.get("TRITON_INTERPRET") == "1"


def _ptxas_available() -> bool:
    if not K.HAS_TRITON or importlib.util.find_spec("triton.backends.nvidia") is None:
        return False
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if not isinstance(tl.zeros, JITFunction):  # TRITON_INTERPRET=1 at import: the library is interpreted-only
        return False
    import triton.backends.nvidia as nv

    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")) or bool(shutil.which("ptxas"))


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.skipif(
    not _ptxas_available(),
    reason="needs triton's NVIDIA backend (ptxas) and a compiled (not interpret-only) triton.language",
)
def test_every_kernel_compiles_for_sm80(interp):
    """The exact configurations the launchers emit compile to a CUDA binary, without needing a GPU."""
    x = torch.randn(4, 192, dtype=torch.float16)
    w = torch.randint(-8, 8, (48, 192), dtype=torch.int8)
    a = torch.randint(-8, 8, (4, 192), dtype=torch.int8)
    with K.compile_only(arch=80) as compiled:
        K.quantize_per_token_triton(x, 4, real=True)
        K.kron_quantize_triton(x, torch.eye(12), torch.eye(16), smooth=torch.ones(192), sym=False)
        K.fast_hadamard_transform_triton(x, torch.eye(12))
        K.pack_int32_triton(w)
        K.unpack_int4_triton(K.pack_int4_ref(w), 192)
        K.w4a4_gemm_triton(a, torch.rand(4), K.pack_int32_ref(w), torch.rand(48), out_dtype=torch.float16)
    names = [c.name for c in compiled]
    assert names == [
        "_rowquant_kernel",
        "_rowquant_kernel",
        "_hadamard_kernel",
        "_pack_kernel",
        "_unpack_kernel",
        "_w4a4_gemm_kernel",
    ]
    assert all(len(c.asm["cubin"]) > 0 for c in compiled)
