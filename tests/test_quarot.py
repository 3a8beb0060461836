"""QuaRot (DESIGN 4.5): exact rotation (both families, non-power-of-two sizes), online Hadamards, W4A4 gains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import VOCAB, make_tiny, random_calib
from torch import nn

from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.hadamard import hadamard_matrix, random_hadamard
from fair_calib.quant.qlinear import ActQuantizer, QLinear, qlinears, set_quant_enabled
from fair_calib.quant.quarot import QuaRot
from fair_calib.quant.rotation import CrossHeadHadamard, OnlineHadamard, per_head_hadamard, rotate_model
from fair_calib.quant.rtn import RTN
from fair_calib.registry import ConfigError, build

torch.set_num_threads(1)

IDS = torch.randint(4, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
# (family, overrides): tiny 4-head layout ("heads" mode before o_proj) and the shipped tiny size (6 heads -> "full")
SIZES = [
    ("llada", {}),
    ("dream", {}),
    ("llada", dict(d_model=192, n_heads=6, n_kv_heads=6, intermediate_size=384)),
    ("dream", dict(d_model=192, n_heads=6, n_kv_heads=2, intermediate_size=448)),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _quarot_off(model: DiffusionLM, **kw) -> dict:
    """QuaRot with A4/KV4 quantizers installed (weights FP), then every quantizer switched off."""
    report = QuaRot(weight_method="rtn", w_bits=16, a_bits=4, kv_bits=4, progress=False, **kw).quantize(model)
    set_quant_enabled(model, False)
    return report


@pytest.mark.parametrize(("family", "over"), SIZES)
def test_rotation_preserves_logits(family: str, over: dict) -> None:
    """Quantizers off: rotated model == FP model to float32 precision (Dream: GQA, biases, shifted logits)."""
    model = make_tiny(family, **over)
    with torch.no_grad():
        ref = model(IDS)
        mask = torch.ones_like(IDS)
        mask[0, -5:] = 0
        ref_masked = model(IDS, mask)
        report = _quarot_off(model)
        assert _rel(model(IDS), ref) < 1e-4
        assert _rel(model(IDS, mask), ref_masked) < 1e-4
    heads = model.config.n_heads
    assert report["rotation"]["o_hadamard"] == ("heads" if heads == 4 else "full")
    assert report["layers"] == 7 * model.config.n_layers


def test_residual_stream_is_rotated() -> None:
    """Embeddings and every block output of the rotated model are the FP ones times Q = random_hadamard(d, seed)."""
    model = make_tiny("dream", d_model=192, n_heads=6, n_kv_heads=2, intermediate_size=448)
    fp = copy.deepcopy(model)
    _quarot_off(model, rotation_seed=7)
    q = random_hadamard(192, 7, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model.embed(IDS), fp.embed(IDS) @ q, atol=1e-5)
        h, h_fp = model.embed(IDS), fp.embed(IDS)
        rope = model.rope(IDS.shape[1])
        for block, block_fp in zip(model.blocks, fp.blocks, strict=True):
            h, h_fp = block(h, rope), block_fp(h_fp, rope)
            assert _rel(h, h_fp @ q) < 1e-5
    # the rotation really mixes channels: it is not the identity on the residual stream
    assert _rel(model.embed(IDS), fp.embed(IDS)) > 0.5
    # the diagnostics compare last-block outputs in the FP basis (model.residual_basis = Q)
    from fair_calib.diagnostics.hidden_mse import last_block_outputs

    attn = torch.ones_like(IDS)
    assert torch.equal(model.residual_basis, q)
    assert _rel(last_block_outputs(model, IDS, attn), last_block_outputs(fp, IDS, attn)) < 1e-5


def test_offline_merges_match_hand_built_matrices() -> None:
    """Weights equal the formulas built from explicit Hadamard matrices (llada, 4 heads of 8: QuaRot's 'heads')."""
    model = make_tiny("llada")
    fp = copy.deepcopy(model)
    rotate_model(model, seed=3, progress=False)
    q = random_hadamard(32, 3)
    h8, h4, h64 = (hadamard_matrix(n) / math.sqrt(n) for n in (8, 4, 64))
    for b, bf in zip(model.blocks, fp.blocks, strict=True):
        g_attn, g_mlp = bf.role("attn_norm").weight.double(), bf.role("mlp_norm").weight.double()
        wq = bf.role("q").weight.double() * g_attn
        assert torch.allclose(b.role("q").weight.double(), wq @ q, atol=1e-6)
        wv = bf.role("v").weight.double() * g_attn @ q
        v_expected = torch.block_diag(*[h8.T] * 4) @ wv  # per head: H_hd^T W_v[h]
        assert torch.allclose(b.role("v").weight.double(), v_expected, atol=1e-6)
        o_expected = q.T @ bf.role("o").weight.double() @ torch.kron(h4, h8)  # o input: full H_heads (x) H_hd
        assert torch.allclose(b.role("o").weight.double(), o_expected, atol=1e-6)
        assert torch.allclose(b.role("gate").weight.double(), bf.role("gate").weight.double() * g_mlp @ q, atol=1e-6)
        down_expected = q.T @ bf.role("down").weight.double() @ h64
        assert torch.allclose(b.role("down").weight.double(), down_expected, atol=1e-6)
        assert torch.equal(b.role("attn_norm").weight, torch.ones(32))
        assert torch.equal(b.role("mlp_norm").weight, torch.ones(32))
    g_f = fp.final_norm.weight.double()
    assert torch.allclose(model.output_layer.weight.double(), fp.output_layer.weight.double() * g_f @ q, atol=1e-6)
    assert torch.equal(model.final_norm.weight, torch.ones(32))
    assert torch.allclose(model.embed_tokens.weight.double(), fp.embed_tokens.weight.double() @ q, atol=1e-6)


def test_dream_biases() -> None:
    """q/k biases are untouched by the input rotation; the v bias follows the per-head Hadamard of V's output."""
    model = make_tiny("dream")
    fp = copy.deepcopy(model)
    rotate_model(model, seed=0, progress=False)
    for b, bf in zip(model.blocks, fp.blocks, strict=True):
        assert torch.equal(b.role("q").bias, bf.role("q").bias)
        assert torch.equal(b.role("k").bias, bf.role("k").bias)
        v_b = bf.role("v").bias.double()
        assert torch.allclose(b.role("v").bias.double(), per_head_hadamard(v_b, 8), atol=1e-7)
        assert not torch.allclose(b.role("v").bias, bf.role("v").bias)


def test_online_modules_in_place() -> None:
    """Taps: Hadamard across heads / full H_d before o, H_ff before down, H_hd on Q and K (K quantized after it)."""
    model = make_tiny("dream", d_model=192, n_heads=6, n_kv_heads=2, intermediate_size=448)
    QuaRot(weight_method="rtn", kv_bits=4, progress=False).quantize(model)
    for block in model.blocks:
        taps = block.taps
        assert isinstance(taps["attn_ctx"], OnlineHadamard) and taps["attn_ctx"].n == 192  # 6 heads: no H_6
        assert isinstance(taps["mlp_mid"], OnlineHadamard) and taps["mlp_mid"].k_matrix.shape == (28, 28)
        assert isinstance(taps["q_rope"], OnlineHadamard) and taps["q_rope"].n == 32
        k_had, k_quant = taps["k_rope"]
        assert isinstance(k_had, OnlineHadamard) and isinstance(k_quant, ActQuantizer)
        assert (k_quant.spec.bits, k_quant.spec.symmetric, k_quant.spec.clip_ratio) == (4, False, 0.95)
        assert isinstance(taps["v_heads"], ActQuantizer)
        for lin in block.linears().values():
            assert isinstance(lin, QLinear) and lin.a_spec.clip_ratio == 0.9 and lin.a_spec.symmetric
    assert not isinstance(model.output_layer, QLinear) and len(qlinears(model)) == 14

    four = make_tiny("llada")
    QuaRot(weight_method="rtn", progress=False).quantize(four)
    assert isinstance(four.blocks[0].taps["attn_ctx"], CrossHeadHadamard)
    assert isinstance(four.blocks[0].taps["q_rope"], nn.Identity)  # no Q/K Hadamard without KV quantization


def test_online_hadamard_values() -> None:
    """OnlineHadamard = x H_n / sqrt(n) (non-power-of-two 384 = 12 * 32); CrossHeadHadamard = x (H_heads (x) I)."""
    x = torch.randn(2, 5, 384, dtype=torch.float64)
    assert torch.allclose(OnlineHadamard(384).double()(x), x @ hadamard_matrix(384) / math.sqrt(384), atol=1e-12)
    y = torch.randn(3, 4 * 8, dtype=torch.float64)
    expected = y @ torch.kron(hadamard_matrix(4), torch.eye(8, dtype=torch.float64)) / 2.0
    assert torch.allclose(CrossHeadHadamard(4, 8).double()(y), expected, atol=1e-12)
    xb = torch.randn(4, 384).to(torch.bfloat16)
    out = OnlineHadamard(384)(xb)
    assert out.dtype == torch.bfloat16
    assert _rel(out.float(), xb.float() @ hadamard_matrix(384, torch.float32) / math.sqrt(384)) < 1e-2


def _outlier_model(family: str) -> DiffusionLM:
    """Tiny-size random model with a few massive activation channels (scaled embedding columns and norm weights)."""
    model = make_tiny(family, d_model=192, n_heads=6, n_kv_heads=6 if family == "llada" else 2,
                      intermediate_size=384)
    idx = torch.tensor([3, 50, 100, 170])
    with torch.no_grad():
        model.embed_tokens.weight[:, idx] *= 30.0
        for block in model.blocks:
            block.role("attn_norm").weight[idx] *= 10.0
            block.role("mlp_norm").weight[idx] *= 10.0
    return model


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_w4a4_quarot_beats_rtn_with_outliers(family: str) -> None:
    model = _outlier_model(family)
    with torch.no_grad():
        ref = model(IDS)
        errs = {}
        for name, quantizer in (("rtn", RTN(w_bits=4, a_bits=4)),
                                ("quarot", QuaRot(weight_method="rtn", w_bits=4, a_bits=4, progress=False))):
            q = copy.deepcopy(model)
            quantizer.quantize(q)
            errs[name] = _rel(q(IDS), ref)
    assert errs["quarot"] < 0.8 * errs["rtn"], errs


def test_same_seed_identical_weights() -> None:
    a, b, c = (make_tiny("dream") for _ in range(3))
    QuaRot(weight_method="rtn", rotation_seed=5, progress=False).quantize(a)
    QuaRot(weight_method="rtn", rotation_seed=5, progress=False).quantize(b)
    QuaRot(weight_method="rtn", rotation_seed=6, progress=False).quantize(c)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_registry_and_config_errors() -> None:
    q = build("quantizer", {"name": "quarot", "weight_method": "rtn", "w_bits": 4, "a_bits": 4, "kv_bits": 4})
    assert isinstance(q, QuaRot) and q.label == "W4A4KV4-rtn" and not q.requires_calibration
    assert (q.bits.a_clip_ratio, q.bits.kv_clip_ratio, q.bits.kv_symmetric) == (0.9, 0.95, False)
    with pytest.raises(ConfigError, match="weight_method"):
        build("quantizer", {"name": "quarot", "weight_method": "awq"})
    with pytest.raises(ConfigError, match="o_hadamard"):
        build("quantizer", {"name": "quarot", "o_hadamard": "sideways"})
    odd = make_tiny("llada", d_model=24, n_heads=4, n_kv_heads=4, intermediate_size=32)  # head_dim 6: no H_6
    with pytest.raises(ConfigError, match="head_dim=6"):
        QuaRot(weight_method="rtn", progress=False).quantize(odd)
    with pytest.raises(ConfigError, match="n_heads=6"):
        QuaRot(weight_method="rtn", o_hadamard="heads", progress=False).quantize(
            make_tiny("llada", d_model=192, n_heads=6, n_kv_heads=6, intermediate_size=384))


_calib = random_calib


def test_gptq_weights_beat_rtn_weights() -> None:
    """weight_method=gptq runs through the layer-wise engine on the rotated model and lowers the W4A4 error."""
    model = _outlier_model("dream")
    calib = _calib()
    with torch.no_grad():
        ref = model(IDS)
    quarot = build("quantizer", {"name": "quarot", "w_bits": 4, "a_bits": 4, "percdamp": 0.01, "progress": False})
    assert quarot.requires_calibration and quarot.engine.propagate == "weights" and quarot.label == "W4A4"
    with pytest.raises(ConfigError, match="calibration data"):
        quarot.quantize(copy.deepcopy(model), None)
    gq, rq = copy.deepcopy(model), copy.deepcopy(model)
    report = quarot.quantize(gq, calib)
    QuaRot(weight_method="rtn", w_bits=4, a_bits=4, progress=False).quantize(rq)
    assert report["rotation"]["hadamard_factors"]["d_model"] == [12, 16]
    assert len(report["blocks"]) == 2 and report["blocks"][0]["fallbacks"] == 0
    assert all(lin.weight_frozen for lin in qlinears(gq))
    assert isinstance(gq.blocks[1].taps["mlp_mid"], OnlineHadamard)
    with torch.no_grad():
        err_gptq, err_rtn = _rel(gq(IDS), ref), _rel(rq(IDS), ref)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
