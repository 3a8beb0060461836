"""QLinear, block wrapping, RTN / FP quantizers, freezing, non-finite checks and KV quantizers through taps."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import VOCAB, make_tiny
from torch import nn

from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.grids import QuantSpec, fake_quant_lastdim, fake_quant_weight
from fair_calib.quant.qlinear import (
    ActQuantizer,
    NonFiniteWeightError,
    QLinear,
    check_finite,
    install_kv_quantizers,
    qlinears,
    set_quant_enabled,
    wrap_block_linears,
)
from fair_calib.quant.rtn import RTN, FullPrecision
from fair_calib.registry import build

FP16 = QuantSpec(bits=16)
W4, A4 = QuantSpec(bits=4), QuantSpec(bits=4)
IDS = torch.randint(4, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(16, 8, bias=bias)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- QLinear -----------------------------------------------------------------------------------------
def test_disabled_qlinear_equals_linear() -> None:
    lin = _linear()
    q = QLinear(lin, W4, A4, name="x")
    x = torch.randn(3, 5, 16)
    q.quant_enabled = False
    assert torch.equal(q(x), lin(x))
    q.quant_enabled = True
    assert not torch.allclose(q(x), lin(x))
    assert q.weight is lin.weight and q.bias is lin.bias  # shares the parameters, state-dict names unchanged
    assert "W4A4" in repr(q)


def test_w16a16_qlinear_is_identity() -> None:
    lin = _linear(bias=False)
    q = QLinear(lin, FP16, FP16)
    x = torch.randn(2, 16)
    assert torch.equal(q(x), lin(x))
    assert q.quantized_weight() is lin.weight


def test_qlinear_forward_formula() -> None:
    """y = Q_a(x) @ Q_w(W)^T + b with per-token activations and per-channel weights."""
    lin = _linear()
    q = QLinear(lin, QuantSpec(bits=3), QuantSpec(bits=5, clip_ratio=0.9))
    x = torch.randn(4, 16)
    xq = fake_quant_lastdim(x, QuantSpec(bits=5, clip_ratio=0.9))
    wq = fake_quant_weight(lin.weight, QuantSpec(bits=3))
    torch.testing.assert_close(q(x), xq @ wq.T + lin.bias)


def test_learnable_clipping_gets_gradients() -> None:
    q = QLinear(_linear(), W4, A4)
    q.act_clip_logit = nn.Parameter(torch.tensor(4.0))
    q.weight_clip_logit = nn.Parameter(torch.full((8, 1), 4.0))
    assert q.act_clip().item() == pytest.approx(1 / (1 + math.exp(-4.0)))  # sigmoid(4) = 0.982
    q(torch.randn(6, 16)).pow(2).sum().backward()
    assert q.act_clip_logit.grad.abs() > 0 and q.weight_clip_logit.grad.abs().sum() > 0
    assert q.weight.grad is not None  # straight-through: the weight is trainable too


def test_freeze_keeps_the_output() -> None:
    q = QLinear(_linear(), W4, A4, name="blocks.0.q")
    q.weight_clip_logit = nn.Parameter(torch.full((8, 1), 1.0))
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = q(x)
        q.freeze()
        after = q(x)
    assert torch.equal(before, after)
    assert q.weight_frozen and q.weight_clip_logit is None
    # the frozen weight is on the grid: every row has at most 16 distinct values
    assert all(row.unique().numel() <= 16 for row in q.weight)


def test_check_finite_names_the_layer() -> None:
    with pytest.raises(NonFiniteWeightError, match="layer blocks.3.down"):
        check_finite(torch.tensor([1.0, math.inf]), "blocks.3.down")
    check_finite(torch.ones(3), "fine")
    q = QLinear(_linear(), W4, A4, name="blocks.1.o")
    with torch.no_grad():
        q.weight[2, 3] = math.nan
    with pytest.raises(NonFiniteWeightError, match="non-finite values in the quantized weight of layer blocks.1.o"):
        q.freeze()


# ---- model wrapping --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_wrap_block_linears_leaves_embeddings_and_head(family: str) -> None:
    model = make_tiny(family)
    keys = set(model.state_dict())
    emb, head = model.embed_tokens, model.output_layer
    wrapped = wrap_block_linears(model, W4, A4)
    assert len(wrapped) == 7 * len(model.blocks) == 14
    assert [q.name for q in wrapped[:7]] == [f"blocks.0.{r}" for r in ("q", "k", "v", "o", "gate", "up", "down")]
    for block in model.blocks:
        assert all(isinstance(m, QLinear) for m in block.linears().values())
        assert sum(isinstance(m, QLinear) for m in block.modules()) == 7
    assert model.embed_tokens is emb and type(emb) is nn.Embedding
    assert model.output_layer is head and type(head) is nn.Linear
    assert len(qlinears(model)) == 14
    assert set(model.state_dict()) == keys  # official names survive wrapping (saved quantized models reload)
    again = wrap_block_linears(model, W4, A4)  # idempotent: no QLinear inside a QLinear
    assert [id(q) for q in again] == [id(q) for q in wrapped]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rtn_error_grows_as_bits_shrink(family: str) -> None:
    fp = make_tiny(family)
    with torch.no_grad():
        ref = fp(IDS)
    errs = {}
    for w, a in ((8, 8), (4, 4)):
        model = make_tiny(family)
        report = build("quantizer", {"name": "rtn", "w_bits": w, "a_bits": a}).quantize(model)
        assert report == {"layers": 14}
        with torch.no_grad():
            errs[w] = _rel_err(model(IDS), ref)
    # measured on these tiny random models: W8A8 ~ 0.0025, W4A4 ~ 0.045
    assert errs[8] < 0.01
    assert 5 * errs[8] < errs[4] < 0.2


def test_rtn_weights_are_on_the_grid(tiny_llada: DiffusionLM) -> None:
    original = tiny_llada.blocks[0].role("up").weight.detach().clone()
    rtn = RTN(w_bits=4, a_bits=16, w_granularity="group", group_size=16)
    assert rtn.label == "W4A16-g16" and not rtn.requires_calibration
    rtn.quantize(tiny_llada)
    q = tiny_llada.blocks[0].role("up")
    assert isinstance(q, QLinear) and q.weight_frozen
    assert torch.equal(q.weight, fake_quant_weight(original, QuantSpec(bits=4, granularity="group", group_size=16)))
    # activations stay FP at A16: the layer is the frozen weight applied to the raw input
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.weight.T)


def test_full_precision_quantizer_changes_nothing(tiny_dream: DiffusionLM) -> None:
    with torch.no_grad():
        ref = tiny_dream(IDS)
    fp = build("quantizer", {"name": "fp", "w_bits": 4})  # bit settings are ignored
    assert isinstance(fp, FullPrecision) and fp.label == "FP"
    assert fp.quantize(tiny_dream) == {}
    assert qlinears(tiny_dream) == []
    with torch.no_grad():
        assert torch.equal(tiny_dream(IDS), ref)


def test_set_quant_enabled_restores_fp(tiny_dream: DiffusionLM) -> None:
    with torch.no_grad():
        ref = tiny_dream(IDS)
    wrap_block_linears(tiny_dream, W4, A4)
    install_kv_quantizers(tiny_dream, QuantSpec(bits=4, symmetric=False))
    set_quant_enabled(tiny_dream, False)
    with torch.no_grad():
        assert torch.equal(tiny_dream(IDS), ref)
        set_quant_enabled(tiny_dream, True)
        assert _rel_err(tiny_dream(IDS), ref) > 1e-3


# ---- KV quantization ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_kv_quantizers_only_below_16_bits(family: str) -> None:
    model = make_tiny(family)
    with torch.no_grad():
        ref = model(IDS)
    assert install_kv_quantizers(model, QuantSpec(bits=16)) == 0
    assert all(isinstance(b.taps["k_rope"], nn.Identity) for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(IDS), ref)
    assert install_kv_quantizers(model, QuantSpec(bits=4, symmetric=False)) == 2
    for b in model.blocks:
        assert isinstance(b.taps["k_rope"], ActQuantizer) and isinstance(b.taps["v_heads"], ActQuantizer)
        assert isinstance(b.taps["q_rope"], nn.Identity)
    with torch.no_grad():
        err4 = _rel_err(model(IDS), ref)
    install_kv_quantizers(model, QuantSpec(bits=8, symmetric=False))
    with torch.no_grad():
        err8 = _rel_err(model(IDS), ref)
    assert 0 < err8 < err4


def test_kv_quantizer_is_per_token_per_head() -> None:
    """K (B, H_kv, L, D) is quantized with one scale per (head, token) row of head_dim values."""
    kq = ActQuantizer(QuantSpec(bits=4))
    k = torch.randn(2, 2, 5, 8)
    k[0, 1, 3] *= 100  # an outlier row must not change the other rows
    out = kq(k)
    torch.testing.assert_close(out[0, 0], fake_quant_lastdim(k[0, 0], QuantSpec(bits=4)))
    torch.testing.assert_close(out[0, 1, :3], fake_quant_lastdim(k[0, 1, :3], QuantSpec(bits=4)))
    kq.enabled = False
    assert kq(k) is k


def test_rtn_with_kv_bits_installs_taps(tiny_llada: DiffusionLM) -> None:
    RTN(w_bits=8, a_bits=8, kv_bits=4).quantize(tiny_llada)
    assert all(isinstance(b.taps["v_heads"], ActQuantizer) for b in tiny_llada.blocks)
    assert tiny_llada.blocks[0].taps["v_heads"].spec == QuantSpec(bits=4, symmetric=False)
