"""FlatQuant transform parameterization (DESIGN 4.6).

Notation: activations are row vectors ``x`` (shape ``(..., n)``), a linear layer is ``y = x W^T`` (``W``: out x n).

* A :class:`KroneckerTransform` maps ``x -> x_t = (x * d) (P1 (x) P2)`` with ``P1`` (n1 x n1), ``P2`` (n2 x n2),
  ``n = n1 n2`` from :func:`kronecker_factors`, and ``d`` an optional per-channel scale (the reference's
  ``diag_scale``, SmoothQuant init ``d_j = max|W_j|^(1 - alpha) / max|X_j|^alpha``).
  With ``X`` the row-major reshape of ``x * d`` to ``(n1, n2)``:  ``x (P1 (x) P2) = vec(P1^T X P2)`` -- the n x n
  matrix is never materialized (:func:`kron_apply`, the one copy of this product; ``kernels.kron`` is the fused
  deployment kernel, which multiplies by ``P1^T`` first and so rounds differently).
* The following linear receives ``W' = (W / d) (P1 (x) P2)^{-T}`` so that ``x_t W'^T = x W^T`` exactly
  (``(P1 (x) P2)^{-T} = P1^{-T} (x) P2^{-T}``), merged offline in float64.
* Each factor is ``P = U diag(sigma) V^T`` (:class:`DecomposedFactor`), ``U, V`` orthogonal through PyTorch's
  Cayley parameterisation on the lower triangle (:class:`CayleyOrthogonal`), ``sigma`` trained directly (init 1),
  so ``P^{-1} = V diag(1/sigma) U^T`` analytically. These are the reference's parameters (ruikangliu/FlatQuant
  ``trans_utils.py``), so an Adam step moves them as far as there. Everything starts at the identity;
  FlatQuant's own init draws random orthogonal ``U, V`` (:meth:`CayleyOrthogonal.random_init`).
* :class:`HeadTransform` is the per-head transform for K after RoPE: ``K -> K P``, ``Q -> Q P^{-T}``, so
  ``Q P^{-T} (K P)^T = Q K^T`` (a Kronecker transform with a trivial 1 x 1 left factor).
* :class:`TransformBundle` holds the transforms of one block by name and applies them: online to activations
  (:class:`LiveOp` while training, :class:`FrozenKron` once deployed), merged into weights, inverted; ``P`` and
  ``P^{-T}`` of every factor are computed once per forward pass and shared by all their users.

Training math runs in float32; merges and the deployed matrices are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "kronecker_factors",
    "kron_apply",
    "per_head_apply",
    "CayleyOrthogonal",
    "DecomposedFactor",
    "KroneckerTransform",
    "HeadTransform",
    "LiveOp",
    "FrozenKron",
    "TransformBundle",
]


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


def kron_apply(x: Tensor, left: Tensor | None, right: Tensor | None, n1: int, n2: int) -> Tensor:
    """``x (left (x) right)`` over the last dim as ``vec(left^T X right)``, ``X`` = row-major reshape (n1, n2)
    (``X right`` first); a missing factor is the identity."""
    shape = x.shape
    h = x.reshape(*shape[:-1], n1, n2)
    if right is not None:
        h = torch.matmul(h, right)
    if left is not None:
        h = torch.matmul(left.transpose(0, 1), h)
    return h.reshape(shape)


def per_head_apply(x: Tensor, right: Tensor) -> Tensor:
    """``x_h right`` for every head ``h`` of the last dim (``n_heads * head_dim``, ``right``: head_dim x head_dim)."""
    d = right.shape[0]
    return torch.matmul(x.reshape(*x.shape[:-1], -1, d), right).reshape(x.shape)


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
    def random_init(self, generator: torch.Generator) -> None:
        """FlatQuant's init: ``W`` is a random orthogonal matrix (QR of a Gaussian, sign-fixed), stored whole as in
        the reference (``orthogonal(..., use_trivialization=False)`` keeps the assigned weight as its parameter); only
        its strict lower triangle enters ``Q``."""
        g = torch.randn(self.n, self.n, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        self.weight.copy_(q.to(device=self.weight.device, dtype=self.weight.dtype))

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

    def matrix_and_inverse_transpose(self) -> tuple[Tensor, Tensor]:
        """``(P, P^{-T})`` in float32 with one Cayley solve per orthogonal factor (the per-forward cache)."""
        u, v, sig = self.u.matrix(), self.v.matrix(), self.sigma()
        vt = v.transpose(0, 1)
        return (u * sig) @ vt, (u / sig) @ vt

    def forward(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.matrix(dtype)


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

    def merge_weight(self, weight: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Weight for the transformed input: ``W' = (W / d) (P1 (x) P2)^{-T}``.

        Row by row (``R`` = row of ``W / d`` reshaped to (n1, n2)): ``vec(P1^{-1} R P2^{-T})``.

        For ``y = x W^T`` (``W``: out x n): ``x_t W'^T = x diag(d) P P^{-1} diag(1/d) W^T = x W^T``.
        Computed in ``dtype`` (float64 by default), returned in ``weight.dtype``; never forms the n x n matrix.
        Biases are unchanged.
        """
        if weight.shape[-1] != self.n:
            raise ValueError(f"expected weight with {self.n} input columns, got {tuple(weight.shape)}")
        with torch.no_grad():
            w = weight.detach().to(dtype)
            if self.diag_scale is not None:
                w = w / self.diag_scale.detach().to(dtype)
            merged = kron_apply(w, self.left.inverse_transpose(dtype), self.right.inverse_transpose(dtype),
                                self.n1, self.n2)
        return merged.to(weight.dtype)


class HeadTransform(nn.Module):
    """Per-head transform for K after RoPE (shared by all heads): ``K -> K P``, ``Q -> Q P^{-T}``.

    ``P`` is one :class:`DecomposedFactor` over ``head_dim``; ``(Q P^{-T}) (K P)^T = Q P^{-T} P^T K^T = Q K^T``,
    so attention scores are unchanged while K (the quantized KV-cache entry) is transformed. Identity at init.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = int(head_dim)
        self.factor = DecomposedFactor(self.head_dim)
        self.n, self.n1, self.n2 = self.head_dim, 1, self.head_dim
        self.left: DecomposedFactor | None = None
        self.diag_scale: Tensor | None = None

    @property
    def right(self) -> DecomposedFactor:
        return self.factor


class LiveOp(nn.Module):
    """Training-time online op ``x -> fn(x)`` of a transform held by reference (not registered here: the transform
    is merged and replaced by a :class:`FrozenKron` at the end, and a module registered twice would be saved twice)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], label: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)
        self.label = label

    def extra_repr(self) -> str:
        return self.label

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class FrozenKron(nn.Module):
    """Deployed online transform ``x -> (x * inv_scale) (left (x) right)`` with fixed matrices (buffers), computed
    in fp32 (float64 for float64 input); a missing factor / scale is the identity."""

    def __init__(self, n1: int, n2: int, left: Tensor | None = None, right: Tensor | None = None,
                 inv_scale: Tensor | None = None) -> None:
        super().__init__()
        self.n1, self.n2 = int(n1), int(n2)
        self.register_buffer("left", None if left is None else left.detach().float().contiguous())
        self.register_buffer("right", None if right is None else right.detach().float().contiguous())
        self.register_buffer("inv_scale", None if inv_scale is None else inv_scale.detach().float().contiguous())

    def extra_repr(self) -> str:
        return f"n1={self.n1}, n2={self.n2}, scale={self.inv_scale is not None}"

    def forward(self, x: Tensor) -> Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(dt)
        if self.inv_scale is not None:
            h = h * self.inv_scale.to(dt)
        left = None if self.left is None else self.left.to(dt)
        right = None if self.right is None else self.right.to(dt)
        return kron_apply(h, left, right, self.n1, self.n2).to(x.dtype)


Transform = KroneckerTransform | HeadTransform


class TransformBundle:
    """The transforms of one block by name, applied to activations (live or frozen) and merged into weights.

    While training, :meth:`refresh` (called before every forward pass) computes ``P`` and ``P^{-T}`` of every factor
    once, with autograd; :meth:`activation`, :meth:`weight` and :meth:`per_head` read that cache, so a transform
    shared by a tap and several linears costs one set of Cayley solves per step. ``left`` / ``right`` select the
    factors an op applies (a factor folded elsewhere is left out), ``inverse`` applies ``P^{-T}`` instead of ``P``.
    """

    def __init__(self, transforms: dict[str, Transform]) -> None:
        self.transforms = transforms
        self._mats: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Transform:
        return self.transforms[name]

    def modules(self) -> list[nn.Module]:
        return list(self.transforms.values())

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def to(self, device: torch.device) -> None:
        for m in self.modules():
            m.to(device)

    def random_init(self, generator: torch.Generator) -> None:
        """Every orthogonal factor from :meth:`CayleyOrthogonal.random_init`, in a fixed order (seeded runs repeat)."""
        for m in self.modules():
            for c in m.modules():
                if isinstance(c, CayleyOrthogonal):
                    c.random_init(generator)

    def refresh(self, device_type: str) -> None:
        """``P`` and ``P^{-T}`` of every factor for the coming forward pass, in fp32 even under autocast (small
        matrices; the large products they enter run in the autocast dtype)."""
        mats = {}
        with torch.autocast(device_type, enabled=False):
            for name, t in self.transforms.items():
                for side, f in (("left", t.left), ("right", t.right)):
                    if f is not None:
                        mats[f"{name}.{side}"], mats[f"{name}.{side}_it"] = f.matrix_and_inverse_transpose()
        self._mats = mats

    def clear(self) -> None:
        self._mats = {}

    def _factor(self, name: str, side: str, inverse: bool) -> Tensor | None:
        key = f"{name}.{side}"
        if key not in self._mats:
            return None
        return self._mats[key + "_it" if inverse else key]

    def activation(self, name: str, x: Tensor, left: bool = True, right: bool = True, inverse: bool = False) -> Tensor:
        """``x_t = (x * d) (P1 (x) P2)`` (``P^{-T}`` factors when ``inverse``) from the cache, in fp32, returned in
        ``x.dtype``."""
        t = self.transforms[name]
        h = x.float()
        if t.diag_scale is not None:
            h = h * t.diag_scale.float()
        lhs = self._factor(name, "left", inverse) if left else None
        rhs = self._factor(name, "right", inverse) if right else None
        return kron_apply(h, lhs, rhs, t.n1, t.n2).to(x.dtype)

    def weight(self, name: str, w: Tensor) -> Tensor:
        """Differentiable ``W' = (W / d) (P1 (x) P2)^{-T}`` from the cache, fp32 (the float64 twin for the final merge
        is :meth:`KroneckerTransform.merge_weight`)."""
        t = self.transforms[name]
        h = w.float()
        if t.diag_scale is not None:
            h = h / t.diag_scale.float()
        return kron_apply(h, self._factor(name, "left", True), self._factor(name, "right", True), t.n1, t.n2)

    def per_head(self, name: str, x: Tensor) -> Tensor:
        """``x_h P2`` for every head of the last dim, ``P2`` the right factor of ``name`` from the cache."""
        return per_head_apply(x.float(), self._mats[f"{name}.right"])

    def live_op(self, name: str, left: bool = True, right: bool = True, inverse: bool = False) -> LiveOp:
        def fn(x: Tensor) -> Tensor:
            return self.activation(name, x, left, right, inverse)

        sides = "".join(s for s, on in (("P1", left), ("P2", right)) if on)
        return LiveOp(fn, f"{name} {sides}{'^-T' if inverse else ''}")

    @torch.no_grad()
    def frozen_op(self, name: str, left: bool = True, right: bool = True, inverse: bool = False,
                  inv_scale: Tensor | None = None) -> FrozenKron:
        """The deployed op of :meth:`live_op`: the selected factors computed in float64 and fixed as buffers."""
        t = self.transforms[name]
        f64 = torch.float64

        def mat(f: DecomposedFactor | None, on: bool) -> Tensor | None:
            if f is None or not on:
                return None
            return f.inverse_transpose(f64) if inverse else f.matrix(f64)

        return FrozenKron(t.n1, t.n2, mat(t.left, left), mat(t.right, right), inv_scale)
