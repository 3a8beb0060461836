"""LLaDA / Dream module trees: shapes, logit shift, GQA, bidirectional attention, norm, RoPE, padding, names, roles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MASK_ID, PAD_ID, VOCAB, make_tiny, tiny_config
from torch import nn

from fair_calib.models.block import LINEAR_ROLES, TAP_POINTS, RMSNorm, apply_rope, rope_tables
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM, DreamModel, LLaDAModelLM, build_model


def _ids(b: int = 2, n: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (b, n), generator=g)


def _unshifted(model: DiffusionLM, ids: torch.Tensor) -> torch.Tensor:
    """The LM head applied at every position without any shift."""
    return model.output_layer(model.final_norm(model.hidden_states(ids)))


# ---- building and shapes ------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "cls"), [("llada", LLaDAModelLM), ("dream", DreamModel)])
def test_build_and_forward_shape(family: str, cls: type) -> None:
    model = make_tiny(family)
    assert type(model) is cls
    assert model.config.head_dim == 8 and model.mask_id == MASK_ID
    assert len(model.blocks) == 2
    ids = _ids(3, 7)
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (3, 7, VOCAB)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    h = model.embed(ids)
    assert h.shape == (3, 7, 32)
    cos, sin = model.rope(7)
    assert cos.shape == sin.shape == (7, 8)


def test_config_validation_and_hf_round_trip() -> None:
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        tiny_config("gpt")
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        tiny_config("dream", n_kv_heads=3)
    for family in ("llada", "dream"):
        cfg = tiny_config(family)
        back = DLLMConfig.from_hf_dict(cfg.to_hf_dict())
        assert back == cfg
        assert cfg.shift_logits == (family == "dream")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        DLLMConfig.from_hf_dict({"model_type": "gpt2"})


def test_llada_qkv_bias_uses_the_olmo_flags() -> None:
    """OLMo/LLaDA: include_qkv_bias -> biases on q/k/v only; include_bias -> on every linear (q/k/v included)."""
    cfg = tiny_config("llada", qkv_bias=True)
    hf = cfg.to_hf_dict()
    assert (hf["include_bias"], hf["include_qkv_bias"]) == (False, True)
    assert DLLMConfig.from_hf_dict(hf) == cfg
    base = tiny_config("llada").to_hf_dict()
    assert DLLMConfig.from_hf_dict({**base, "include_qkv_bias": True}).qkv_bias
    assert DLLMConfig.from_hf_dict({**base, "include_bias": True}).qkv_bias
    assert not DLLMConfig.from_hf_dict({**base, "include_qkv_bias": False}).qkv_bias
    model = build_model(cfg)
    assert model.blocks[0].q_proj.bias is not None and model.blocks[0].attn_out.bias is None


# ---- logit alignment ------------------------------------------------------------------------------
def test_dream_logits_are_shifted(tiny_dream: DiffusionLM) -> None:
    ids = _ids()
    with torch.no_grad():
        raw = _unshifted(tiny_dream, ids)
        logits = tiny_dream(ids)
    # position i is predicted from the hidden state at i - 1; position 0 duplicates position 0
    torch.testing.assert_close(logits[:, 1:], raw[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(logits[:, 0], raw[:, 0], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 1:], raw[:, 1:])


def test_llada_logits_are_not_shifted(tiny_llada: DiffusionLM) -> None:
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(tiny_llada(ids), _unshifted(tiny_llada, ids), rtol=0, atol=0)


# ---- attention ------------------------------------------------------------------------------------
def test_gqa_equals_explicitly_repeated_kv_heads() -> None:
    """A 4-query / 2-KV-head model equals the 4 / 4 model whose K and V heads are copies (0,0,1,1)."""
    gqa = make_tiny("dream", seed=3)
    full = build_model(tiny_config("dream", n_kv_heads=4)).eval()
    rep, hd = 2, gqa.config.head_dim
    src = gqa.state_dict()
    dst = {}
    for k, v in src.items():
        if ".k_proj." in k or ".v_proj." in k:
            # rows are grouped per KV head: (kv * hd, ...) -> (kv, hd, ...) -> repeat each head `rep` times
            v = v.view(gqa.config.n_kv_heads, hd, *v.shape[1:]).repeat_interleave(rep, dim=0)
            v = v.reshape(gqa.config.n_heads * hd, *v.shape[2:])
        dst[k] = v
    full.load_state_dict(dst)
    assert full.blocks[0].role("k").weight.shape == (32, 32)
    assert gqa.blocks[0].role("k").weight.shape == (16, 32)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(full(ids), gqa(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_attention_is_bidirectional(family: str) -> None:
    model = make_tiny(family)
    ids = _ids(1, 10)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1 - 4) % (VOCAB - 4) + 4
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # an earlier position sees a later token (a causal model would give identical logits at 1..7)
    assert (a[0, 2] - b[0, 2]).abs().max() > 1e-4


def test_block_matches_hand_written_attention(tiny_dream: DiffusionLM) -> None:
    """One Dream block against softmax(Q K^T / sqrt(d)) V written out with explicit GQA, RoPE and SwiGLU."""
    blk = tiny_dream.blocks[0]
    x = torch.randn(1, 6, 32)
    cos, sin = tiny_dream.rope(6)
    with torch.no_grad():
        out = blk(x, (cos, sin))
        h = blk.role("attn_norm")(x)
        q = blk.role("q")(h).view(1, 6, 4, 8).transpose(1, 2)
        k = blk.role("k")(h).view(1, 6, 2, 8).transpose(1, 2)
        v = blk.role("v")(h).view(1, 6, 2, 8).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ctx = torch.zeros(1, 4, 6, 8)
        for head in range(4):
            kv = head // 2  # query heads 0,1 share KV head 0; 2,3 share KV head 1
            att = torch.softmax(q[0, head] @ k[0, kv].T / math.sqrt(8), dim=-1)
            ctx[0, head] = att @ v[0, kv]
        x1 = x + blk.role("o")(ctx.transpose(1, 2).reshape(1, 6, 32))
        h2 = blk.role("mlp_norm")(x1)
        ref = x1 + blk.role("down")(F.silu(blk.role("gate")(h2)) * blk.role("up")(h2))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- norm and rotary --------------------------------------------------------------------------------
def test_rmsnorm_hand_formula() -> None:
    norm = RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mean(x^2) = (1 + 4 + 9 + 16) / 4 = 7.5
    r = 1.0 / math.sqrt(7.5 + 1e-5)
    expected = torch.tensor([[1 * r * 1.0, 2 * r * 0.5, 3 * r * 2.0, 4 * r * 1.0]])
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-7)
    # bf16 input: computed in fp32, returned in bf16
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_tables_and_rotation_hand_values() -> None:
    cos, sin = rope_tables(3, 4, theta=10000.0)
    # inv_freq = theta^(-2j/d) = [1, 1e-2] for d = 4; angles at position p: [p, p/100, p, p/100]
    ang = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.01, 1.0, 0.01], [2.0, 0.02, 2.0, 0.02]], dtype=torch.float64)
    torch.testing.assert_close(cos, ang.cos().float())
    torch.testing.assert_close(sin, ang.sin().float())
    # rotate-half pairs (x0, x2) and (x1, x3): e0 at position 1 -> (cos 1, 0, sin 1, 0)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(1, 1, 3, 4)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[0, 0, 1], torch.tensor([math.cos(1.0), 0.0, math.sin(1.0), 0.0]))
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # e1 at position 2 rotates by 0.02 into e3
    x = torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(1, 1, 3, 4)
    torch.testing.assert_close(apply_rope(x, cos, sin)[0, 0, 2], torch.tensor([0.0, math.cos(0.02), 0.0,
                                                                               math.sin(0.02)]))


def test_rope_scores_depend_on_relative_position_only() -> None:
    cos, sin = rope_tables(12, 8, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rope(q.expand(1, 1, 12, 8), cos, sin)[0, 0, i]
        kj = apply_rope(k.expand(1, 1, 12, 8), cos, sin)[0, 0, j]
        return qi @ kj

    torch.testing.assert_close(score(5, 2), score(9, 6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(3, 3), q @ k, rtol=1e-5, atol=1e-5)


# ---- padding ----------------------------------------------------------------------------------------
def test_attention_bias_values() -> None:
    bias = DiffusionLM.attention_bias(torch.tensor([[0, 1, 1]]), torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    assert bias[0, 0, 0, 0] == torch.finfo(torch.float32).min and bias[0, 0, 0, 1:].eq(0).all()
    assert DiffusionLM.attention_bias(None, torch.float32) is None


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_left_padding_with_mask_matches_unpadded(family: str) -> None:
    model = make_tiny(family)
    short = _ids(1, 6, seed=5)
    other = _ids(1, 9, seed=6)
    ids = torch.cat([torch.cat([torch.full((1, 3), PAD_ID), short], 1), other])
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    with torch.no_grad():
        batched = model(ids, mask)
        alone = model(short)
        other_alone = model(other)
    # Dream's shift makes the first real position copy the (masked) pad position before it
    first = 4 if family == "dream" else 3
    torch.testing.assert_close(batched[0, first:], alone[0, first - 3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched[1], other_alone[0], rtol=1e-5, atol=1e-5)


# ---- official names and roles -----------------------------------------------------------------------
def test_llada_state_dict_uses_official_names(tiny_llada: DiffusionLM) -> None:
    keys = set(tiny_llada.state_dict())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    for name in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
        expected |= {f"model.transformer.blocks.{i}.{name}.weight" for i in range(2)}
    assert keys == expected


def test_dream_state_dict_uses_official_names(tiny_dream: DiffusionLM) -> None:
    keys = set(tiny_dream.state_dict())
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        expected |= {f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"}
        expected |= {f"{p}.self_attn.{n}_proj.bias" for n in "qkv"}
        expected |= {f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    assert keys == expected
    assert tiny_dream.state_dict()["model.layers.0.self_attn.k_proj.bias"].shape == (16,)


def test_role_addressing() -> None:
    llada, dream = make_tiny("llada"), make_tiny("dream")
    lb, db = llada.blocks[1], dream.blocks[1]
    assert lb.role("o") is lb.attn_out and db.role("o") is db.self_attn.o_proj
    assert lb.role("gate") is lb.ff_proj and lb.role("down") is lb.ff_out and lb.role("mlp_norm") is lb.ff_norm
    assert db.role("up") is db.mlp.up_proj and db.role("attn_norm") is db.input_layernorm
    assert tuple(lb.linears()) == LINEAR_ROLES == tuple(db.linears())
    assert all(isinstance(m, nn.Linear) for m in db.linears().values())
    assert llada.output_layer is llada.model.transformer["ff_out"] and dream.output_layer is dream.lm_head
    assert llada.embed_tokens is llada.model.transformer["wte"] and dream.final_norm is dream.model.norm


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_set_role_replaces_the_module(family: str) -> None:
    model = make_tiny(family)
    ids = _ids()
    with torch.no_grad():
        before = model(ids)
        blk = model.blocks[0]
        zero = nn.Linear(32, 32, bias=False)
        nn.init.zeros_(zero.weight)
        blk.set_role("o", zero)
        assert blk.role("o") is zero
        name = "attn_out" if family == "llada" else "self_attn.o_proj"
        assert model.blocks[0].get_submodule(name) is zero
        after = model(ids)
    assert not torch.allclose(before, after)
    # with o = 0 the attention branch contributes nothing: block 0 output = x + MLP(x)
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        out = blk(x, model.rope(4))
        h = blk.role("mlp_norm")(x)
        ref = x + blk.role("down")(F.silu(blk.role("gate")(h)) * blk.role("up")(h))
    torch.testing.assert_close(out, ref)


def test_taps_see_the_documented_shapes(tiny_dream: DiffusionLM) -> None:
    seen: dict[str, tuple[int, ...]] = {}

    class Recorder(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.tap = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[self.tap] = tuple(x.shape)
            return x

    blk = tiny_dream.blocks[0]
    for p in TAP_POINTS:
        blk.taps[p] = Recorder(p)
    with torch.no_grad():
        tiny_dream(_ids(2, 5))
    assert seen == {"attn_in": (2, 5, 32), "q_rope": (2, 4, 5, 8), "k_rope": (2, 2, 5, 8), "v_heads": (2, 2, 5, 8),
                    "attn_ctx": (2, 5, 32), "mlp_in": (2, 5, 32), "mlp_mid": (2, 5, 64)}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_input_tap_is_what_each_linear_reads(family: str) -> None:
    """INPUT_TAP / NORM_BEFORE (the one written copy of the block's wiring) against the forward pass itself:
    every linear's input is the very tensor its tap returned, and each norm-preceded tap reads that norm's output."""
    from fair_calib.models.block import INPUT_TAP, NORM_BEFORE, tap_readers

    model = make_tiny(family)
    blk = model.blocks[0]
    tap_out: dict[str, torch.Tensor] = {}
    tap_in: dict[str, torch.Tensor] = {}
    lin_in: dict[str, torch.Tensor] = {}
    norm_out: dict[str, torch.Tensor] = {}
    def record(store: dict, key: str, inputs: dict | None = None):
        def hook(_m, args, out=None):
            store[key] = args[0] if out is None else out
            if inputs is not None:
                inputs[key] = args[0]
        return hook

    hooks = [blk.taps[t].register_forward_hook(record(tap_out, t, tap_in)) for t in TAP_POINTS]
    hooks += [blk.role(r).register_forward_pre_hook(record(lin_in, r)) for r in LINEAR_ROLES]
    hooks += [blk.role(n).register_forward_hook(record(norm_out, n)) for n in NORM_BEFORE.values()]
    with torch.no_grad():
        model(_ids(2, 6))
    for h in hooks:
        h.remove()
    assert set(INPUT_TAP) == set(LINEAR_ROLES)
    for role, tap in INPUT_TAP.items():
        assert lin_in[role] is tap_out[tap], (role, tap)
    for tap, norm in NORM_BEFORE.items():
        assert tap_in[tap] is norm_out[norm], (tap, norm)
    assert tap_readers("attn_in") == ("q", "k", "v") and tap_readers("mlp_mid") == ("down",)
