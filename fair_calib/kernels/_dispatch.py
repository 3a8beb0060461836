"""Shared plumbing for the Triton kernels: availability checks, dispatch rule and lazy kernel objects.

Dispatch rule (used by every public kernel in this package): run the Triton kernel when
``force_triton=True``, when the environment variable ``TRITON_INTERPRET=1`` is set, or when the input
lives on a CUDA device; otherwise run the pure-PyTorch reference. Triton itself reads
``TRITON_INTERPRET`` only when a function is decorated with ``@triton.jit`` (i.e. at import time), so
the kernels here are kept as plain Python functions and wrapped lazily by :class:`LazyKernel`:
CPU tensors (or an explicit interpreter request) get a ``triton.runtime.interpreter.InterpretedFunction``
and CUDA tensors a compiled ``JITFunction``. This lets tests run the very same kernel source on CPU
under the interpreter without setting the variable before anything imports Triton.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:  # Triton is optional: CPU-only installs fall back to the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

    class _TLStub:
        """Stand-in so that ``tl.constexpr`` annotations still evaluate when Triton is missing."""

        constexpr = object

    tl = _TLStub()  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "LazyKernel",
    "compile_only",
    "interpret_requested",
    "next_power_of_2",
    "triton",
    "tl",
    "use_triton",
]


def interpret_requested() -> bool:
    """True when the user asked for Triton's CPU interpreter through ``TRITON_INTERPRET``."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def use_triton(x: torch.Tensor, force_triton: bool = False) -> bool:
    """Decide whether a kernel call should take the Triton path for input ``x``.

    Raises if ``force_triton`` is requested but Triton is not installed (silently falling back would
    make a test that is meant to exercise the kernel pass vacuously).
    """
    if force_triton:
        if not HAS_TRITON:
            raise RuntimeError("force_triton=True but triton is not installed")
        return True
    if not HAS_TRITON:
        return False
    return interpret_requested() or x.is_cuda


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


class LazyKernel:
    """A Triton kernel source wrapped on first use, as compiled JIT (CUDA) or interpreted (CPU).

    ``kernel[grid](*args, **kwargs)`` launches it; the variant is chosen from the device of the first
    tensor argument and from :func:`interpret_requested`.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self._jit: Any = None
        self._interp: Any = None

    @property
    def jit(self) -> Any:
        """The compiled (``JITFunction``) variant, also usable for ahead-of-time compilation."""
        if self._jit is None:
            from triton.runtime.jit import JITFunction

            self._jit = JITFunction(self.fn)
        return self._jit

    @property
    def interpreted(self) -> Any:
        """The interpreter (``InterpretedFunction``) variant, runs on CPU tensors."""
        if self._interp is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interp = InterpretedFunction(self.fn)
        return self._interp

    def variant_for(self, device: torch.device) -> Any:
        """Pick the interpreted variant for CPU tensors or when requested, else the compiled one."""
        if device.type == "cpu" or interpret_requested():
            return self.interpreted
        return self.jit

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
            if _AOT.targets:
                return _aot_compile(self, args, kwargs)
            kernel = self.variant_for(device)
            if kernel is self._jit:
                return kernel[grid](*args, **kwargs)
            with interpreter_scope():
                return kernel[grid](*args, **kwargs)

        return launch


class _AotState(threading.local):
    def __init__(self) -> None:
        self.targets: list[tuple[Any, list[Any]]] = []


_AOT = _AotState()
_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@contextmanager
def compile_only(arch: int = 80, backend: str = "cuda", warp_size: int = 32) -> Iterator[list[Any]]:
    """Inside this context, kernel launches are compiled ahead of time for a GPU target instead of run.

    Lets a machine without a GPU check that the exact kernel configurations the launchers emit compile
    all the way to a CUDA binary (``arch=80`` is sm_80). Yields the list the compiled kernels are
    appended to; outputs of the wrapped calls are left uninitialised.
    """
    from triton.backends.compiler import GPUTarget

    compiled: list[Any] = []
    _AOT.targets.append((GPUTarget(backend, arch, warp_size), compiled))
    try:
        yield compiled
    finally:
        _AOT.targets.pop()


def _aot_compile(kernel: LazyKernel, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Compile ``kernel`` for the innermost :func:`compile_only` target with a signature taken from the args."""
    target, sink = _AOT.targets[-1]
    jit = kernel.jit
    bound = dict(zip(jit.arg_names, args))
    bound.update(kwargs)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    for p in jit.params:
        val = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = val
        elif isinstance(val, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[val.dtype]
        elif isinstance(val, bool):
            signature[p.name] = "i1"
        elif isinstance(val, int):
            signature[p.name] = "i32" if -(2**31) <= val < 2**31 else "i64"
        elif isinstance(val, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"cannot infer a Triton type for argument {p.name}={val!r}")
    src = triton.compiler.ASTSource(fn=jit, signature=signature, constexprs=constexprs)
    sink.append(triton.compile(src, target=target, options=options or None))


_INTERP_LOCK = threading.RLock()
_INTERP_CACHE: dict[int, Any] = {}


def _language_namespaces() -> list[Any]:
    """Every loaded ``triton.language*`` module plus the classes they define (the interpreter patches both)."""
    spaces: dict[int, Any] = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "triton.language" or name.startswith("triton.language.")):
            continue
        spaces[id(mod)] = mod
        for val in list(vars(mod).values()):
            if isinstance(val, type) and getattr(val, "__module__", "").startswith("triton.language"):
                spaces[id(val)] = val
    return list(spaces.values())


def _preload_lazy_triton_modules() -> None:
    """Import modules Triton loads lazily during a launch; importing them while the standard library is
    swapped for interpreted functions would trip their import-time checks."""
    try:
        import triton.experimental.gluon  # noqa: F401
    except Exception:  # pragma: no cover - optional in some triton builds
        pass


@contextmanager
def interpreter_scope() -> Iterator[None]:
    """Run an interpreted launch with Triton's standard library interpretable, then undo every patch.

    When ``TRITON_INTERPRET`` was not set at import, library helpers such as ``tl.zeros``/``tl.max`` are
    compiled ``JITFunction`` objects that the interpreter refuses to call; they are swapped for
    ``InterpretedFunction`` wrappers for the duration of the launch. The interpreter also monkey-patches
    ``triton.language`` (and, for nested device functions, never restores it), which would break later
    compiled launches or ahead-of-time compilation in the same process; all those attributes are
    snapshotted here and restored afterwards (attributes newly added to modules are kept: they are the
    interpreter's own helper globals). Serialised by a lock (the patches are process-global).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    _preload_lazy_triton_modules()
    with _INTERP_LOCK:
        spaces = _language_namespaces()
        saved = [(ns, dict(vars(ns))) for ns in spaces]
        try:
            for ns, attrs in saved:
                if not isinstance(ns, type(sys)):
                    continue
                for attr, val in attrs.items():
                    if isinstance(val, JITFunction):
                        interp = _INTERP_CACHE.get(id(val))
                        if interp is None:
                            interp = _INTERP_CACHE[id(val)] = (val, InterpretedFunction(val.fn))
                        setattr(ns, attr, interp[1])
            yield
        finally:
            for ns, attrs in saved:
                current = dict(vars(ns))
                for attr, val in attrs.items():
                    if current.get(attr, _MISSING) is not val:
                        try:
                            setattr(ns, attr, val)
                        except (AttributeError, TypeError):  # pragma: no cover - read-only slots
                            pass
                if not isinstance(ns, type):
                    # modules keep additions: the interpreter injects its helper globals into the modules
                    # of the functions it rewrites, once (the rewrite is cached), and they must stay there
                    continue
                for attr in current.keys() - attrs.keys():
                    try:
                        delattr(ns, attr)
                    except (AttributeError, TypeError):  # pragma: no cover
                        pass


_MISSING = object()


def as_clip_tensor(clip: float | torch.Tensor, rows: int, lead_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Normalise a clipping factor to a flat fp32 tensor of 1 (shared) or ``rows`` (per-token) entries."""
    if not isinstance(clip, torch.Tensor):
        return torch.tensor([float(clip)], dtype=torch.float32, device=device)
    c = clip.detach().to(device=device, dtype=torch.float32)
    if c.numel() == 1:
        return c.reshape(1)
    if c.numel() != rows:
        raise ValueError(
            f"clip must be a scalar or have one value per token ({rows} = prod{tuple(lead_shape)}), "
            f"got shape {tuple(clip.shape)}"
        )
    return c.reshape(rows).contiguous()
