"""SmoothQuant: the scale formula by hand, exact folding (quantizers off = FP model), padding ignored, W8A8 / W4A4."""

from __future__ import annotations

import copy

import pytest
import torch

from fair_calib.data.calibration import tinyreason_calibration
from fair_calib.quant.qlinear import qlinears, set_quant_enabled
from fair_calib.quant.smoothquant import AbsMax, SmoothQuant, smoothing_scales
from fair_calib.registry import ConfigError, build


def test_smoothing_scales_by_hand():
    """max|X| = (4, 1), max|W| over both linears' columns = (1, 8): s = (sqrt(4 / 1), sqrt(1 / 8)) at alpha 0.5."""
    act = torch.tensor([4.0, 1.0])
    w1 = torch.tensor([[1.0, 2.0], [0.5, -8.0]])
    w2 = torch.tensor([[-0.25, 0.0]])
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 8 ** -0.5], dtype=torch.float64))
    # alpha 1: s = max|X|; a zero activation channel is clamped to min_scale
    torch.testing.assert_close(smoothing_scales(torch.tensor([3.0, 0.0]), [w1], alpha=1.0),
                               torch.tensor([3.0, 1e-5], dtype=torch.float64))


def test_absmax_ignores_zero_weight_tokens():
    stat = AbsMax()
    x = torch.tensor([[[1.0, -2.0], [100.0, -100.0], [-3.0, 0.5]]])
    stat.add(x, torch.tensor([[1.0, 0.0, 0.2]]))
    torch.testing.assert_close(stat.value, torch.tensor([3.0, 2.0]))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_smoothing_alone_keeps_the_fp_model(family, char_tokenizer):
    from conftest import make_tiny

    model = make_tiny(family)
    calib = tinyreason_calibration(char_tokenizer, n_samples=4, tasks=["addition", "compare"])
    ref = model(calib.input_ids).detach()
    norms = [b.role("attn_norm").weight.detach().clone() for b in model.blocks]
    SmoothQuant(w_bits=4, a_bits=4, freeze_weights=False, progress=False).quantize(model, calib)
    assert not torch.allclose(model.blocks[0].role("attn_norm").weight, norms[0])  # scales were applied
    set_quant_enabled(model, False)
    out = model(calib.input_ids).detach()
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    # 16-bit "quantization" through the freeze path is the same FP model
    fresh = make_tiny(family)
    build("quantizer", {"name": "smoothquant", "w_bits": 16, "a_bits": 16, "progress": False}).quantize(fresh, calib)
    torch.testing.assert_close(fresh(calib.input_ids), ref, rtol=1e-5, atol=1e-5)


def test_smoothquant_beats_rtn_with_activation_outliers(tiny_llada, char_tokenizer):
    """A norm weight with a 30x channel makes per-token activation quantization lossy; smoothing moves it to W."""
    with torch.no_grad():
        for b in tiny_llada.blocks:
            b.role("attn_norm").weight[3] *= 30
            b.role("mlp_norm").weight[5] *= 30
    calib = tinyreason_calibration(char_tokenizer, n_samples=6, tasks=["addition", "compare"])
    ref = tiny_llada(calib.input_ids).detach()
    errs = {}
    for name in ("rtn", "smoothquant"):
        m = copy.deepcopy(tiny_llada)
        report = build("quantizer", {"name": name, "w_bits": 8, "a_bits": 4, "progress": False}
                       if name == "smoothquant" else {"name": name, "w_bits": 8, "a_bits": 4}).quantize(m, calib)
        with torch.no_grad():
            out = m(calib.input_ids)
        errs[name] = float((out - ref).pow(2).mean() / ref.pow(2).mean())
        if name == "smoothquant":
            assert report["propagate"] == "fp" and report["blocks"][0]["attn_norm_scale_max"] > 1
            assert all(q.weight_frozen and torch.isfinite(q.weight).all() for q in qlinears(m))
    assert errs["smoothquant"] < 0.7 * errs["rtn"]


def test_smoothquant_w8a8_default_and_errors(tiny_dream, char_tokenizer):
    sq = SmoothQuant()
    assert sq.label == "W8A8"
    calib = tinyreason_calibration(char_tokenizer, n_samples=3, tasks=["addition"])
    ref = tiny_dream(calib.input_ids).detach()
    SmoothQuant(progress=False).quantize(tiny_dream, calib)
    out = tiny_dream(calib.input_ids).detach()
    assert float((out - ref).pow(2).mean() / ref.pow(2).mean()) < 1e-3
    with pytest.raises(ConfigError, match="alpha"):
        SmoothQuant(alpha=1.5)
