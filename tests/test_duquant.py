"""DuQuant (arXiv 2406.01721): exact transform with quantizers off, orthogonal x diagonal merges, zigzag assignment,
greedy outlier rotation, W4A4 gain over RTN, config errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, make_tiny, random_calib

from fair_calib.models.hf_folder import resolve_model_path
from fair_calib.models.loading import load_dllm
from fair_calib.quant.duquant import (
    DuQuant,
    DuQuantTransform,
    build_transform,
    greedy_rotation,
    resolve_block_size,
    spreading_rotation,
    zigzag_permutation,
)
from fair_calib.quant.qlinear import qlinears, set_quant_enabled
from fair_calib.quant.rtn import RTN
from fair_calib.registry import ConfigError, build

torch.set_num_threads(1)

IDS = torch.randint(4, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
F64 = torch.float64


_calib = random_calib


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _fast(**kw) -> DuQuant:
    return DuQuant(rotation_steps=8, rotation_tokens=64, progress=False, **kw)


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_quantizers_off_equal_fp(name: str) -> None:
    """Quantizers off (bits 16, or A4 with every quantizer switched off): the transformed model's logits are the FP
    model's to 1e-5 elementwise in float64 (the algebra is exact), and to 1e-5 relative in float32 (the float32 merges
    and online ops leave |d logit| ~ 5e-5 on logits of ~10, as QuaRot's rotation does)."""
    fp32 = load_dllm(resolve_model_path(name)).eval()
    ids = IDS % fp32.config.vocab_size
    calib = _calib(vocab=fp32.config.vocab_size)
    for fp in (fp32, copy.deepcopy(fp32).double()):
        with torch.no_grad():
            ref = fp(ids)
        off = copy.deepcopy(fp)
        report = _fast(w_bits=16, a_bits=16).quantize(off, calib)
        outs = [off]
        if fp is fp32:  # A4 quantizers installed, then switched off
            a4 = copy.deepcopy(fp)
            _fast(w_bits=16, a_bits=4).quantize(a4, calib)
            set_quant_enabled(a4, False)
            outs.append(a4)
        with torch.no_grad():
            for out in (m(ids) for m in outs):
                if fp is fp32:
                    assert _rel(out, ref) < 1e-5
                else:
                    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert report["rotation_blocks"] == {"attn_in": 96, "attn_ctx": 96, "mlp_in": 96, "mlp_mid": 128}
        # the transform is not the identity: the online ops sit in the taps and the weights changed
        assert isinstance(off.blocks[0].taps["mlp_mid"], DuQuantTransform)
        assert _rel(off.blocks[0].role("down").weight, fp.blocks[0].role("down").weight) > 0.1


def test_weights_are_orthogonal_times_diagonal() -> None:
    """Per group: x_t = (x / s) M at the linear's input and W_t = W diag(s) M, M orthogonal, inverse exact (float64)."""
    fp = make_tiny("dream")  # GQA: o_proj's smoothing is shared by the heads of a KV group
    model = copy.deepcopy(fp)
    _fast(w_bits=16, a_bits=16).quantize(model, _calib())
    captured: dict[str, torch.Tensor] = {}

    def grab(key: str):
        def hook(module, inputs, output):
            captured[key] = inputs[0].detach().double()
        return hook

    handles = [m.blocks[0].role(r).register_forward_hook(grab(f"{tag}.{r}"))
               for tag, m in (("fp", fp), ("dq", model)) for r in ("q", "o", "gate", "down")]
    with torch.no_grad():
        fp(IDS), model(IDS)
    for h in handles:
        h.remove()
    block, block_fp = model.blocks[0], fp.blocks[0]
    for point, role in (("attn_in", "q"), ("attn_ctx", "o"), ("mlp_in", "gate"), ("mlp_mid", "down")):
        t = block.taps[point]
        m = t.matrix()
        n = m.shape[0]
        assert torch.allclose(m.T @ m, torch.eye(n, dtype=F64), atol=1e-12)
        x = torch.randn(5, n, dtype=F64)
        assert torch.allclose(t.inverse(t(x)), x, atol=1e-12)
        # W_t = W diag(s) M  =>  diag(s) = W^+ W_t M^T on this full-column-rank W; s read from the fitted diagonal
        w0, wt = block_fp.role(role).weight.double(), block.role(role).weight.double()
        ws = wt @ m.T  # = W diag(s)
        s = (ws * w0).sum(0) / (w0 * w0).sum(0)
        assert torch.allclose(ws, w0 * s[None, :], rtol=1e-4, atol=1e-6), point
        assert (s > 0).all()
        # the linear's input is the FP input divided by s, times M
        x_fp, x_dq = captured[f"fp.{role}"], captured[f"dq.{role}"]
        assert torch.allclose(x_dq, (x_fp / s) @ m, rtol=1e-4, atol=1e-5), point
    s_o = ((block.role("o").weight.double() @ block.taps["attn_ctx"].matrix().T)
           / block_fp.role("o").weight.double()).median(0).values
    kv = s_o.reshape(2, 2, 8)  # (kv heads, query heads per kv head, head_dim): equal across a KV group
    assert torch.allclose(kv[:, 0], kv[:, 1], rtol=1e-6)


def test_zigzag_permutation_hand_example() -> None:
    """Maxima [1, 8, 3, 6, 5, 2, 7, 4], blocks of 2: descending 8 7 6 5 4 3 2 1 dealt to blocks 0 1 2 3 3 2 1 0."""
    perm = zigzag_permutation(torch.tensor([1.0, 8, 3, 6, 5, 2, 7, 4]), 2)
    assert perm.tolist() == [1, 0, 6, 5, 3, 2, 4, 7]  # blocks {8,1} {7,2} {6,3} {5,4}: every block sums to 9
    # two blocks: (9, 8) -> 0, 1; (7, 5) -> 1, 0; (3, 1) -> 0, 1
    perm3 = zigzag_permutation(torch.tensor([9.0, 1, 5, 7, 3, 8]), 3)
    assert perm3.tolist() == [0, 2, 4, 5, 3, 1]


def test_spreading_rotation_and_greedy_step() -> None:
    """R0 is orthogonal with row 0 = 1/sqrt(b); one greedy step turns a lone outlier a e_d into |entries| a/sqrt(b)."""
    g = torch.Generator().manual_seed(0)
    r0 = spreading_rotation(16, g)
    assert torch.allclose(r0.T @ r0, torch.eye(16, dtype=F64), atol=1e-12)
    assert torch.allclose(r0[0], torch.full((16,), 0.25, dtype=F64))
    x = torch.zeros(1, 16, dtype=F64)
    x[0, 11] = 8.0
    r, peaks = greedy_rotation(x, 1, g)
    assert torch.allclose((x @ r).abs(), torch.full((1, 16), 2.0, dtype=F64))
    assert peaks == pytest.approx([8.0, 2.0])


def test_greedy_rotation_reduces_outlier_peak() -> None:
    """A constructed activation with a massive outlier channel and a normal one: max|x R1 P R2| drops far below max|x|,
    and R is the best prefix (never worse than the identity)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=g, dtype=F64)
    x[:, 7] *= 12.0  # normal outlier channel
    x[5, 40] = 300.0  # massive outlier on one token
    t, peak = build_transform(x, 32, 16, torch.Generator().manual_seed(0))
    assert peak == pytest.approx(float(t(x).abs().max()))
    assert peak < 0.25 * float(x.abs().max())
    r, peaks = greedy_rotation(x[:, :32], 16, torch.Generator().manual_seed(0))
    assert float((x[:, :32] @ r).abs().max()) == pytest.approx(min(peaks), rel=1e-5) and min(peaks) <= peaks[0]


def test_w4a4_duquant_beats_rtn() -> None:
    """W4A4 on tiny-llada (tinyreason calibration / test rows): finite logits and a last-hidden MSE well below RTN's
    on the same grid (measured: 0.47 vs 1.06 with the defaults and 128 rows; here a small, fast setting)."""
    fp = load_dllm(resolve_model_path("tiny-llada")).eval()
    calib = build("data", {"name": "tinyreason", "n_samples": 32, "split": "calibration"}, tokenizer=fp.tokenizer)
    test = build("data", {"name": "tinyreason", "n_samples": 16, "split": "test", "seed": 1}, tokenizer=fp.tokenizer)
    with torch.no_grad():
        ref = fp.hidden_states(test.input_ids)
    grid = dict(w_symmetric=False, a_symmetric=False, a_clip_ratio=0.9)
    errs = {}
    for name, quantizer in (("rtn", RTN(**grid)), ("duquant", _fast(**grid))):
        q = copy.deepcopy(fp)
        quantizer.quantize(q, calib)
        with torch.no_grad():
            assert torch.isfinite(q(test.input_ids)).all()
            errs[name] = (q.hidden_states(test.input_ids) - ref).pow(2).mean().item()
    assert all(lin.weight_frozen for lin in qlinears(q))
    assert errs["duquant"] < 0.7 * errs["rtn"], errs


def test_gptq_weights_run_on_transformed_inputs() -> None:
    model = make_tiny("llada")
    quantizer = build("quantizer", {"name": "duquant", "weight_method": "gptq", "rotation_steps": 4, "progress": False})
    assert quantizer.label == "W4A4-gptq" and quantizer.engine.propagate == "weights"
    report = quantizer.quantize(model, _calib())
    assert report["blocks"][0]["fallbacks"] == 0 and set(report["blocks"][0]["layers"]) == {
        "q", "k", "v", "o", "gate", "up", "down"}
    with torch.no_grad():
        assert torch.isfinite(model(IDS)).all()


def test_block_size_resolution() -> None:
    assert resolve_block_size(192, "auto") == 96 and resolve_block_size(4096, "auto") == 128
    assert resolve_block_size(18944, "auto") == 128 and resolve_block_size(3584, "auto") == 128
    assert resolve_block_size(32, 128) == 32 and resolve_block_size(384, 128) == 128


def test_bad_config_values() -> None:
    cases = [({"rotation_block_size": 1}, "rotation_block_size=1: must be auto or an integer >= 2"),
             ({"rotation_block_size": "big"}, "rotation_block_size='big'"),
             ({"weight_method": "awq"}, "weight_method 'awq' unknown; valid: rtn, gptq"),
             ({"alpha": 1.5}, "0 <= alpha <= 1"),
             ({"rotation_steps": "many"}, "rotation_steps='many': must be an integer")]
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(")) as err:
            build("quantizer", {"name": "duquant", **over})
        assert "\n" not in str(err.value)
    model = make_tiny("llada")  # widths 32 (d_model) and 64 (MLP): 24 divides neither
    fp = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="rotation_block_size=24 does not divide the width 32 of attn_in") as err:
        DuQuant(rotation_block_size=24, progress=False).quantize(model, _calib())
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fp.state_dict().values(), strict=True))


def test_registry_defaults_match_the_reference() -> None:
    q = build("quantizer", {"name": "duquant"})
    assert isinstance(q, DuQuant) and q.label == "W4A4" and q.requires_calibration
    b = q.bits
    assert (b.w_symmetric, b.a_symmetric, b.a_clip_ratio, b.w_clip_ratio) == (False, False, 0.9, 1.0)
    assert (q.alpha, q.rotation_steps, q.block_size, q.engine.propagate) == (0.6, 256, "auto", "fp")


@pytest.mark.parametrize("overrides", [("method=duquant", "experiment=none"),
                                       ("experiment=dllm_rivals", "method=duquant")])
def test_config_composes_and_builds(overrides: tuple[str, ...]) -> None:
    """conf/method/duquant.yaml picks conf/quantizer/duquant.yaml; the rivals sweep keeps W4A4 and the DuQuant grid."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    assert cfg.method.label == "DuQuant" and cfg.quantizer.name == "duquant"
    q = build("quantizer", OmegaConf.to_container(cfg.quantizer, resolve=True))
    assert isinstance(q, DuQuant) and q.label == "W4A4" and (q.bits.a_symmetric, q.bits.a_clip_ratio) == (False, 0.9)
