"""Tests for fair_calib.quant.transforms (FlatQuant Kronecker / Cayley / SVD-style transforms and their bundle)."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib.quant.transforms import (
    CayleyOrthogonal,
    DecomposedFactor,
    HeadTransform,
    KroneckerTransform,
    LiveOp,
    TransformBundle,
    kron_apply,
    kronecker_factors,
    per_head_apply,
)


def _perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Move every parameter away from its identity init (non-trivial transform); scales and sigmas stay positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith(("scale", "singular")):
                p.copy_(torch.exp(noise))
            else:
                p.add_(noise)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (4096, (64, 64)),
        (12288, (96, 128)),
        (3584, (56, 64)),
        (18944, (128, 148)),
        (192, (12, 16)),
        (384, (16, 24)),
        (448, (16, 28)),
        (1, (1, 1)),
        (4, (2, 2)),
        (12, (2, 6)),  # n = 0 mod 4 -> closest *even* pair
        (15, (3, 5)),
        (45, (5, 9)),
        (97, (1, 97)),  # prime
        (6, (2, 3)),  # n = 2 mod 4: closest divisor pair (no difference-of-squares representation)
        (2, (1, 2)),
        (130, (10, 13)),
    ],
)
def test_kronecker_factors(n: int, expected: tuple[int, int]) -> None:
    assert kronecker_factors(n) == expected


def test_kronecker_factors_rule_exhaustive() -> None:
    for n in range(1, 400):
        a_, b_ = kronecker_factors(n)
        assert a_ * b_ == n and a_ <= b_
        if n % 4 != 2:  # the DESIGN 4.6 rule: smallest a >= ceil(sqrt(n)) with a^2 - n a perfect square
            a, b = (a_ + b_) // 2, (b_ - a_) // 2
            assert a * a - n == b * b
            for smaller in range(math.isqrt(n - 1) + 1, a):  # ceil(sqrt(n)) .. a - 1
                r = smaller * smaller - n
                assert r < 0 or math.isqrt(r) ** 2 != r
    with pytest.raises(ValueError):
        kronecker_factors(0)


def test_cayley_identity_init_and_orthogonal() -> None:
    c = CayleyOrthogonal(12)
    assert torch.equal(c.matrix(torch.float64), torch.eye(12, dtype=torch.float64))
    _perturb(c, std=1.0)
    q = c.matrix(torch.float64)
    eye = torch.eye(12, dtype=torch.float64)
    assert (q.T @ q - eye).abs().max().item() < 1e-12
    assert (q - eye).abs().max().item() > 0.1
    assert abs(torch.linalg.det(q).item() - 1.0) < 1e-10
    q32 = c.matrix()
    assert q32.dtype == torch.float32
    assert (q32.T @ q32 - torch.eye(12)).abs().max().item() < 1e-5


def test_cayley_set_orthogonal_roundtrip() -> None:
    src = CayleyOrthogonal(8)
    _perturb(src, seed=5, std=0.5)
    target = src.matrix(torch.float64)
    dst = CayleyOrthogonal(8)
    dst.weight.data = dst.weight.data.double()
    dst.set_orthogonal(target)
    assert (dst.matrix(torch.float64) - target).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="-1"):
        dst.set_orthogonal(-torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="orthogonal"):
        dst.set_orthogonal(2 * torch.eye(8, dtype=torch.float64))


def test_decomposed_factor_identity_and_inverse() -> None:
    f = DecomposedFactor(16)
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(f.matrix(torch.float64), eye, rtol=0, atol=0)
    _perturb(f, seed=1)
    p = f.matrix(torch.float64)
    assert (p - eye).abs().max().item() > 0.1
    assert (f.inverse(torch.float64) @ p - eye).abs().max().item() < 1e-12
    assert (p @ f.inverse(torch.float64) - eye).abs().max().item() < 1e-12
    assert (f.inverse_transpose(torch.float64) - f.inverse(torch.float64).T).abs().max().item() < 1e-15
    # singular values of P are exactly sigma
    sv = torch.linalg.svdvals(p)
    assert torch.allclose(sv.sort().values, f.sigma(torch.float64).sort().values, rtol=1e-12, atol=0)
    assert (f.inverse() @ f.matrix() - torch.eye(16)).abs().max().item() < 1e-5


def _full(t: KroneckerTransform) -> torch.Tensor:
    """``M = diag(d) (P1 (x) P2)`` (n x n, float64), the matrix the Kronecker product never materializes."""
    m = torch.kron(t.left.matrix(torch.float64), t.right.matrix(torch.float64))
    return m if t.diag_scale is None else m * t.diag_scale.detach().double()[:, None]


def _bundle(**transforms: KroneckerTransform | HeadTransform) -> TransformBundle:
    b = TransformBundle(dict(transforms))
    b.refresh("cpu")
    return b


def test_kron_apply_hand_values_and_missing_factors() -> None:
    """x (L (x) R) = vec(L^T X R) with X the row-major (n1, n2) reshape; a missing factor is the identity."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])  # X = [[1, 2, 3], [4, 5, 6]]
    left = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # swaps the two rows of X
    right = torch.diag(torch.tensor([1.0, 10.0, 100.0]))  # scales the columns of X
    assert torch.equal(kron_apply(x, left, None, 2, 3), torch.tensor([[4.0, 5.0, 6.0, 1.0, 2.0, 3.0]]))
    assert torch.equal(kron_apply(x, None, right, 2, 3), torch.tensor([[1.0, 20.0, 300.0, 4.0, 50.0, 600.0]]))
    assert torch.equal(kron_apply(x, left, right, 2, 3), x @ torch.kron(left, right))
    assert torch.equal(kron_apply(x, None, None, 2, 3), x)
    v = torch.arange(8.0).reshape(1, 8)  # two heads of 4: each head times the same 4 x 4 matrix
    p = torch.diag(torch.tensor([1.0, -1.0, 2.0, 0.0]))
    assert torch.equal(per_head_apply(v, p), torch.tensor([[0.0, -1.0, 4.0, 0.0, 4.0, -5.0, 12.0, 0.0]]))


def test_kronecker_identity_at_init() -> None:
    t = KroneckerTransform(192)
    x = torch.randn(3, 192)
    assert torch.equal(_bundle(t=t).activation("t", x), x)
    w = torch.randn(10, 192, dtype=torch.float64)
    assert torch.allclose(t.merge_weight(w), w, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("n", "use_scale"), [(192, True), (448, True), (384, False), (45, True)])
def test_activation_live_and_frozen_equal_full_matrix(n: int, use_scale: bool) -> None:
    t = KroneckerTransform(n, use_scale=use_scale)
    _perturb(t, seed=n)
    m = _full(t)
    x = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ m
    b = _bundle(t=t)
    y = b.activation("t", x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y.double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert (y - x).abs().max().item() > 0.1  # not the identity: the transform really mixes channels
    scale = None if t.diag_scale is None else t.diag_scale.detach()
    frozen = b.frozen_op("t", inv_scale=scale)  # the deployed op: factors fixed in float64, stored fp32
    assert (frozen(x).double() - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert isinstance(b.live_op("t"), LiveOp) and torch.equal(b.live_op("t")(x), y)
    # the inverse-transpose factors: x (P1^{-T} (x) P2^{-T}) (the scale d still multiplies first)
    inv = b.activation("t", x, inverse=True)
    p_it = torch.linalg.inv(torch.kron(t.left.matrix(torch.float64), t.right.matrix(torch.float64))).T
    d = torch.ones(n, dtype=torch.float64) if t.diag_scale is None else t.diag_scale.detach().double()
    assert (inv.double() - (x.double() * d) @ p_it).abs().max().item() < 1e-4


@pytest.mark.parametrize("n", [192, 448, 384])
def test_merge_weight_invariance(n: int) -> None:
    t = KroneckerTransform(n)
    _perturb(t, seed=7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, n, dtype=torch.float64, generator=g)
    w = torch.randn(24, n, dtype=torch.float64, generator=g)
    ref = x @ w.T
    m = _full(t)
    merged = t.merge_weight(w)
    assert merged.dtype == torch.float64 and merged.shape == w.shape
    assert ((x @ m) @ merged.T - ref).abs().max().item() < 1e-10
    # merged weight equals the explicit formula W' = (W / d) P^{-T} with M = diag(d) P
    assert (merged - w @ torch.linalg.inv(m).T).abs().max().item() < 1e-9
    # float32 weights: merge still done in float64, cast back
    merged32 = t.merge_weight(w.float())
    assert merged32.dtype == torch.float32 and (merged32.double() - merged).abs().max().item() < 1e-5
    # the live (differentiable, fp32, cached) weight is the same W' and keeps the function with the live activation
    b = _bundle(t=t)
    live = b.weight("t", w.float())
    assert (live.double() - merged).abs().max().item() < 1e-4 * merged.abs().max().item()
    out32 = b.activation("t", x.float()) @ live.T
    assert (out32.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_init_scale_smoothquant() -> None:
    """The reference's get_init_scale: diag_scale = max|W|^(1-alpha) / max|X|^alpha, multiplying x."""
    t = KroneckerTransform(12)
    act = torch.tensor([4.0, 1.0, 0.0, 9.0] * 3)
    wgt = torch.tensor([2.0, 0.5, 1.0, 0.0] * 3)
    t.init_scale(act, wgt, alpha=0.3)
    a = act.double().clamp(min=1e-5)
    w = wgt.double().clamp(min=1e-5)
    expected = (w**0.7 / a**0.3).clamp(min=1e-5).float()
    assert torch.allclose(t.diag_scale.data, expected)
    assert bool(torch.isfinite(t.diag_scale).all()) and bool((t.diag_scale >= 1e-5).all())
    # with scale only (identity factors): x_t = x * d and W' = W / d
    x = torch.randn(2, 12)
    b = _bundle(t=t)
    assert torch.allclose(b.activation("t", x), x * t.diag_scale.data)
    assert torch.allclose(b.weight("t", x), x / t.diag_scale.data)
    with pytest.raises(RuntimeError):
        KroneckerTransform(12, use_scale=False).init_scale(act, wgt)


def test_kronecker_preserves_input_dtype() -> None:
    t = KroneckerTransform(64)
    _perturb(t)
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = _bundle(t=t).activation("t", x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ _full(t)
    assert (y.double() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def test_head_transform_keeps_scores() -> None:
    """K -> K P and Q -> Q P^{-T} (the q_rope / k_rope ops of the bundle): attention scores unchanged."""
    ht = HeadTransform(16)
    _perturb(ht, seed=3)
    assert (ht.n1, ht.n2, ht.left, ht.right) == (1, 16, None, ht.factor)  # a Kronecker transform with a 1 x 1 left
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 7, 16, generator=g)  # (batch, heads, seq, head_dim)
    k = torch.randn(2, 4, 7, 16, generator=g)
    b = _bundle(head=ht)
    qt, kt = b.activation("head", q, left=False, inverse=True), b.activation("head", k, left=False)
    p = ht.factor.matrix(torch.float64)
    assert (kt.double() - k.double() @ p).abs().max().item() < 1e-5
    assert (kt - k).abs().max().item() > 0.1
    scores = q.double() @ k.double().transpose(-1, -2)
    tol = 1e-4 * scores.abs().max().item()
    assert ((qt @ kt.transpose(-1, -2)).double() - scores).abs().max().item() < tol
    qf, kf = b.frozen_op("head", left=False, inverse=True), b.frozen_op("head", left=False)
    assert ((qf(q) @ kf(k).transpose(-1, -2)).double() - scores).abs().max().item() < tol


def test_gradients_reach_every_parameter() -> None:
    t = KroneckerTransform(48)  # (6, 8)
    ht = HeadTransform(8)
    _perturb(t, seed=11)
    _perturb(ht, seed=12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=g)
    target = torch.randn(5, 48, generator=g)
    b = _bundle(t=t, head=ht)  # the cache is built with autograd: gradients flow through it
    xt = b.activation("t", x)
    # a non-rotation-invariant loss (a plain sum of squares has zero gradient w.r.t. the outer orthogonal factors)
    loss = (xt * target).sum() + (xt ** 3).sum() + b.weight("t", target).sum()
    q = b.activation("head", torch.randn(3, 8, generator=g), left=False, inverse=True)
    k = b.activation("head", torch.randn(3, 8, generator=g), left=False)
    loss = loss + ((q @ k.T) ** 2).sum() + (k * torch.randn(3, 8, generator=g)).sum()
    loss.backward()
    for module in (t, ht):
        for name, p in module.named_parameters():
            assert p.grad is not None, name
            assert bool(torch.isfinite(p.grad).all()), name
            assert p.grad.abs().max().item() > 0, name


def test_random_init_is_orthogonal_seeded_and_ordered() -> None:
    """FlatQuant's random orthogonal init: every Cayley weight a QR-orthogonal matrix, the same seed the same bits."""
    runs = []
    for _ in range(2):
        b = TransformBundle({"a": KroneckerTransform(12), "b": KroneckerTransform(6)})
        b.random_init(torch.Generator().manual_seed(5))
        runs.append([p.detach().clone() for p in b.parameters()])
        u, v = b["a"].left.u.weight.detach().double(), b["a"].left.v.weight.detach().double()
        assert (u.T @ u - torch.eye(u.shape[0], dtype=torch.float64)).abs().max().item() < 1e-6
        assert (u - v).abs().max().item() > 0.1  # every factor draws its own matrix
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))


# ---- the reference's parameterisation (ruikangliu/FlatQuant trans_utils.py) --------------------------------------
def _adam_step(params: list[torch.nn.Parameter], loss_fn, lr: float = 5e-3) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    opt.zero_grad()
    loss_fn().backward()
    opt.step()


def test_cayley_equals_torch_orthogonal_cayley_and_its_adam_step() -> None:
    """Same parameter, same Q, same Q after one Adam step as torch's orthogonal(..., "cayley") on the lower
    triangle (use_trivialization=False), the reference's rotation; the old A = W - W^T moved 4x as far."""
    n = 6
    g = torch.Generator().manual_seed(3)
    x0, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    target = torch.randn(n, n, generator=g, dtype=torch.float64)
    ref = torch.nn.Linear(n, n, bias=False, dtype=torch.float64)
    ref.weight.data = x0.clone()
    ref = torch.nn.utils.parametrizations.orthogonal(ref, orthogonal_map="cayley", use_trivialization=False)
    ours = CayleyOrthogonal(n)
    ours.weight.data = x0.clone()
    assert torch.allclose(ours.matrix(torch.float64), ref.weight, atol=1e-12)
    q0 = ref.weight.detach().clone()
    _adam_step([ref.parametrizations.weight.original], lambda: (ref.weight * target).sum())
    _adam_step([ours.weight], lambda: (ours.matrix(torch.float64) * target).sum())
    step_ref = (ref.weight.detach() - q0).norm().item()
    assert step_ref > 1e-4
    assert torch.allclose(ours.matrix(torch.float64), ref.weight.detach(), atol=1e-12)
    # only the strict lower triangle carries gradient
    assert float(ours.weight.grad.triu().abs().max()) == 0.0


def test_singular_values_and_diag_scale_step_like_the_reference() -> None:
    """sigma and diag_scale are the reference's raw parameters: one Adam step moves each by lr (sign of its gradient),
    at any value (the old exp / reciprocal parameters moved by a value-dependent amount)."""
    t = KroneckerTransform(12)
    with torch.no_grad():
        t.diag_scale.copy_(torch.linspace(0.1, 10.0, 12))
        t.left.singular.copy_(torch.tensor([0.5, 4.0]))
    d0, s0 = t.diag_scale.detach().clone(), t.left.singular.detach().clone()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    lr = 1e-2
    b = TransformBundle({"t": t})

    def loss() -> torch.Tensor:
        b.refresh("cpu")
        return b.activation("t", x).pow(2).sum()

    _adam_step([t.diag_scale, t.left.singular], loss, lr=lr)
    assert torch.allclose((t.diag_scale.detach() - d0).abs(), torch.full((12,), lr), rtol=1e-3)
    assert torch.allclose((t.left.singular.detach() - s0).abs(), torch.full((2,), lr), rtol=1e-3)
