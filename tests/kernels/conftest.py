"""Fixtures for the kernel tests: Triton kernels run on CPU through Triton's interpreter.

The kernels are wrapped lazily (see ``fair_calib.kernels._dispatch``), so CPU tensors go through the
interpreter without ``TRITON_INTERPRET`` having to be set before Triton is imported; tests that exercise
the environment-variable path set it per test with ``monkeypatch``, never process-wide (other test
modules call the dispatchers on CPU and must keep getting the fast PyTorch references).
"""

from __future__ import annotations

import pytest
import torch

from fair_calib.kernels import HAS_TRITON


@pytest.fixture(scope="session")
def _interpreter_status() -> str | None:
    """None when Triton's interpreter runs here, else the reason it cannot."""
    if not HAS_TRITON:
        return "triton is not installed"
    try:
        from fair_calib.kernels.quant import quantize_per_token_triton

        out = quantize_per_token_triton(torch.tensor([[1.0, -2.0, 0.5, 3.5]]), 4, real=True)
        if out.q.tolist() != [[2, -4, 1, 7]]:
            return f"interpreter smoke run gave wrong codes {out.q.tolist()}"
    except Exception as exc:  # pragma: no cover - only on machines where the interpreter is broken
        return f"triton interpreter unavailable: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture
def interp(_interpreter_status: str | None) -> None:
    """Skip (with the reason) when the Triton interpreter cannot run on this machine."""
    if _interpreter_status is not None:
        pytest.skip(_interpreter_status)


@pytest.fixture
def gen() -> torch.Generator:
    """Seeded CPU generator for reproducible test tensors."""
    return torch.Generator().manual_seed(1234)
