"""AWQ: scale normalization, weighted search losses (zero-weight tokens ignored), clip search, exact folding."""

from __future__ import annotations

import copy

import pytest
import torch

from fair_calib.data.calibration import tinyreason_calibration
from fair_calib.quant.awq import (
    AWQ,
    apply_clip,
    awq_clip_search,
    awq_linear_search,
    candidate_scales,
    weighted_mean_abs,
)
from fair_calib.quant.grids import QuantSpec, fake_quant_weight
from fair_calib.quant.qlinear import qlinears, set_quant_enabled
from fair_calib.registry import ConfigError, build

G8 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=8)


def _outlier_inputs(n=256, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    x[:, 2] *= 20.0  # one salient input channel
    return x, torch.randn(12, dim, generator=g)


def test_candidate_scales_by_hand():
    m = torch.tensor([4.0, 1.0, 0.25])
    torch.testing.assert_close(candidate_scales(m, 0.0), torch.ones(3))
    # r = 0.5: (2, 1, 0.5) / sqrt(2 * 0.5) = (2, 1, 0.5)
    torch.testing.assert_close(candidate_scales(m, 0.5), torch.tensor([2.0, 1.0, 0.5]))
    # r = 1: (4, 1, 0.25) / sqrt(4 * 0.25) -> max * min = 1 after normalization
    s = candidate_scales(m, 1.0)
    assert float(s.max() * s.min()) == pytest.approx(1.0)
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    torch.testing.assert_close(weighted_mean_abs(x, torch.tensor([3.0, 1.0])), torch.tensor([1.5, 2.5]))


def test_linear_search_weighted_loss_by_hand_and_gain():
    x, W = _outlier_inputs()
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1)) + 0.1
    s, ratio, losses = awq_linear_search(W, None, x, w, G8, n_grid=10)
    # ratio 0 = plain RTN: loss = sum_i w_i mean_o (x_i (W - Q(W))^T)_o^2 / sum_i w_i
    rtn = ((x @ (W - fake_quant_weight(W, G8)).T).pow(2).mean(-1) * w).sum() / w.sum()
    assert losses[0] == pytest.approx(float(rtn), rel=1e-5)
    assert ratio > 0 and min(losses) < 0.8 * losses[0]
    assert losses[int(round(ratio * 10))] == min(losses)
    torch.testing.assert_close(s, candidate_scales(weighted_mean_abs(x, w), ratio))


def test_search_ignores_zero_weight_tokens():
    x, W = _outlier_inputs()
    w = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2)) + 0.1
    x_bad = torch.cat([x, 1e4 * torch.randn(7, x.shape[1])])  # garbage tokens ...
    w_bad = torch.cat([w, torch.zeros(7)])  # ... with weight 0
    s1, r1, l1 = awq_linear_search(W, None, x, w, G8, n_grid=10)
    s2, r2, l2 = awq_linear_search(W, None, x_bad, w_bad, G8, n_grid=10)
    assert l1 == l2 and r1 == r2 and torch.equal(s1, s2)
    c1 = awq_clip_search(W, x, w, G8, n_tokens=64)
    c2 = awq_clip_search(W, x_bad, w_bad, G8, n_tokens=64)
    assert torch.equal(c1, c2)
    # but a weighted token does change the result
    _, _, l3 = awq_linear_search(W, None, x_bad, torch.cat([w, torch.ones(7)]), G8, n_grid=10)
    assert l3 != l1


def test_clip_search_range_and_gain():
    x, W = _outlier_inputs(dim=16)
    W[0, 0] = 6.0  # a weight outlier: clipping it helps the rest of its group
    w = torch.ones(x.shape[0])
    max_val = awq_clip_search(W, x, w, G8, clip_grid=20, max_shrink=0.5)
    org = W.reshape(12, 2, 8).abs().amax(-1)
    assert max_val.shape == (12, 2)
    assert bool((max_val <= org + 1e-6).all()) and bool((max_val >= 0.5 * org - 1e-6).all())
    lin = torch.nn.Linear(16, 12, bias=False)
    lin.weight.data = W.clone()
    apply_clip(lin, max_val)
    assert float(lin.weight.data.abs().reshape(12, 2, 8).amax(-1).sub(max_val).max()) <= 1e-6

    def err(Wc):  # the objective the search minimizes, summed over groups
        return float((x @ (W - fake_quant_weight(Wc, G8)).T).pow(2).mean())

    assert err(lin.weight.data) <= err(W)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_scales_alone_keep_the_fp_model(family, char_tokenizer):
    from conftest import make_tiny

    model = make_tiny(family)
    calib = tinyreason_calibration(char_tokenizer, n_samples=3, tasks=["addition"])
    ref = model(calib.input_ids).detach()
    norm = model.blocks[0].role("attn_norm").weight.detach().clone()
    report = AWQ(group_size=16, clip=False, freeze_weights=False, n_grid=5, progress=False).quantize(model, calib)
    assert report["propagate"] == "fp" and "ratio_qkv" in report["blocks"][0]
    assert ("ratio_vo" in report["blocks"][0]) == (family == "llada")  # Dream's GQA v -> o cannot be folded
    assert not torch.allclose(model.blocks[0].role("attn_norm").weight, norm)  # scales were folded
    set_quant_enabled(model, False)
    out = model(calib.input_ids).detach()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def test_awq_end_to_end_beats_rtn_and_is_deterministic(tiny_llada, char_tokenizer):
    calib = tinyreason_calibration(char_tokenizer, n_samples=4, tasks=["addition", "compare"])
    ref = tiny_llada(calib.input_ids).detach()
    cfg = {"name": "awq", "group_size": 32, "n_grid": 10, "clip_grid": 10, "progress": False}
    a, b, r = copy.deepcopy(tiny_llada), copy.deepcopy(tiny_llada), copy.deepcopy(tiny_llada)
    build("quantizer", cfg).quantize(a, calib)
    build("quantizer", cfg).quantize(b, calib)
    build("quantizer", {"name": "rtn", "a_bits": 16, "w_granularity": "group", "group_size": 32,
                        "w_symmetric": False}).quantize(r, calib)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert all(q.weight_frozen and torch.isfinite(q.weight).all() for q in qlinears(a))
    with torch.no_grad():
        ea = float((a(calib.input_ids) - ref).pow(2).mean())
        er = float((r(calib.input_ids) - ref).pow(2).mean())
    assert ea < er


def test_awq_defaults_and_errors(tiny_llada, char_tokenizer):
    assert AWQ().label == "W4A16-g128"
    with pytest.raises(ConfigError, match="group_size"):  # 32 / 64 wide tiny model, group 128
        AWQ(progress=False).quantize(tiny_llada, tinyreason_calibration(char_tokenizer, n_samples=2))
    with pytest.raises(ConfigError, match="max_shrink"):
        AWQ(max_shrink=1.5)
