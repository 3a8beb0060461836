"""FlatQuant (DESIGN 4.6): the debug invariant, calibration beats RTN, per-token weights, determinism, tiny sizes,
the tap wiring table."""

from __future__ import annotations

import copy

import pytest
import torch

from fair_calib.data.calibration import CalibrationSet
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM, build_model
from fair_calib.quant.engine import Batch
from fair_calib.quant.flat_block import SCALED_TAPS, FlatBlock, FlatBlockSpec, tap_wiring, weighted_token_mse
from fair_calib.quant.flat_linear import FlatActTap, FlatLinear
from fair_calib.quant.flatquant import (
    BatchSource,
    FlatQuant,
    FlatQuantSettings,
    block_mse,
    run_flat_block,
    train_flat_block,
)
from fair_calib.quant.grids import QuantSpec
from fair_calib.quant.qlinear import NonFiniteWeightError, set_quant_enabled, wrap_block_linears
from fair_calib.registry import ConfigError, build

torch.set_num_threads(1)

W4, A4, KV4, OFF = QuantSpec(4), QuantSpec(4), QuantSpec(4, symmetric=False), QuantSpec(16)


def _model(family: str = "llada", d: int = 48, heads: int = 4, kv_heads: int | None = None, ff: int = 96,
           layers: int = 2, seed: int = 0, outliers: bool = False) -> DiffusionLM:
    torch.manual_seed(seed)
    cfg = DLLMConfig(family=family, vocab_size=64, d_model=d, n_layers=layers, n_heads=heads,
                     n_kv_heads=kv_heads or heads, intermediate_size=ff, mask_id=2, eos_id=1, pad_id=0,
                     qkv_bias=family == "dream")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, d**-0.5 if p.dim() > 1 else 0.05)
        for block in model.blocks:
            for role in ("attn_norm", "mlp_norm"):
                w = block.role(role).weight
                w.fill_(1.0)
                if outliers:  # a few massive channels, as in real LLM activations
                    w[:3] = 8.0
    return model


def _calib(n: int = 8, length: int = 16, pad: int = 3, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - pad:] = 0  # right padding on half the rows
    ids[mask == 0] = 0
    offset = torch.where(mask == 1, torch.arange(length), torch.full_like(mask, -1))
    return CalibrationSet(ids, mask, offset, ["p"] * n)


def _perturb(module: torch.nn.Module, gen: torch.Generator, std: float = 0.3) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            if name.endswith("scale"):
                p.mul_(torch.exp(noise))
            else:
                p.add_(noise)


def _spec(kv: QuantSpec = KV4, o_factors: str = "heads", **kw) -> FlatBlockSpec:
    return FlatBlockSpec(W4, A4, kv, o_factors=o_factors, **kw)


def _block_inputs(model: DiffusionLM, calib: CalibrationSet):
    with torch.no_grad():
        h = model.embed(calib.input_ids).float()
    length = calib.input_ids.shape[1]
    return h, model.rope(length), model.attention_bias(calib.attention_mask, torch.float32)


def _fp_pass(block: torch.nn.Module, h: torch.Tensor, rope, bias, valid: torch.Tensor | None = None):
    """FP block outputs, and each scaled tap's per-channel abs-max over valid tokens (what the engine collects for
    FlatBlock's scale init)."""
    stats: dict[str, torch.Tensor] = {}

    def hook(point: str):
        def fn(_m, _inp, out: torch.Tensor) -> None:
            a = out.detach().float().abs() * (1.0 if valid is None else valid.unsqueeze(-1).float())
            stats[point] = a.reshape(-1, a.shape[-1]).amax(dim=0)
        return fn

    handles = [block.taps[p].register_forward_hook(hook(p)) for p in SCALED_TAPS]
    with torch.no_grad():
        out = block(h, rope, bias)
    for handle in handles:
        handle.remove()
    return stats, out


def _batches(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, bias, size: int = 4) -> BatchSource:
    """In-memory mini-batches with FP targets, in row order (the engine's ``ctx.batches(targets=True)``)."""
    def source(shuffle: bool = False, generator: torch.Generator | None = None):
        for start in range(0, x.shape[0], size):
            rows = slice(start, start + size)
            yield Batch(rows, x[rows], None if bias is None else bias[rows], weights[rows],
                        (weights[rows] != 0).long(), y[rows])
    return source


def _n(x: torch.Tensor, size: int = 4) -> int:
    return -(-x.shape[0] // size)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- (1) the debug invariant: quantizers off -> transformed + merged model == FP model ----------------------------
@pytest.mark.parametrize(("family", "kv_heads", "o_factors"),
                         [("llada", None, "heads"), ("dream", 2, "balanced"), ("dream", 2, "heads")])
def test_invariant_random_transforms(family: str, kv_heads: int | None, o_factors: str) -> None:
    model, calib = _model(family, kv_heads=kv_heads), _calib()
    with torch.no_grad():
        ref = model(calib.input_ids, calib.attention_mask)
    gen = torch.Generator().manual_seed(1)
    h, rope, bias = _block_inputs(model, calib)
    fbs = []
    for i, block in enumerate(model.blocks):
        stats, h_next = _fp_pass(block, h, rope, bias, calib.attention_mask.bool())
        fb = FlatBlock(block, _spec(o_factors=o_factors), f"blocks.{i}", stats, generator=gen)
        for m in fb.transforms.modules():
            _perturb(m, gen)  # singular values and scales away from 1, rotations away from the random init
        fbs.append(fb)
        h = h_next
    set_quant_enabled(model, False)
    with torch.no_grad():
        live = model(calib.input_ids, calib.attention_mask)
        for fb in fbs:
            fb.finalize(freeze=False)
        merged = model(calib.input_ids, calib.attention_mask)
    # the transforms are far from the identity, yet the function is unchanged to fp32 precision
    t = fbs[0].transforms["attn_in"]
    p = torch.kron(t.left.matrix(torch.float64), t.right.matrix(torch.float64))
    assert float((p - torch.eye(p.shape[0], dtype=p.dtype)).abs().max()) > 0.3
    assert _max_rel(live, ref) < 1e-5
    assert _max_rel(merged, ref) < 1e-5  # with diag_scale folded into the RMSNorm weights (the reference's deployment)
    assert all(b.taps[p].inv_scale is None for b in model.blocks for p in ("attn_in", "mlp_in"))
    assert all(b.taps["mlp_mid"].inv_scale is not None for b in model.blocks)
    set_quant_enabled(model, True)
    with torch.no_grad():
        quant = model(calib.input_ids, calib.attention_mask)
    assert torch.isfinite(quant).all() and _max_rel(quant, ref) > 1e-3  # quantization does act when switched on


def test_invariant_after_training() -> None:
    model, calib = _model(), _calib()
    with torch.no_grad():
        ref = model(calib.input_ids, calib.attention_mask)
    settings = FlatQuantSettings(epochs=2, batch_size=4, progress=False)
    h, rope, bias = _block_inputs(model, calib)
    reports = []
    for i, block in enumerate(model.blocks):
        stats, fp_out = _fp_pass(block, h, rope, bias, calib.attention_mask.bool())
        batches = _batches(h, fp_out, calib.attention_mask.float(), bias)
        reports.append(run_flat_block(block, _spec(), settings, batches, _n(h), rope, stats, f"blocks.{i}", i,
                                      freeze=False))
        h = fp_out
    set_quant_enabled(model, False)
    with torch.no_grad():
        out = model(calib.input_ids, calib.attention_mask)
    assert all(len(r["mse_weighted_epochs"]) == 2 for r in reports)
    assert _max_rel(out, ref) < 1e-4


# ---- (2) a short calibration beats RTN on the block-output MSE ---------------------------------------------------
def test_calibration_beats_rtn_w4a4() -> None:
    model, calib = _model(d=64, ff=128, outliers=True), _calib(n=16, length=24)
    rtn_model = copy.deepcopy(model)
    h, rope, bias = _block_inputs(model, calib)
    weights = calib.attention_mask.float()
    rtn_losses, targets = [], []
    for block in model.blocks:  # FP inputs to both (FlatQuant's choice), so the RTN blocks see the same inputs
        _, out = _fp_pass(block, h, rope, bias)
        targets.append((h, out))
        h = out
    wrap_block_linears(rtn_model, W4, A4)
    for q in rtn_model.modules():
        if hasattr(q, "freeze") and hasattr(q, "w_spec"):
            q.freeze()
    for (x, y), block in zip(targets, rtn_model.blocks, strict=True):
        rtn_losses.append(block_mse(block, _batches(x, y, weights, bias)(), rope))

    fq = FlatQuant(epochs=2, batch_size=2, progress=False, seed=0)
    report = fq.quantize(model, calib, weights)
    for rep, rtn in zip(report["blocks"], rtn_losses, strict=True):
        # the outlier channels ruin RTN; the random rotation + SmoothQuant init already fixes most of it
        assert rep["mse_weighted"] < rep["mse_weighted_init"] < 0.5 * rtn, (rep, rtn)
        assert len(rep["mse_weighted_epochs"]) == 2
    # and 16 steps of training remove a further share of the error (about 20% here)
    init, final = (sum(b[k] for b in report["blocks"]) for k in ("mse_weighted_init", "mse_weighted"))
    assert final < 0.9 * init
    # the engine's error of the first block, re-evaluated by hand with the finalized (frozen) quantized weights
    x, y = targets[0]
    again = block_mse(model.blocks[0], _batches(x, y, weights, bias)(), rope)
    assert again == pytest.approx(report["blocks"][0]["mse_weighted"], rel=1e-5)
    assert all(isinstance(q, FlatLinear) and q.weight_frozen for q in model.blocks[0].linears().values())


# ---- (3) per-token weights -------------------------------------------------------------------------------------
def test_weighted_token_mse_values_and_zero_weight() -> None:
    target = torch.zeros(1, 3, 2)
    out = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]], requires_grad=True)  # ||e||^2 = 1, 4, 9
    w = torch.tensor([[1.0, 0.0, 2.0]])
    loss = weighted_token_mse(out, target, w)
    assert loss.item() == pytest.approx((1 * 1 + 0 * 4 + 2 * 9) / 3)
    loss.backward()
    assert torch.equal(out.grad[0, 1], torch.zeros(2))  # zero weight -> zero gradient at that position
    assert torch.allclose(out.grad[0, 0], torch.tensor([2 * 1.0 / 3, 0.0]))  # d/dout w_i ||e_i||^2 / sum w
    moved = out.detach().clone()
    moved[0, 1] += 100.0
    assert weighted_token_mse(moved, target, w).item() == loss.item()


def test_zero_weight_position_ignored_by_calibration() -> None:
    """Corrupting the FP target at zero-weight positions changes nothing: same merged, quantized weights."""
    model, calib = _model(layers=1), _calib()
    h, rope, bias = _block_inputs(model, calib)
    stats, fp_out = _fp_pass(model.blocks[0], h, rope, bias, calib.attention_mask.bool())
    weights = calib.attention_mask.float()
    weights[:, 5] = 0.0
    corrupted = fp_out.clone()
    corrupted[:, 5] += 10.0
    settings = FlatQuantSettings(epochs=1, batch_size=4, progress=False)
    results = []
    for tgt in (fp_out, corrupted):
        block = copy.deepcopy(model.blocks[0])
        run_flat_block(block, _spec(), settings, _batches(h, tgt, weights, bias), _n(h), rope, stats, "blocks.0", 0)
        results.append({k: v.clone() for k, v in block.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


# ---- (4) determinism: same seed -> bit-identical; uniform weights == plain FlatQuant ------------------------------
def test_same_seed_bit_identical_and_uniform_is_plain_flatquant() -> None:
    base, calib = _model(kv_heads=2, family="dream"), _calib()
    states = []
    for seed, weights in ((3, None), (3, calib.attention_mask.float()), (4, None)):
        model = copy.deepcopy(base)
        FlatQuant(epochs=1, batch_size=4, kv_bits=4, seed=seed, progress=False).quantize(model, calib, weights)
        states.append(model.state_dict())
    a, b, c = states
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # seed 3, no weights == seed 3, uniform (padding 0) weights
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed drives the random orthogonal init


# ---- (5) the Kronecker sizes of the tiny models -------------------------------------------------------------------
@pytest.mark.parametrize(("family", "ff", "mid"), [("llada", 384, (16, 24)), ("dream", 448, (16, 28))])
def test_tiny_model_sizes(family: str, ff: int, mid: tuple[int, int]) -> None:
    model = _model(family, d=192, heads=6, kv_heads=2 if family == "dream" else None, ff=ff, layers=1)
    calib = _calib(n=2, length=8, pad=2)
    with torch.no_grad():
        ref = model(calib.input_ids, calib.attention_mask)
    h, rope, bias = _block_inputs(model, calib)
    stats, _ = _fp_pass(model.blocks[0], h, rope, bias, calib.attention_mask.bool())
    fb = FlatBlock(model.blocks[0], _spec(), "blocks.0", stats, generator=torch.Generator().manual_seed(0))
    sizes = {k: (t.n1, t.n2) for k, t in fb.transforms.transforms.items()}
    assert sizes == {"attn_in": (12, 16), "mlp_in": (12, 16), "mlp_mid": mid, "attn_ctx": (6, 32), "head": (1, 32)}
    other = _model(family, d=192, heads=6, ff=ff, layers=1).blocks[0]
    balanced = FlatBlock(other, _spec(o_factors="balanced")).transforms["attn_ctx"]
    assert (balanced.n1, balanced.n2) == (12, 16)  # n_heads * head_dim = 192 when not split by heads
    fb.finalize(freeze=False)
    set_quant_enabled(model, False)
    with torch.no_grad():
        assert _max_rel(model(calib.input_ids, calib.attention_mask), ref) < 1e-4


# ---- quantizer pieces --------------------------------------------------------------------------------------------
def test_group_granularity_and_config_errors() -> None:
    model, calib = _model(layers=1), _calib(n=4)
    FlatQuant(epochs=1, w_granularity="group", group_size=16, progress=False).quantize(model, calib, None)
    assert torch.isfinite(model(calib.input_ids, calib.attention_mask)).all()
    q = build("quantizer", {"name": "flatquant", "epochs": 1, "w_bits": 4, "a_bits": 4, "kv_bits": 4})
    assert isinstance(q, FlatQuant) and q.label == "W4A4KV4" and q.requires_calibration
    with pytest.raises(ConfigError):
        FlatQuant(o_factors="diagonal")
    with pytest.raises(ConfigError):
        FlatQuant(propagate="teacher")
    with pytest.raises(ConfigError):
        FlatQuant(w_granularity="tensor")


def test_non_finite_merge_names_the_layer() -> None:
    model, calib = _model(layers=1), _calib(n=4)
    h, rope, bias = _block_inputs(model, calib)
    stats, _ = _fp_pass(model.blocks[0], h, rope, bias)
    fb = FlatBlock(model.blocks[0], _spec(), "blocks.0", stats)
    with torch.no_grad():
        fb.transforms["mlp_in"].diag_scale[0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match=r"blocks\.0\.mlp_norm"):  # the norm its scale folds into
        fb.finalize()


@pytest.mark.parametrize("propagate", ["quantized", "weights"])
def test_other_propagation_modes_run(propagate: str) -> None:
    model, calib = _model(), _calib(n=4)
    rep = FlatQuant(epochs=1, propagate=propagate, kv_bits=4, progress=False).quantize(model, calib, None)
    assert rep["propagate"] == propagate and len(rep["blocks"]) == 2
    assert torch.isfinite(model(calib.input_ids, calib.attention_mask)).all()


def test_bfloat16_model_calibrates_in_fp32_and_keeps_its_dtype() -> None:
    model, calib = _model(layers=1).to(torch.bfloat16), _calib(n=4)
    rep = FlatQuant(epochs=1, kv_bits=4, progress=False).quantize(model, calib, None)
    assert model.blocks[0].role("q").weight.dtype == torch.bfloat16
    assert model.blocks[0].taps["attn_in"].left.dtype == torch.float32  # online transforms stay fp32
    assert torch.isfinite(model(calib.input_ids, calib.attention_mask)).all() and rep["blocks"][0]["mse_weighted"] > 0


# ---- the reference's training (ruikangliu/FlatQuant train_utils.py, flat_linear.py) ------------------------------
def test_weight_decay_applied_to_every_trained_parameter() -> None:
    """AdamW's default 0.01: a parameter without gradient (the Cayley weight's upper triangle) shrinks by
    exactly (1 - lr * wd) in one step, and every trained group carries the decay."""
    model, calib = _model(layers=1), _calib(n=4)
    h, rope, bias = _block_inputs(model, calib)
    block = model.blocks[0]
    stats, fp_out = _fp_pass(block, h, rope, bias, calib.attention_mask.bool())
    s = FlatQuantSettings(epochs=1, batch_size=4, progress=False)
    assert s.weight_decay == 0.01 and s.amp == "auto"
    fb = FlatBlock(block, _spec(), "blocks.0", stats, generator=torch.Generator().manual_seed(0))
    u = fb.transforms["attn_in"].left.u.weight
    upper0 = u.detach().triu(1).clone()
    weights = calib.attention_mask.float()
    batches = _batches(h, fp_out, weights, bias)
    train_flat_block(fb, batches, 1, rope, s, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.allclose(u.detach().triu(1), upper0 * (1 - s.lr * s.weight_decay), rtol=0, atol=1e-7)
    groups = fb.parameter_groups(s.lr, s.lr * s.clip_lr_mult)
    opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)


@pytest.mark.parametrize("kv", [KV4, OFF])
def test_v_transform_folded_into_v_proj(kv: QuantSpec) -> None:
    """The per-head V transform lives in v_proj's weight and bias (reference: out_trans before the weight
    quantizer), not online after it: at full precision the folded block equals the FP block, and the deployed
    v_proj weight is (I (x) P2^T) W_v' with the V tap holding only the KV quantizer."""
    model, calib = _model("dream", kv_heads=2, layers=1), _calib()
    block = model.blocks[0]
    h, rope, bias = _block_inputs(model, calib)
    w_v = block.role("v").weight.detach().clone().double()
    b_v = block.role("v").bias.detach().clone().double()
    with torch.no_grad():
        ref = block(h, rope, bias)
    stats, _ = _fp_pass(block, h, rope, bias, calib.attention_mask.bool())
    gen = torch.Generator().manual_seed(2)
    fb = FlatBlock(block, _spec(kv=kv), "blocks.0", stats, generator=gen)
    for m in fb.transforms.modules():
        _perturb(m, gen)
    assert fb.linears["v"].fold == "attn_ctx" and all(fb.linears[r].fold is None for r in ("q", "k", "o"))
    assert not isinstance(block.taps["v_heads"], FlatActTap) or block.taps["v_heads"].op is None
    set_quant_enabled(block, False)
    with torch.no_grad():
        live = block(h, rope, bias)
        fb.finalize(freeze=False)
        merged = block(h, rope, bias)
    assert _max_rel(live, ref) < 1e-5 and _max_rel(merged, ref) < 1e-5
    t, o = fb.transforms["attn_in"], fb.transforms["attn_ctx"]
    p2 = o.right.matrix(torch.float64)
    expected_w = t.merge_weight(w_v, torch.float64)
    expected_w = (expected_w.T.reshape(-1, 2, p2.shape[0]) @ p2).reshape(expected_w.shape[1], -1).T
    assert torch.allclose(block.role("v").weight.double(), expected_w, atol=1e-5)
    assert torch.allclose(block.role("v").bias.double(), (b_v.reshape(2, -1) @ p2).reshape(-1), atol=1e-5)


def test_training_autocast_is_bf16_on_cpu() -> None:
    from fair_calib.quant.flatquant import native_bf16, training_autocast

    cpu = torch.device("cpu")
    with training_autocast(True, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with training_autocast(False, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with training_autocast("auto", cpu):
        expected = torch.bfloat16 if native_bf16(cpu) else torch.float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected
    with pytest.raises(ConfigError, match="amp"):
        FlatQuantSettings(amp="bf16")


def test_bf16_training_is_seeded_and_finite() -> None:
    """amp=true (the reference's bf16 forward) on CPU: finite, and the same seed gives the same bits."""
    results = []
    for _ in range(2):
        model, calib = _model(layers=1), _calib(n=4)
        report = FlatQuant(epochs=1, batch_size=4, kv_bits=4, amp=True, progress=False).quantize(model, calib, None)
        block = report["blocks"][0]
        assert block["train_dtype"] == "bfloat16" and block["mse_weighted"] > 0
        results.append(torch.cat([p.detach().flatten() for p in model.blocks[0].parameters()]))
    assert torch.isfinite(results[0]).all() and torch.equal(results[0], results[1])


@pytest.mark.parametrize(("kv", "o_factors"), [(KV4, "heads"), (OFF, "balanced")])
def test_one_wiring_table_for_live_and_deployed_taps(kv: QuantSpec, o_factors: str) -> None:
    """tap_wiring decides every tap: which factors run online while training and after finalize, P^-T on Q, the K/V
    quantizers; the taps it does not name stay identities."""
    from fair_calib.quant.transforms import FrozenKron, LiveOp

    model = _model("dream", kv_heads=2, layers=1)
    block = model.blocks[0]
    spec = _spec(kv=kv, o_factors=o_factors)
    heads = o_factors == "heads"
    # by hand (module docstring): (transform, left online, right online) per tap
    expected = {"attn_in": (True, True), "mlp_in": (True, True), "mlp_mid": (True, True), "attn_ctx": (True, not heads)}
    if kv.enabled:
        expected |= {"q_rope": (False, True), "k_rope": (False, True)}
    wiring = tap_wiring(spec)
    assert {p: (w.left, w.right) for p, w in wiring.items() if w.transform} == expected
    assert [p for p, w in wiring.items() if w.kv_quant] == (["v_heads", "k_rope"] if kv.enabled else [])
    fb = FlatBlock(block, spec, "blocks.0", generator=torch.Generator().manual_seed(0))
    live = {p: t.op if isinstance(t, FlatActTap) else t for p, t in block.taps.items()}
    assert {p for p, t in live.items() if isinstance(t, LiveOp)} == set(expected)
    fb.finalize()
    taps = {p: t.op if isinstance(t, FlatActTap) else t for p, t in block.taps.items()}
    frozen = {p: t for p, t in taps.items() if isinstance(t, FrozenKron)}
    assert {p: (t.left is not None, t.right is not None) for p, t in frozen.items()} == expected
    assert [p for p, t in frozen.items() if t.inv_scale is not None] == ["mlp_mid"]  # the others fold into norms
    assert all(isinstance(block.taps[p], torch.nn.Identity) for p in block.taps if p not in wiring)
    if kv.enabled:
        head = fb.transforms["head"].factor
        assert torch.equal(block.taps["q_rope"].right, head.inverse_transpose(torch.float64).float())
        assert torch.equal(block.taps["k_rope"].op.right, head.matrix(torch.float64).float())
