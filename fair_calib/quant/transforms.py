"""FlatQuant transform parameterization (DESIGN 4.6).

Notation: activations are row vectors ``x`` (shape ``(..., n)``), a linear layer is ``y = x W^T`` (``W``: out x n).

* A :class:`KroneckerTransform` maps ``x -> x_t = (x * d) (P1 (x) P2)`` with ``P1`` (n1 x n1), ``P2`` (n2 x n2),
  ``n = n1 n2`` from :func:`kronecker_factors`, and ``d`` an optional per-channel scale (the reference's
  ``diag_scale``, SmoothQuant init ``d_j = max|W_j|^(1 - alpha) / max|X_j|^alpha``).
  With ``X`` the row-major reshape of ``x * d`` to ``(n1, n2)``:  ``x (P1 (x) P2) = vec(P1^T X P2)`` -- the n x n
  matrix is never materialized (except in :meth:`KroneckerTransform.full_matrix`, for tests).
* The following linear receives ``W' = (W / d) (P1 (x) P2)^{-T}`` so that ``x_t W'^T = x W^T`` exactly
  (``(P1 (x) P2)^{-T} = P1^{-T} (x) P2^{-T}``), merged offline in float64.
* Each factor is ``P = U diag(sigma) V^T`` (:class:`DecomposedFactor`), ``U, V`` orthogonal through PyTorch's
  Cayley parameterisation on the lower triangle (:class:`CayleyOrthogonal`), ``sigma`` trained directly (init 1),
  so ``P^{-1} = V diag(1/sigma) U^T`` analytically. These are the reference's parameters (ruikangliu/FlatQuant
  ``trans_utils.py``), so an Adam step moves them as far as there. Everything starts at the identity.
* :class:`HeadTransform` is the per-head transform for K after RoPE: ``K -> K P``, ``Q -> Q P^{-T}``, so
  ``Q P^{-T} (K P)^T = Q K^T``.

Training math runs in float32 (float64 if the input is float64); merges / inverses can be requested in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "kronecker_factors",
    "CayleyOrthogonal",
    "DecomposedFactor",
    "KroneckerTransform",
    "HeadTransform",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16/fp16/fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kronecker_factors(n: int) -> tuple[int, int]:
    """Split ``n = n1 * n2`` with ``n1 <= n2`` both about ``sqrt(n)`` (FlatQuant's rule, DESIGN 4.6).

    Take the smallest ``a >= ceil(sqrt(n))`` such that ``a^2 - n = b^2`` is a perfect square; return
    ``(a - b, a + b)`` (Fermat's method: ``n = a^2 - b^2 = (a - b)(a + b)``). Examples: 4096 -> (64, 64),
    12288 -> (96, 128), 3584 -> (56, 64), 18944 -> (128, 148), 192 -> (12, 16), 384 -> (16, 24), 448 -> (16, 28).

    * odd ``n``: the divisor pair closest to ``sqrt(n)``; a prime ``p`` ends at ``a = (p + 1) / 2`` giving ``(1, p)``
      (a transform with a trivial 1 x 1 left factor).
    * ``n = 0 (mod 4)``: the closest pair of *even* factors (e.g. 12 -> (2, 6), not (3, 4)); ends at ``(2, n / 2)``
      at worst.
    * ``n = 2 (mod 4)`` is never a difference of two squares (the reference loop would not terminate); we return
      the divisor pair closest to ``sqrt(n)`` instead (e.g. 6 -> (2, 3), 2 -> (1, 2)).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"kronecker_factors needs a positive integer, got n={n!r}")
    if n % 4 == 2:
        d = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        return d, n // d
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        b2 = a * a - n
        b = math.isqrt(b2)
        if b * b == b2:
            return a - b, a + b
        a += 1


class CayleyOrthogonal(nn.Module):
    """Orthogonal ``n x n`` matrix, PyTorch's ``orthogonal(..., "cayley", use_trivialization=False)`` (the reference's
    parameterisation): ``A = tril(W, -1) - tril(W, -1)^T``, ``Q = (I - A/2)^{-1} (I + A/2)``.

    Only the strict lower triangle of ``W`` moves ``Q`` (the rest gets zero gradient), so one Adam step changes each
    entry of ``A/2`` by about ``lr / 2``. ``I - A/2`` is always invertible (eigenvalues ``1 - i lambda / 2``),
    ``Q^T Q = I``, ``det Q = +1``; ``W = 0`` gives ``Q = I``.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = int(n)
        self.weight = nn.Parameter(torch.zeros(self.n, self.n))

    def skew(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``A = tril(W, -1) - tril(W, -1)^T`` in ``dtype``."""
        w = torch.tril(self.weight.to(dtype), diagonal=-1)
        return w - w.transpose(0, 1)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Q = (I - A/2)^{-1} (I + A/2)`` computed in ``dtype`` (float32 for training, float64 for merges)."""
        half = 0.5 * self.skew(dtype)
        eye = torch.eye(self.n, dtype=dtype, device=half.device)
        return torch.linalg.solve(eye - half, eye + half)

    def forward(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix(dtype)

    @torch.no_grad()
    def set_orthogonal(self, q: torch.Tensor) -> None:
        """Set ``W`` so that :meth:`matrix` returns ``q`` (an orthogonal matrix without eigenvalue -1):
        ``A/2 = (q + I)^{-1} (q - I)``, ``W = tril(A, -1)``."""
        q = q.to(torch.float64)
        eye = torch.eye(self.n, dtype=torch.float64, device=q.device)
        if q.shape != (self.n, self.n) or (q.T @ q - eye).abs().max().item() > 1e-8:
            raise ValueError(f"expected an orthogonal {self.n} x {self.n} matrix")
        if not bool(torch.linalg.cond(eye + q) < 1e8):  # also catches inf / nan (singular I + q)
            raise ValueError("matrix has an eigenvalue close to -1 and is not reachable by the Cayley transform")
        a = 2.0 * torch.linalg.solve(eye + q, q - eye)
        a = 0.5 * (a - a.transpose(0, 1))  # exact skew part
        self.weight.copy_(torch.tril(a, diagonal=-1).to(self.weight.dtype))


class DecomposedFactor(nn.Module):
    """Invertible ``n x n`` factor ``P = U diag(sigma) V^T`` (``U, V`` :class:`CayleyOrthogonal`, ``sigma`` trained
    directly, init 1, as in the reference). ``P^{-1} = V diag(1/sigma) U^T`` and ``P^{-T} = U diag(1/sigma) V^T`` are
    analytic (no matrix inversion)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = int(n)
        self.u = CayleyOrthogonal(self.n)
        self.v = CayleyOrthogonal(self.n)
        self.singular = nn.Parameter(torch.ones(self.n))

    def sigma(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.singular.to(dtype)

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``P = U diag(sigma) V^T``."""
        return (self.u.matrix(dtype) * self.sigma(dtype)) @ self.v.matrix(dtype).transpose(0, 1)

    def inverse(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``P^{-1} = V diag(1 / sigma) U^T``."""
        return (self.v.matrix(dtype) / self.sigma(dtype)) @ self.u.matrix(dtype).transpose(0, 1)

    def inverse_transpose(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``P^{-T} = U diag(1 / sigma) V^T``."""
        return (self.u.matrix(dtype) / self.sigma(dtype)) @ self.v.matrix(dtype).transpose(0, 1)

    def forward(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix(dtype)


def _kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x (left (x) right)`` over the last dim: ``vec(left^T X right)`` with ``X`` = row-major reshape (n1, n2)."""
    n1, n2 = left.shape[0], right.shape[0]
    shape = x.shape
    xr = x.reshape(*shape[:-1], n1, n2)
    return torch.matmul(left.transpose(0, 1), torch.matmul(xr, right)).reshape(shape)


class KroneckerTransform(nn.Module):
    """FlatQuant affine transform over a width-``n`` activation: ``x_t = (x * d) (P1 (x) P2)``.

    ``P1, P2`` are :class:`DecomposedFactor` of sizes ``(n1, n2) = kronecker_factors(n)`` (or ``factors``), ``d``
    (``diag_scale``, the reference's parameter: it multiplies activations, init ones) is present when ``use_scale``.
    Identity at init.
    """

    def __init__(self, n: int, use_scale: bool = True, factors: tuple[int, int] | None = None) -> None:
        super().__init__()
        n1, n2 = kronecker_factors(n) if factors is None else factors
        if n1 * n2 != n:
            raise ValueError(f"factors {(n1, n2)} do not multiply to n={n}")
        self.n, self.n1, self.n2 = int(n), int(n1), int(n2)
        self.left = DecomposedFactor(self.n1)
        self.right = DecomposedFactor(self.n2)
        self.diag_scale: nn.Parameter | None
        if use_scale:
            self.diag_scale = nn.Parameter(torch.ones(self.n))
        else:
            self.register_parameter("diag_scale", None)

    @property
    def use_scale(self) -> bool:
        return self.diag_scale is not None

    @torch.no_grad()
    def init_scale(self, act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.3) -> None:
        """SmoothQuant init (the reference's ``get_init_scale``): ``d_j = max|W_j|^(1 - alpha) / max|X_j|^alpha``,
        clamped to ``>= 1e-5``.

        ``act_absmax``: per-channel abs-max of the calibration activations (n,); ``weight_absmax``: per input
        channel abs-max over the output rows of every linear fed by this transform (n,). Both are clamped to
        ``>= 1e-5`` first so dead channels give a finite scale.
        """
        if self.diag_scale is None:
            raise RuntimeError("init_scale called on a KroneckerTransform built with use_scale=False")
        act = act_absmax.detach().to(torch.float64).clamp(min=1e-5)
        wgt = weight_absmax.detach().to(torch.float64).clamp(min=1e-5)
        d = (wgt.pow(1.0 - alpha) / act.pow(alpha)).clamp(min=1e-5)
        self.diag_scale.copy_(d.to(device=self.diag_scale.device, dtype=self.diag_scale.dtype))

    def factor_matrices(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P1, P2)`` in ``dtype``."""
        return self.left.matrix(dtype), self.right.matrix(dtype)

    def apply_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``x_t = (x * d) (P1 (x) P2) = vec(P1^T X P2)``, ``X = reshape(x * d, (..., n1, n2))``.

        Computed in float32 (float64 for float64 input) and returned in ``x.dtype``.
        """
        if x.shape[-1] != self.n:
            raise ValueError(f"expected last dim {self.n}, got {tuple(x.shape)}")
        dt = _compute_dtype(x.dtype)
        h = x.to(dt)
        if self.diag_scale is not None:
            h = h * self.diag_scale.to(dt)
        p1, p2 = self.factor_matrices(dt)
        return _kron_apply(h, p1, p2).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_activation(x)

    def inverse_apply(self, x_t: torch.Tensor) -> torch.Tensor:
        """``x = (x_t (P1 (x) P2)^{-1}) / d = vec(P1^{-T} X_t P2^{-1}) / d`` (undo :meth:`apply_activation`)."""
        dt = _compute_dtype(x_t.dtype)
        h = _kron_apply(x_t.to(dt), self.left.inverse(dt), self.right.inverse(dt))
        if self.diag_scale is not None:
            h = h / self.diag_scale.to(dt)
        return h.to(x_t.dtype)

    def merge_weight(self, weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Weight for the transformed input: ``W' = (W / d) (P1 (x) P2)^{-T}``.

        Row by row (``R`` = row of ``W / d`` reshaped to (n1, n2)): ``vec(P1^{-1} R P2^{-T})``.

        For ``y = x W^T`` (``W``: out x n): ``apply_activation(x) W'^T = x diag(d) P P^{-1} diag(1/d) W^T = x W^T``.
        Computed in ``dtype`` (float64 by default), returned in ``weight.dtype``; never forms the n x n matrix.
        Biases are unchanged.
        """
        if weight.shape[-1] != self.n:
            raise ValueError(f"expected weight with {self.n} input columns, got {tuple(weight.shape)}")
        with torch.no_grad():
            w = weight.detach().to(dtype)
            if self.diag_scale is not None:
                w = w / self.diag_scale.detach().to(dtype)
            merged = _kron_apply(w, self.left.inverse_transpose(dtype), self.right.inverse_transpose(dtype))
        return merged.to(weight.dtype)

    def full_matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``M = diag(d) (P1 (x) P2)`` (n x n) so that ``apply_activation(x) = x @ M``. For tests only."""
        m = torch.kron(self.left.matrix(dtype), self.right.matrix(dtype))
        if self.diag_scale is not None:
            m = m * self.diag_scale.to(dtype)[:, None]
        return m


class HeadTransform(nn.Module):
    """Per-head transform for K after RoPE (shared by all heads): ``K -> K P``, ``Q -> Q P^{-T}``.

    ``P`` is one :class:`DecomposedFactor` over ``head_dim``; ``(Q P^{-T}) (K P)^T = Q P^{-T} P^T K^T = Q K^T``,
    so attention scores are unchanged while K (the quantized KV-cache entry) is transformed. Identity at init.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = int(head_dim)
        self.factor = DecomposedFactor(self.head_dim)

    def transform_key(self, k: torch.Tensor) -> torch.Tensor:
        """``K P`` over the last dimension (``head_dim``)."""
        dt = _compute_dtype(k.dtype)
        return torch.matmul(k.to(dt), self.factor.matrix(dt)).to(k.dtype)

    def transform_query(self, q: torch.Tensor) -> torch.Tensor:
        """``Q P^{-T}`` over the last dimension (``head_dim``)."""
        dt = _compute_dtype(q.dtype)
        return torch.matmul(q.to(dt), self.factor.inverse_transpose(dt)).to(q.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q P^{-T}, K P)``."""
        return self.transform_query(q), self.transform_key(k)
