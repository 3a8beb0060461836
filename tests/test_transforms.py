"""Tests for fair_calib.quant.transforms (FlatQuant Kronecker / Cayley / SVD-style transforms)."""

from __future__ import annotations

import math

import pytest
import torch

from fair_calib.quant.transforms import (
    CayleyOrthogonal,
    DecomposedFactor,
    HeadTransform,
    KroneckerTransform,
    kronecker_factors,
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


def test_kronecker_identity_at_init() -> None:
    t = KroneckerTransform(192)
    x = torch.randn(3, 192, dtype=torch.float64)
    assert torch.allclose(t.apply_activation(x), x, rtol=0, atol=1e-15)
    w = torch.randn(10, 192, dtype=torch.float64)
    assert torch.allclose(t.merge_weight(w), w, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("n", "use_scale"), [(192, True), (448, True), (384, False), (45, True)])
def test_apply_activation_equals_full_matrix(n: int, use_scale: bool) -> None:
    t = KroneckerTransform(n, use_scale=use_scale)
    _perturb(t, seed=n)
    m = t.full_matrix(torch.float64)
    x = torch.randn(2, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = t.apply_activation(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert (y - x @ m).abs().max().item() < 1e-12
    assert (t(x) - y).abs().max().item() == 0.0
    # not the identity: the transform really mixes channels
    assert (y - x).abs().max().item() > 0.1
    # inverse_apply undoes it
    assert (t.inverse_apply(y) - x).abs().max().item() < 1e-12


@pytest.mark.parametrize("n", [192, 448, 384])
def test_merge_weight_invariance(n: int) -> None:
    t = KroneckerTransform(n)
    _perturb(t, seed=7)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, n, dtype=torch.float64, generator=g)
    w = torch.randn(24, n, dtype=torch.float64, generator=g)
    ref = x @ w.T
    merged = t.merge_weight(w)
    assert merged.dtype == torch.float64 and merged.shape == w.shape
    assert (t.apply_activation(x) @ merged.T - ref).abs().max().item() < 1e-10
    # float32 weights/activations: merge still done in float64, cast back
    x32, w32 = x.float(), w.float()
    merged32 = t.merge_weight(w32)
    assert merged32.dtype == torch.float32
    out32 = t.apply_activation(x32) @ merged32.T
    rel = (out32.double() - ref).abs().max().item() / ref.abs().max().item()
    assert rel < 1e-5
    # merged weight equals the explicit formula W' = (W / d) P^{-T} with M = diag(d) P
    m = t.full_matrix(torch.float64)
    assert (merged - w @ torch.linalg.inv(m).T).abs().max().item() < 1e-9


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
    assert torch.allclose(t.apply_activation(x), x * t.diag_scale.data)
    with pytest.raises(RuntimeError):
        KroneckerTransform(12, use_scale=False).init_scale(act, wgt)


def test_kronecker_preserves_input_dtype() -> None:
    t = KroneckerTransform(64)
    _perturb(t)
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = t.apply_activation(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() @ t.full_matrix(torch.float64)
    assert (y.double() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    with pytest.raises(ValueError):
        t.apply_activation(torch.randn(3, 65))


def test_head_transform_keeps_scores() -> None:
    ht = HeadTransform(16)
    _perturb(ht, seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 7, 16, dtype=torch.float64, generator=g)  # (batch, heads, seq, head_dim)
    k = torch.randn(2, 4, 7, 16, dtype=torch.float64, generator=g)
    qt, kt = ht(q, k)
    assert (kt - k @ ht.factor.matrix(torch.float64)).abs().max().item() < 1e-13
    assert (kt - k).abs().max().item() > 0.1
    scores = q @ k.transpose(-1, -2)
    assert (qt @ kt.transpose(-1, -2) - scores).abs().max().item() < 1e-10
    q32, k32 = ht(q.float(), k.float())
    assert ((q32 @ k32.transpose(-1, -2)).double() - scores).abs().max().item() < 1e-4 * scores.abs().max().item()


def test_gradients_reach_every_parameter() -> None:
    t = KroneckerTransform(48)  # (6, 8)
    ht = HeadTransform(8)
    _perturb(t, seed=11)
    _perturb(ht, seed=12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 48, generator=g)
    target = torch.randn(5, 48, generator=g)
    # a non-rotation-invariant loss (a plain sum of squares has zero gradient w.r.t. the outer orthogonal factors)
    loss = (t(x) * target).sum() + (t(x) ** 3).sum()
    q, k = ht(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g))
    loss = loss + ((q @ k.T) ** 2).sum() + (k * torch.randn(3, 8, generator=g)).sum()
    loss.backward()
    for module in (t, ht):
        for name, p in module.named_parameters():
            assert p.grad is not None, name
            assert bool(torch.isfinite(p.grad).all()), name
            assert p.grad.abs().max().item() > 0, name


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
    _adam_step([t.diag_scale, t.left.singular], lambda: t.apply_activation(x).pow(2).sum(), lr=lr)
    assert torch.allclose((t.diag_scale.detach() - d0).abs(), torch.full((12,), lr), rtol=1e-3)
    assert torch.allclose((t.left.singular.detach() - s0).abs(), torch.full((2,), lr), rtol=1e-3)
