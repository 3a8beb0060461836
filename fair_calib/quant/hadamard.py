"""Hadamard matrices and the fast Walsh-Hadamard transform (QuaRot, DESIGN 4.5).

Conventions
-----------
* ``hadamard_matrix(n)`` is an *unnormalized* ``+-1`` matrix with ``H H^T = n I``.
* For ``n = K * 2^m`` (``(K, 2^m) = hadamard_factor(n)``) the matrix is the Kronecker product

      H_n = H_K (x) H_{2^m},        H_n[a * 2^m + b, c * 2^m + d] = H_K[a, c] * H_{2^m}[b, d]

  i.e. the ``K`` part acts on the slow (leading) index and the Sylvester part on the fast index.
  ``H_{2^m}`` is Sylvester's matrix ``H_{2^m}[b, d] = (-1)^popcount(b & d)`` (symmetric).
* ``apply_hadamard(x)`` computes ``x @ H_n / sqrt(n)`` over the last dimension with the *same* ``H_n``:
  reshape ``x`` to ``X`` of shape ``(..., K, 2^m)``, run O(n log n) butterflies over the ``2^m`` axis
  (``X H_{2^m}``) and one explicit matmul over the ``K`` axis (``H_K^T X``).

Constructions for ``H_K`` (tried in this order, the first that applies is used):

* Sylvester: ``K`` a power of two.
* Paley I: ``K = q + 1`` with ``q`` a prime power, ``q = 3 (mod 4)``:  ``H = I + [[0, 1^T], [-1, Q]]``,
  ``Q[i, j] = chi(x_j - x_i)`` the Jacobsthal matrix of GF(q) (``chi`` = quadratic character).
* Paley II: ``K = 2 (q + 1)`` with ``q`` a prime power, ``q = 1 (mod 4)``:
  ``H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]`` with ``C = [[0, 1^T], [1, Q]]``.
* Williamson: ``K = 4 t`` for ``t`` in ``_WILLIAMSON`` (39, 43, i.e. orders 156 and 172) from four
  symmetric circulant ``+-1`` matrices with ``A^2 + B^2 + C^2 + D^2 = 4 t I`` placed in the Williamson array.
* Kronecker: ``K = K1 * K2`` with both factors constructible.

Prime-power fields GF(p^k), k > 1, are built in code (polynomials modulo an irreducible polynomial found by
search), so e.g. 28 = 27 + 1 (Paley I over GF(27)) and 52 = 2 (25 + 1) (Paley II over GF(25)) are covered.
Everything is built exactly in float64 (small integers), then cast.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["hadamard_matrix", "hadamard_factor", "random_hadamard", "apply_hadamard"]

# First rows of symmetric circulant Williamson quadruples (A, B, C, D), '+' = +1, '-' = -1, satisfying
# A^2 + B^2 + C^2 + D^2 = 4 t I. Published combinatorial data (orders 39 and 43 as tabulated in SageMath's
# ``williamson_type_quadruples_smallcases``, which credits Hall 1983 and Long 2013); the tests check H H^T = n I.
_WILLIAMSON: dict[int, tuple[str, str, str, str]] = {
    39: (
        "+++--+-+-----+--++----++--+-----+-+--++",
        "+++--++-+---+-+--+----+--+-+---+-++--++",
        "++++---+--++----+-+--+-+----++--+---+++",
        "+---++-+-+-----+++-++-+++-----+-+-++---",
    ),
    43: (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# small number theory / finite fields
# ----------------------------------------------------------------------------------------------------------------
def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return ``(p, k)`` with ``q = p^k`` (p prime, k >= 1), or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of ``a`` modulo the monic polynomial ``f`` over GF(p); coefficient lists, lowest degree first."""
    a = a[:]
    deg_f = len(f) - 1
    for i in range(len(a) - 1, deg_f - 1, -1):
        c = a[i] % p
        if c:
            for j in range(deg_f + 1):
                a[i - deg_f + j] = (a[i - deg_f + j] - c * f[j]) % p
    return [c % p for c in a[:deg_f]] + [0] * max(0, deg_f - len(a))


def _is_irreducible(f: list[int], p: int) -> bool:
    """Trial division of the monic ``f`` (degree k) by every monic polynomial of degree 1..k//2."""
    k = len(f) - 1
    for d in range(1, k // 2 + 1):
        for idx in range(p**d):
            g = [(idx // p**i) % p for i in range(d)] + [1]
            if not any(_poly_mod(f, g, p)):
                return False
    return True


def _irreducible_poly(p: int, k: int) -> list[int]:
    """First monic irreducible polynomial of degree k over GF(p) (lexicographic in the coefficients)."""
    for idx in range(p**k):
        f = [(idx // p**i) % p for i in range(k)] + [1]
        if _is_irreducible(f, p):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


@functools.cache
def _quadratic_character(p: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For GF(p^k) with elements encoded as integers ``sum_i c_i p^i`` (c_i = coefficient of x^i):
    returns ``(digits, chi)``: digits (q, k) int64 and chi (q,) int64 with chi(0)=0, chi(square)=1, else -1."""
    q = p**k
    digits = torch.tensor([[(v // p**i) % p for i in range(k)] for v in range(q)], dtype=torch.int64)
    if k == 1:
        squares = {(v * v) % p for v in range(1, p)}
    else:
        f = _irreducible_poly(p, k)
        squares = set()
        for v in range(1, q):
            c = digits[v].tolist()
            prod = [0] * (2 * k - 1)
            for i in range(k):
                for j in range(k):
                    prod[i + j] += c[i] * c[j]
            r = _poly_mod(prod, f, p)
            squares.add(sum(r[i] * p**i for i in range(k)))
    chi = torch.tensor([0] + [1 if v in squares else -1 for v in range(1, q)], dtype=torch.int64)
    return digits, chi


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix ``Q[i, j] = chi(x_j - x_i)`` of GF(q) (float64). ``Q Q^T = q I - J``, ``Q 1 = 0``;
    ``Q^T = chi(-1) Q`` with chi(-1) = +1 iff q = 1 (mod 4)."""
    pk = _prime_power(q)
    assert pk is not None
    p, k = pk
    digits, chi = _quadratic_character(p, k)
    weights = p ** torch.arange(k, dtype=torch.int64)
    diff = ((digits[None, :, :] - digits[:, None, :]) % p) @ weights  # diff[i, j] = x_j - x_i
    return chi[diff].to(torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# constructions
# ----------------------------------------------------------------------------------------------------------------
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _paley1(q: int) -> torch.Tensor:
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(n, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


def _circulant(row: str) -> torch.Tensor:
    r = torch.tensor([1.0 if ch == "+" else -1.0 for ch in row], dtype=torch.float64)
    t = r.numel()
    idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t  # C[i, j] = r[j - i]
    return r[idx]


def _williamson(t: int) -> torch.Tensor:
    a, b, c, d = (_circulant(r) for r in _WILLIAMSON[t])
    return torch.cat(
        [
            torch.cat([a, b, c, d], dim=1),
            torch.cat([-b, a, -d, c], dim=1),
            torch.cat([-c, d, a, -b], dim=1),
            torch.cat([-d, -c, b, a], dim=1),
        ],
        dim=0,
    )


@functools.cache
def _recipe(k: int) -> tuple | None:
    """How to build H_k (see module docstring for the order), or None if no construction here applies."""
    if _is_pow2(k):
        return ("sylvester", k)
    if k % 4 != 0:  # a Hadamard matrix of order k > 2 needs 4 | k
        return None
    q = k - 1
    if q % 4 == 3 and _prime_power(q) is not None:
        return ("paley1", q)
    q = k // 2 - 1
    if q % 4 == 1 and _prime_power(q) is not None:
        return ("paley2", q)
    if k // 4 in _WILLIAMSON:
        return ("williamson", k // 4)
    for d in range(2, math.isqrt(k) + 1):
        if k % d == 0 and _recipe(d) is not None and _recipe(k // d) is not None:
            return ("kron", d, k // d)
    return None


@functools.lru_cache(maxsize=64)
def _build(k: int) -> torch.Tensor:
    recipe = _recipe(k)
    if recipe is None:
        raise ValueError(f"no Hadamard construction for order {k}")
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(k)
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    if kind == "williamson":
        return _williamson(recipe[1])
    return torch.kron(_build(recipe[1]), _build(recipe[2]))


def _k_matrix(k: int) -> torch.Tensor:
    """Cached unnormalized H_K (float64); callers must not modify it in place."""
    return _build(k)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------
def hadamard_factor(n: int) -> tuple[int, int]:
    """Split ``n = K * 2^m`` with the largest power of two ``2^m`` such that ``H_K`` can be constructed.

    Returns ``(K, 2^m)``; ``K = 1`` for powers of two. Examples: 192 -> (12, 16), 448 -> (28, 16),
    40 -> (20, 2), 3584 -> (28, 128), 18944 -> (148, 128).
    Raises ValueError naming ``n`` and the factorizations tried when no construction applies.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got n={n!r}")
    v = (n & -n).bit_length() - 1  # 2-adic valuation
    tried = []
    for m in range(v, -1, -1):
        k = n >> m
        if _recipe(k) is not None:
            return k, 1 << m
        tried.append((k, 1 << m))
    hint = " (no Hadamard matrix of this order exists: n > 2 must be a multiple of 4)" if n > 2 and n % 4 else ""
    raise ValueError(
        f"no Hadamard matrix construction for n={n}{hint}: tried n = K * 2^m for (K, 2^m) in {tried}; "
        "K must be a power of two (Sylvester), q+1 with q = 3 mod 4 a prime power (Paley I), "
        "2(q+1) with q = 1 mod 4 a prime power (Paley II), "
        f"4t with t in {sorted(_WILLIAMSON)} (Williamson), or a Kronecker product of these"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalized ``+-1`` Hadamard matrix of order ``n``: ``H H^T = n I``.

    ``H_n = H_K (x) H_{2^m}`` with ``(K, 2^m) = hadamard_factor(n)`` (K part on the slow index, Sylvester part
    on the fast index), the same matrix that :func:`apply_hadamard` multiplies by. Built exactly in float64.
    Note: materializes n x n (n = 18944 is ~2.9 GB in float64); use :func:`apply_hadamard` for large n.
    """
    k, p = hadamard_factor(n)
    h = torch.kron(_k_matrix(k), _sylvester(p)) if k > 1 else _sylvester(p)
    return h.to(dtype=dtype, copy=True)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal random Hadamard matrix ``Q = diag(d) H_n / sqrt(n)``, ``d_i`` iid uniform in {-1, +1}.

    As QuaRot's residual-stream rotation: applied to row vectors, ``x Q = ((x * d) H_n) / sqrt(n)`` (random sign
    flips, then the Hadamard mixing). ``Q Q^T = I``. Deterministic for a given seed (own torch.Generator, the
    global RNG is untouched). Built in float64, then cast to ``dtype``.
    """
    h = hadamard_matrix(n)
    g = torch.Generator().manual_seed(int(seed))
    d = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2.0 - 1.0
    return (d[:, None] * h / math.sqrt(n)).to(dtype)


def apply_hadamard(x: torch.Tensor, k_matrix: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """Fast Walsh-Hadamard transform over the last dimension: ``y = x @ H_n / sqrt(n)``.

    ``H_n = H_K (x) H_{2^m}`` exactly as returned by :func:`hadamard_matrix` (``k_matrix=None``), or with the given
    unnormalized ``K x K`` matrix ``k_matrix`` (``n / K`` must be a power of two). With ``X = x.reshape(..., K, 2^m)``:
    ``y = H_K^T (X H_{2^m})``: m butterfly stages ``(a, b) -> (a + b, a - b)`` (O(n log n)) over the fast axis and one
    ``K x K`` matmul over the slow axis. ``normalize=False`` skips the ``1/sqrt(n)`` (then exact for integer inputs
    in float64). Computed in ``x.dtype``; returns a new tensor of the same shape and dtype.
    """
    n = x.shape[-1]
    if k_matrix is None:
        k, p = hadamard_factor(n)
        hk = _k_matrix(k) if k > 1 else None
    else:
        if k_matrix.ndim != 2 or k_matrix.shape[0] != k_matrix.shape[1]:
            raise ValueError(f"k_matrix must be square, got shape {tuple(k_matrix.shape)}")
        k = k_matrix.shape[0]
        if n % k != 0 or not _is_pow2(n // k):
            raise ValueError(f"k_matrix of order {k} does not fit n={n}: n / K must be a power of two")
        p = n // k
        hk = k_matrix if k > 1 else None
    lead = x.shape[:-1]
    y = x.reshape(*lead, k, p)
    h = 1
    while h < p:
        pairs = y.reshape(*lead, k, p // (2 * h), 2, h)
        a, b = pairs.unbind(dim=-2)
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, k, p)
        h *= 2
    if hk is not None:
        y = torch.matmul(hk.to(device=x.device, dtype=x.dtype).transpose(0, 1), y)
    y = y.reshape(*lead, n)
    if normalize:
        return y / math.sqrt(n)
    return y.clone() if hk is None and p == 1 else y  # n == 1: never hand back a view of x
