"""GPTQ: weighted Hessian, the solve against hand-worked cases and RTN, damping / fallback, the quantizer end to end."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fair_calib.data.calibration import tinyreason_calibration
from fair_calib.errors import NonFiniteWeightError
from fair_calib.quant.gptq import GPTQ, REFERENCES, HessianAccumulator, gptq_quantize, gptq_solve, hessian_strip
from fair_calib.quant.grids import QuantSpec, fake_quant_weight
from fair_calib.quant.qlinear import qlinears
from fair_calib.quant.quarot import QuaRot
from fair_calib.registry import ConfigError, build

W4 = QuantSpec(bits=4)


def test_weighted_hessian_by_hand():
    """H = (2 / n) sum_i w_i x_i x_i^T: x1 = (1, 2) w 1, x2 = (3, 0) w 3 -> S = [[28, 2], [2, 4]], n = 4."""
    acc = HessianAccumulator(2)
    acc.add(torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]), torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(acc.hessian(), torch.tensor([[14.0, 1.0], [1.0, 2.0]]))
    assert acc.n == 4.0


def test_zero_weight_token_has_no_influence_on_the_hessian():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    w = torch.rand(2, 5) + 0.5
    x_bad, w_bad = x.clone(), w.clone()
    x_bad[1, 2] = 1e6  # an outlier token ...
    w_bad[1, 2] = 0.0  # ... with weight 0
    with_token, without = HessianAccumulator(6), HessianAccumulator(6)
    with_token.add(x_bad, w_bad)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 2] = False
    without.add(x[keep], w[keep])
    assert torch.equal(with_token.hessian(), without.hessian())
    # weight 2 on a token = that token twice
    twice, doubled = HessianAccumulator(6), HessianAccumulator(6)
    twice.add(torch.cat([x[0], x[0, :1]]))
    wd = torch.ones(5)
    wd[0] = 2.0
    doubled.add(x[0], wd)
    torch.testing.assert_close(twice.hessian(), doubled.hessian())


@pytest.mark.parametrize("spec", [
    QuantSpec(bits=4), QuantSpec(bits=4, scale_convention="halfstep"), QuantSpec(bits=3, symmetric=False),
    QuantSpec(bits=4, granularity="group", group_size=8), QuantSpec(bits=4, granularity="tensor"),
])
def test_identity_hessian_equals_rtn(spec):
    torch.manual_seed(1)
    W = torch.randn(12, 32)
    Q, _ = gptq_solve(W, torch.eye(32), spec, blocksize=16)
    torch.testing.assert_close(Q, fake_quant_weight(W, spec), rtol=0, atol=1e-6)
    if spec.granularity == "group":  # static groups come from the original columns, whatever the order
        Q, _ = gptq_solve(W, torch.eye(32) * torch.linspace(1, 2, 32), spec, act_order=True, static_groups=True)
        torch.testing.assert_close(Q, fake_quant_weight(W, spec), rtol=0, atol=1e-6)


def test_two_by_two_case_worked_by_hand():
    """Row (0.46, 0.70), scale 0.7 / 7 = 0.1, H = [[4, 1.9], [1.9, 1]] (no damping).

    q1 = 0.5, e1 = -0.04; the optimal update of w2 given q1 is w2 + e1 * H12 / H22 = 0.70 - 0.076 = 0.624,
    which rounds to 0.6 (RTN keeps 0.7). Row (0.70, -0.12) has e1 = 0, so it is plain RTN: (0.7, -0.1).
    """
    W = torch.tensor([[0.46, 0.70], [0.70, -0.12]])
    H = torch.tensor([[4.0, 1.9], [1.9, 1.0]])
    Q, _ = gptq_solve(W, H, W4, percdamp=0.0)
    torch.testing.assert_close(Q, torch.tensor([[0.5, 0.6], [0.7, -0.1]]))
    rtn = fake_quant_weight(W, W4)
    torch.testing.assert_close(rtn, torch.tensor([[0.5, 0.7], [0.7, -0.1]]))
    # objective (w - q) H (w - q)^T of row 1: GPTQ 0.0064 - 0.0152 + 0.01 = 0.0012, RTN 0.0064
    e_gptq, e_rtn = W[0] - Q[0], W[0] - rtn[0]
    assert float(e_gptq @ H @ e_gptq) == pytest.approx(0.0012, abs=1e-6)
    assert float(e_rtn @ H @ e_rtn) == pytest.approx(0.0064, abs=1e-6)


def _correlated(n_tokens=512, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, 6, generator=g)
    mix = torch.randn(6, dim, generator=g)
    return z @ mix + 0.05 * torch.randn(n_tokens, dim, generator=g)


@pytest.mark.parametrize("act_order, spec", [(False, W4), (True, W4),
                                              (True, QuantSpec(bits=4, granularity="group", group_size=8))])
def test_gptq_beats_rtn_on_correlated_inputs_weighted(act_order, spec):
    x = _correlated()
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(3)) * 2
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator(32)
    acc.add(x, w)
    Q, info = gptq_quantize(W, acc.hessian(), spec, act_order=act_order, static_groups=act_order)
    assert not info["fallback"] and torch.isfinite(Q).all()

    def err(Wq):  # sum_i w_i ||x_i (W - Wq)^T||^2 / sum_i w_i
        return float(((x @ (W - Wq).T).pow(2).sum(-1) * w).sum() / w.sum())

    assert err(Q) < 0.5 * err(fake_quant_weight(W, spec))


def test_act_order_and_groups_stay_on_the_grid():
    x = _correlated()
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    acc = HessianAccumulator(32)
    acc.add(x)
    spec = QuantSpec(bits=4, granularity="group", group_size=8)
    for static in (False, True):
        Q, _ = gptq_solve(W, acc.hessian(), spec, blocksize=8, act_order=True, static_groups=static)
        assert torch.isfinite(Q).all()
        if static:  # each original group is on the grid of its scale absmax(W_group) / 7
            scale = W.reshape(8, 4, 8).abs().amax(-1, keepdim=True) / 7
            codes = Q.reshape(8, 4, 8) / scale
            torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
            assert codes.abs().max() <= 8
        else:  # groups = consecutive columns in act order, each on a grid s * {-8..7}: max |q| = k s, k <= 8
            perm = torch.argsort(torch.diag(acc.hessian()), descending=True)
            for g in Q[:, perm].reshape(32, 8):
                on_grid = [torch.allclose(g / (g.abs().max() / k), (g / (g.abs().max() / k)).round(), atol=1e-4)
                           for k in range(1, 9)]
                assert any(on_grid)
            assert not torch.allclose(Q, fake_quant_weight(W, spec))


def test_dead_columns_are_zero():
    W = torch.randn(4, 6)
    H = torch.eye(6) * 2
    H[2, 2] = 0.0
    Q, _ = gptq_solve(W, H, W4)
    assert torch.equal(Q[:, 2], torch.zeros(4))


def test_rank_deficient_hessian_is_damped_until_it_factors():
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    H = torch.ones(4, 4)  # rank 1: Cholesky without damping fails at the second pivot
    Q, info = gptq_quantize(W, H, W4, percdamp=0.0)
    assert info["retries"] >= 1 and info["percdamp"] > 0 and not info["fallback"]
    assert torch.isfinite(Q).all()
    x = torch.randn(3, 8)  # fewer tokens than columns: the reference damping alone suffices
    acc = HessianAccumulator(8)
    acc.add(x)
    Q, info = gptq_quantize(torch.randn(5, 8), acc.hessian(), W4)
    assert info["retries"] == 0 and torch.isfinite(Q).all()


def test_indefinite_or_nan_hessian_falls_back_to_rtn(caplog):
    W = torch.randn(4, 4)
    for H in (-torch.eye(4), torch.full((4, 4), float("nan"))):
        with caplog.at_level(logging.WARNING, logger="fair_calib.quant.gptq"):
            Q, info = gptq_quantize(W, H, W4, max_damp_retries=2, name="blocks.0.q")
        assert info["fallback"] and torch.equal(Q, fake_quant_weight(W, W4))
        assert "blocks.0.q" in caplog.text


def _logit_err(model, ref, calib):
    with torch.no_grad():
        out = model(calib.input_ids)
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def test_gptq_quantizer_end_to_end(tiny_llada, char_tokenizer):
    calib = tinyreason_calibration(char_tokenizer, n_samples=6, tasks=["addition", "compare"])
    ref = tiny_llada(calib.input_ids).detach()
    orig = {n: p.detach().clone() for n, p in tiny_llada.named_parameters()}
    a, b, r = copy.deepcopy(tiny_llada), copy.deepcopy(tiny_llada), copy.deepcopy(tiny_llada)
    rep = build("quantizer", {"name": "gptq", "a_bits": 16, "progress": False}).quantize(a, calib)
    GPTQ(a_bits=16, progress=False).quantize(b, calib)
    build("quantizer", {"name": "rtn", "a_bits": 16}).quantize(r, calib)
    assert rep["propagate"] == "weights" and len(rep["blocks"]) == 2
    assert rep["blocks"][0]["fallbacks"] == 0 and set(rep["blocks"][0]["layers"]) == {"q", "k", "v", "o", "gate",
                                                                                      "up", "down"}
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n  # same data and settings -> bit-identical weights
    for q in qlinears(a):
        assert q.weight_frozen
        # weight-only default grid (llm-compressor's): per channel 2 absmax / 15, from the FP weights
        scale = orig[_orig_name(q.name)].abs().amax(1, keepdim=True) * 2 / 15
        codes = q.weight / scale
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    assert _logit_err(a, ref, calib) < _logit_err(r, ref, calib)


def _orig_name(qname: str) -> str:
    idx, role = qname.split(".")[1:]
    path = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out", "gate": "ff_proj", "up": "up_proj",
            "down": "ff_out"}[role]
    return f"model.transformer.blocks.{idx}.{path}.weight"


def test_gptq_options_run_on_dream(tiny_dream, char_tokenizer):
    calib = tinyreason_calibration(char_tokenizer, n_samples=4, tasks=["addition"])
    seq = copy.deepcopy(tiny_dream)
    GPTQ(w_granularity="group", group_size=16, act_order=True, true_sequential=True, progress=False).quantize(seq,
                                                                                                          calib)
    flat = copy.deepcopy(tiny_dream)
    GPTQ(w_granularity="group", group_size=16, act_order=True, true_sequential=False, propagate="quantized",
         progress=False).quantize(flat, calib)
    assert all(torch.isfinite(p).all() for p in seq.parameters())
    # true-sequential: o / down see the quantized q,k,v / gate,up outputs, so they differ; q is the same
    assert torch.equal(seq.blocks[0].role("q").weight, flat.blocks[0].role("q").weight)
    assert not torch.equal(seq.blocks[0].role("down").weight, flat.blocks[0].role("down").weight)
    with pytest.raises(ConfigError, match="group_size"):
        GPTQ(w_granularity="group", group_size=128, progress=False).quantize(copy.deepcopy(tiny_dream), calib)


def test_act_order_case_worked_by_hand():
    """Row (0.70, 0.46), scale 0.1, H = [[1, 1.9], [1.9, 4]]: act order quantizes column 2 (H22 = 4) first.

    q2 = 0.5, e2 = -0.04, the optimal w1 given q2 is 0.70 + e2 * H12 / H11 = 0.624 -> 0.6: Q = (0.6, 0.5),
    objective e H e^T = 0.01 - 0.0152 + 0.0064 = 0.0012. In column order q1 = 0.7 exactly (e1 = 0) and w2
    stays 0.46 -> 0.5: Q = (0.7, 0.5), objective 0.04^2 * 4 = 0.0064.
    """
    W, H = torch.tensor([[0.70, 0.46]]), torch.tensor([[1.0, 1.9], [1.9, 4.0]])
    ordered, _ = gptq_solve(W, H, W4, percdamp=0.0, act_order=True)
    plain, _ = gptq_solve(W, H, W4, percdamp=0.0)
    torch.testing.assert_close(ordered, torch.tensor([[0.6, 0.5]]))
    torch.testing.assert_close(plain, torch.tensor([[0.7, 0.5]]))
    for Q, objective in ((ordered, 0.0012), (plain, 0.0064)):
        e = W[0] - Q[0]
        assert float(e @ H @ e) == pytest.approx(objective, abs=1e-6)


def test_static_and_dynamic_groups_worked_by_hand():
    """Row (0.7, 0.33 | 1.4, 0.53), groups of 2, absmax / 7, H = I with H_12 = H_21 = 0.5 (0-based), blocksize 2.

    Group 0 (scale 0.1): q0 = 0.7, q1 = 0.3, e1 = 0.03 moves w2 to 1.4 + 0.5 * 0.03 / 1 = 1.415 (w3 is not
    coupled). Static groups keep group 1's scale from the original weights, 1.4 / 7 = 0.2: q2 = round(7.075)
    0.2 = 1.4, q3 = round(2.65) 0.2 = 0.6. Dynamic groups (IST) take it from the updated weights at the block
    boundary, 1.415 / 7: q2 = 1.415, q3 = round(2.622) 1.415 / 7 = 0.60643.
    """
    W = torch.tensor([[0.7, 0.33, 1.4, 0.53]])
    H = torch.eye(4)
    H[1, 2] = H[2, 1] = 0.5
    spec = QuantSpec(bits=4, granularity="group", group_size=2)
    static, _ = gptq_solve(W, H, spec, blocksize=2, percdamp=0.0, static_groups=True)
    dynamic, _ = gptq_solve(W, H, spec, blocksize=2, percdamp=0.0, static_groups=False)
    torch.testing.assert_close(static, torch.tensor([[0.7, 0.3, 1.4, 0.6]]))
    torch.testing.assert_close(dynamic, torch.tensor([[0.7, 0.3, 1.415, 3 * 1.415 / 7]]))
    # with static groups the order of the columns does not move the grid: every group stays on its original scale
    reordered, _ = gptq_solve(W, H + torch.diag(torch.tensor([0.0, 0.0, 0.0, 3.0])), spec, blocksize=2,
                              percdamp=0.0, act_order=True, static_groups=True)
    codes = reordered / torch.tensor([[0.1, 0.1, 0.2, 0.2]])
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)


def test_defaults_follow_llm_compressor_and_every_alternative_stays_selectable():
    g = GPTQ(progress=False)
    assert g.reference == "llm_compressor" and (g.act_order, g.static_groups, g.true_sequential) == (True, True, False)
    assert g.bits.scale_convention == "absmax"  # W4A4: the activation grid of the W4A4 methods
    wo = GPTQ(a_bits=16, w_granularity="group", group_size=128, progress=False)
    assert wo.bits.scale_convention == "halfstep" and wo.label == "W4A16-g128"  # weight-only: absmax / 7.5
    assert GPTQ(a_bits=16, kv_bits=4, progress=False).bits.scale_convention == "absmax"
    ist = GPTQ(reference="ist", a_bits=16, progress=False)
    assert (ist.act_order, ist.static_groups, ist.true_sequential, ist.bits.scale_convention) == (
        False, False, True, "halfstep")
    own = GPTQ(reference="ist", act_order=True, true_sequential=False, scale_convention="absmax", progress=False)
    assert (own.act_order, own.static_groups, own.true_sequential, own.bits.scale_convention) == (
        True, False, False, "absmax")
    assert set(REFERENCES) == {"llm_compressor", "ist", "quarot"}
    with pytest.raises(ConfigError, match="reference 'autogptq' unknown; valid: llm_compressor, ist, quarot"):
        GPTQ(reference="autogptq")
    with pytest.raises(ConfigError, match="quantizer.act_order='maybe': must be true or false"):
        GPTQ(act_order="maybe")
    with pytest.raises(ConfigError, match="blocksize"):
        GPTQ(blocksize=0)


def test_composed_presets_build_the_documented_settings():
    from test_config import compose_cfg

    g = build("quantizer", compose_cfg("experiment=none", "method=gptq", "bits=w4a16_g128").quantizer)
    assert (g.reference, g.act_order, g.static_groups, g.true_sequential, g.bits.scale_convention, g.label) == (
        "llm_compressor", True, True, False, "halfstep", "W4A16-g128")
    ist = build("quantizer", compose_cfg("experiment=none", "method=gptq", "quantizer.reference=ist").quantizer)
    assert (ist.act_order, ist.static_groups, ist.true_sequential, ist.bits.scale_convention) == (
        False, False, True, "halfstep")
    q = build("quantizer", compose_cfg("experiment=none", "method=quarot", "bits=w4a16_g128").quantizer)
    assert (q.reference, q.act_order, q.static_groups, q.true_sequential, q.bits.scale_convention) == (
        "quarot", False, False, True, "absmax")


def test_quarot_keeps_its_gptq_settings_bit_identically():
    """QuaRot reads its GPTQ defaults from GPTQ's constructor: they stay QuaRot's reference (absmax, no act order,
    dynamic groups, true-sequential), so QuaRot built from code equals QuaRot with those values spelled out."""
    from conftest import make_tiny

    for kw in ({"w_bits": 4, "a_bits": 4}, {"a_bits": 16, "w_granularity": "group", "group_size": 16}):
        default = QuaRot(progress=False, **kw)
        assert (default.act_order, default.static_groups, default.true_sequential, default.bits.scale_convention) == (
            False, False, True, "absmax")
        model = make_tiny("dream")
        calib = _rows(model)
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        default.quantize(a, calib)
        QuaRot(act_order=False, static_groups=False, true_sequential=True, scale_convention="absmax", progress=False,
               **kw).quantize(b, calib)
        for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(p, q), n


def _rows(model, n=6, length=20):
    from types import SimpleNamespace

    ids = torch.randint(4, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(2))
    return SimpleNamespace(input_ids=ids, attention_mask=torch.ones(n, length, dtype=torch.long))


def test_bad_inputs_give_one_line_errors_or_logged_fallbacks(caplog):
    W = torch.randn(4, 12)
    grouped = QuantSpec(bits=4, granularity="group", group_size=8)
    for act_order in (False, True):  # 8 does not divide 12, with or without act order
        with pytest.raises(ConfigError, match=r"^GPTQ on blocks.0.q: group_size 8 does not divide the input size 12"):
            gptq_quantize(W, torch.eye(12), grouped, act_order=act_order, static_groups=True, name="blocks.0.q")
        with pytest.raises(ValueError, match="group_size 8 does not divide the input size 12"):
            gptq_solve(W, torch.eye(12), grouped, act_order=act_order)
    bad = W.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="blocks.1.up"):
        gptq_quantize(bad, torch.eye(12), W4, name="blocks.1.up")
    with caplog.at_level(logging.WARNING, logger="fair_calib.quant.gptq"):  # no token reached the layer
        Q, info = gptq_quantize(W, torch.zeros(12, 12), W4, name="blocks.0.o")
    assert info["fallback"] and torch.equal(Q, fake_quant_weight(W, W4)) and "no calibration token" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fair_calib.quant.gptq"):  # rank 1: the damping retry is logged
        Q, info = gptq_quantize(W[:, :4], torch.ones(4, 4), W4, percdamp=0.0, name="blocks.0.k")
    assert info["retries"] >= 1 and not info["fallback"] and torch.isfinite(Q).all()
    assert "blocks.0.k: Cholesky failed with percdamp 0" in caplog.text
    for msg in (r.getMessage() for r in caplog.records):
        assert "\n" not in msg


@pytest.mark.parametrize("width, strip", [(384, 128), (512, 128), (1536, 256), (192, None), (128, None)])
def test_unweighted_hessian_strips_give_the_full_product(width, strip):
    """Unweighted batches fill the diagonal and upper blocks of the row strips only; the lower blocks are mirrored in
    before a weighted batch, and the result equals the full products accumulated in the same order, bit for bit."""
    assert hessian_strip(width) == strip
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(300, width, generator=g) * torch.exp(torch.randn(width, generator=g)) for _ in range(3)]
    w = torch.rand(300, generator=g) + 0.5
    acc, S = HessianAccumulator(width), torch.zeros(width, width)
    acc.add(xs[0])
    acc.add(xs[1], torch.ones(300))
    acc.add(xs[2], w)  # weighted: full products from here on
    acc.add(xs[0])
    S.addmm_(xs[0].T, xs[0])
    S.addmm_(xs[1].T, xs[1])
    S.addmm_((xs[2] * w[:, None]).T, xs[2])
    S.addmm_(xs[0].T, xs[0])
    assert torch.equal(acc.S, S) and acc.n == pytest.approx(900 + float(w.sum()))
    plain = HessianAccumulator(width)
    for x in xs:
        plain.add(x)
    H = plain.hessian()
    assert torch.equal(H, H.T)
    full = torch.zeros(width, width)
    for x in xs:
        full.addmm_(x.T, x)
    assert torch.equal(H, full * (2.0 / 900))


def test_linears_reading_one_input_share_its_factorization(tiny_llada, char_tokenizer, monkeypatch):
    """One Hessian pass per block: q/k/v share attn_in's Hessian and gate/up mlp_in's, so 4 factorizations per
    block (q/k/v, o, gate/up, down), not 7; the weights are those of factorizing for every linear."""
    import fair_calib.quant.gptq as gptq_mod

    calls = []
    real = gptq_mod.factor_hessian
    monkeypatch.setattr(gptq_mod, "factor_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib = tinyreason_calibration(char_tokenizer, n_samples=6, tasks=["addition"])
    a = copy.deepcopy(tiny_llada)
    GPTQ(a_bits=16, progress=False).quantize(a, calib)
    assert len(calls) == 4 * len(a.blocks)
    # the same weights as solving every linear from its own factorization
    solo = GPTQ(a_bits=16, progress=False)
    monkeypatch.setattr(gptq_mod, "gptq_quantize", _without_sharing(gptq_mod.gptq_quantize))
    b = copy.deepcopy(tiny_llada)
    solo.quantize(b, calib)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def _without_sharing(fn):
    def call(*args, factors=None, **kwargs):
        return fn(*args, factors=None, **kwargs)
    return call
