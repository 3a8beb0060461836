"""The layer-wise engine: capture, collectors, per-block errors, propagation modes, block moves, offload."""

from __future__ import annotations

import copy

import pytest
import torch

from fair_calib.data.calibration import CalibrationSet, tinyreason_calibration
from fair_calib.quant import engine as engine_mod
from fair_calib.quant.engine import ErrorMeter, LayerwiseMethod, freeze_linears, weight_only
from fair_calib.registry import ConfigError, build


class Probe(LayerwiseMethod):
    """Records what the engine hands to a method; RTN-freezes the block (or leaves it FP)."""

    name = "probe"

    def __init__(self, rtn: bool = True, **kwargs) -> None:
        super().__init__(progress=False, **kwargs)
        self.rtn, self.inputs, self.collected, self.weights_seen = rtn, [], [], []

    def collect(self, block, ctx):
        stats = []
        self.collected.append(stats)
        return {"q": lambda x, w: stats.append((x.clone(), w.clone()))}

    def quantize_block(self, block, ctx):
        self.inputs.append(ctx.inputs.data.clone())
        self.weights_seen.append(ctx.token_weights.clone())
        if self.rtn:
            freeze_linears(block)
        return {"probe": ctx.index}


def _calib(tok, n=4) -> CalibrationSet:
    cs = tinyreason_calibration(tok, n_samples=n, tasks=["addition"])
    cs.attention_mask[1, -2:] = 0  # some real padding, to see weight 0 at work
    return cs


def _fp_block0(model, calib):
    with torch.no_grad():
        h = model.embed(calib.input_ids)
        bias = model.attention_bias(calib.attention_mask, h.dtype)
        return model.blocks[0](h, model.rope(h.shape[1]), bias)


def test_error_meter_by_hand():
    y = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    ref = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    m = ErrorMeter()
    m.add(y, ref, torch.tensor([[2.0, 0.0]]), torch.tensor([[1, 1]]))
    r = m.result()
    # per-token mean squared errors: (1 + 4) / 2 = 2.5 and (4 + 9) / 2 = 6.5
    assert r["mse"] == pytest.approx((2.5 + 6.5) / 2)
    assert r["mse_weighted"] == pytest.approx(2.5)  # the second token has weight 0
    m2 = ErrorMeter()
    m2.add(y, ref + 1, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]))
    # errors vs ref+1: token0 (0, 1) -> 0.5; token1 (1, 2) -> 2.5; ref energy 1 and 4
    assert m2.result()["mse"] == pytest.approx(0.5)
    assert m2.result()["mse_weighted"] == pytest.approx(1.5)
    assert m2.result()["rel_weighted"] == pytest.approx((0.5 + 2.5) / (1 + 4))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_fp_propagation_feeds_fp_hidden_states(family, char_tokenizer):
    from conftest import make_tiny

    model = make_tiny(family)
    fp = copy.deepcopy(model)
    calib = _calib(char_tokenizer)
    probe = Probe(propagate="fp", w_bits=4, a_bits=4, batch_size=3)
    report = probe.quantize(model, calib)
    assert [b["block"] for b in report["blocks"]] == [0, 1] and report["propagate"] == "fp"
    assert all(b["mse_weighted"] > 0 and b["rel_weighted"] > 0 and b["probe"] == b["block"] for b in report["blocks"])
    torch.testing.assert_close(probe.inputs[0], fp.embed(calib.input_ids).detach())
    torch.testing.assert_close(probe.inputs[1], _fp_block0(fp, calib), rtol=1e-5, atol=1e-6)
    # default token weights: 1 on real tokens, 0 on padding
    assert torch.equal(probe.weights_seen[0], calib.attention_mask.float())
    # collectors saw the normed input of q for every batch (3 + 1 rows) with the batch's weights
    xs, ws = zip(*probe.collected[0])
    assert [x.shape[0] for x in xs] == [3, 1]
    normed = fp.blocks[0].role("attn_norm")(fp.embed(calib.input_ids)).detach()
    torch.testing.assert_close(torch.cat(xs), normed)
    assert torch.equal(torch.cat(ws), calib.attention_mask.float())


@pytest.mark.parametrize("mode", ["quantized", "weights"])
def test_quantized_propagation_feeds_quantized_outputs(mode, tiny_llada, char_tokenizer):
    fp = copy.deepcopy(tiny_llada)
    calib = _calib(char_tokenizer)
    probe = Probe(propagate=mode, w_bits=4, a_bits=4)
    probe.quantize(tiny_llada, calib)
    with torch.no_grad():
        if mode == "weights":
            with weight_only(tiny_llada.blocks[0]):
                expect = _fp_block0(tiny_llada, calib)
        else:
            expect = _fp_block0(tiny_llada, calib)
    torch.testing.assert_close(probe.inputs[1], expect, rtol=1e-5, atol=1e-6)
    fp_h1 = _fp_block0(fp, calib)
    assert (probe.inputs[1] - fp_h1).pow(2).mean() > 1e-6  # the quantization error is propagated
    if mode == "weights":  # weight-only outputs differ from fully quantized ones at A4
        assert (probe.inputs[1] - _fp_block0(tiny_llada, calib)).abs().max() > 1e-5


def test_full_precision_method_has_zero_error_and_fp_stream(tiny_dream, char_tokenizer):
    calib = _calib(char_tokenizer)
    ref = tiny_dream(calib.input_ids, calib.attention_mask).detach()
    report = Probe(rtn=False, w_bits=16, a_bits=16, track_fp_stream=True).quantize(tiny_dream, calib)
    for b in report["blocks"]:
        assert b["mse"] == 0.0 and b["mse_weighted"] == 0.0 and b["vs_fp_mse"] == 0.0
    torch.testing.assert_close(tiny_dream(calib.input_ids, calib.attention_mask), ref)


def test_fp_stream_tracks_accumulated_error(tiny_llada, char_tokenizer):
    calib = _calib(char_tokenizer)
    report = Probe(propagate="quantized", w_bits=3, a_bits=4, track_fp_stream=True).quantize(tiny_llada, calib)
    b0, b1 = report["blocks"]
    assert b0["vs_fp_mse_weighted"] == pytest.approx(b0["mse_weighted"], rel=1e-6)  # same inputs at block 0
    assert b1["vs_fp_mse_weighted"] > b1["mse_weighted"]  # block 1's inputs already carry block 0's error


def test_token_weights_reach_the_error(tiny_llada, char_tokenizer):
    calib = _calib(char_tokenizer)
    w = torch.zeros(calib.attention_mask.shape)
    w[0, 3] = 1.0
    probe = Probe(w_bits=4, a_bits=4)
    report = probe.quantize(copy.deepcopy(tiny_llada), calib, token_weights=w)
    assert torch.equal(probe.weights_seen[0], w)
    assert report["token_weight_sum"] == 1.0
    uniform = Probe(w_bits=4, a_bits=4).quantize(copy.deepcopy(tiny_llada), calib)
    assert report["blocks"][0]["mse"] == pytest.approx(uniform["blocks"][0]["mse"], rel=1e-6)
    assert report["blocks"][0]["mse_weighted"] != pytest.approx(uniform["blocks"][0]["mse_weighted"], rel=1e-3)
    with pytest.raises(ValueError, match="shape"):
        Probe().quantize(copy.deepcopy(tiny_llada), calib, token_weights=w[:, :3])
    with pytest.raises(ValueError, match="all zero"):
        Probe().quantize(copy.deepcopy(tiny_llada), calib, token_weights=torch.zeros_like(w))
    with pytest.raises(ConfigError, match="calibration data"):
        Probe().quantize(tiny_llada, None)


def test_one_block_at_a_time_on_the_device(tiny_llada, char_tokenizer, monkeypatch):
    moves = []
    real = engine_mod.move_block

    def record(block, device):
        moves.append((list(tiny_llada.blocks).index(block), str(device)))
        real(block, device)

    monkeypatch.setattr(engine_mod, "move_block", record)
    Probe(device="cpu").quantize(tiny_llada, _calib(char_tokenizer))
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]  # to the device, back home, next block


def test_disk_offload_and_batch_size_give_the_same_result(tiny_llada, char_tokenizer, tmp_path):
    calib = _calib(char_tokenizer)
    a, b = copy.deepcopy(tiny_llada), copy.deepcopy(tiny_llada)
    ra = Probe(batch_size=4).quantize(a, calib)
    rb = Probe(batch_size=1, offload="disk", offload_dir=str(tmp_path)).quantize(b, calib)
    assert list(tmp_path.iterdir()) == []  # temporary activation files are removed
    for x, y in zip(ra["blocks"], rb["blocks"]):
        assert x["mse_weighted"] == pytest.approx(y["mse_weighted"], rel=1e-5)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)


def test_engine_settings_are_validated():
    for kwargs, key in [({"propagate": "sideways"}, "propagate"), ({"offload": "tape"}, "offload"),
                        ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(ConfigError, match=key):
            Probe(**kwargs)


def _count_block_forwards(model) -> list[int]:
    """A counting forward hook on every block: calls[l] = forwards of block l (one per pass when one batch)."""
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("settings, passes", [
    # weight-only: the quantized pass is the weight-only pass, so it feeds the next block: FP + quantized
    (dict(a_bits=16, propagate="weights"), [2, 2]),
    (dict(a_bits=16, propagate="quantized"), [2, 2]),
    # A4: the next block needs the weight-only outputs, a third pass, except after the last block
    (dict(a_bits=4, propagate="weights"), [3, 2]),
    (dict(a_bits=16, kv_bits=4, propagate="weights"), [3, 2]),  # K/V quantizers make it a different function
    (dict(a_bits=4, propagate="quantized"), [2, 2]),
    (dict(a_bits=4, propagate="fp"), [2, 2]),
    (dict(a_bits=16, propagate="weights", track_fp_stream=True), [3, 3]),  # + the true FP stream
    # + o, gate/up, down inputs: those passes stop at their linear's input, so they never complete a block forward
    (dict(a_bits=16, propagate="weights", true_sequential=True), [2, 2]),
    # without the error report the FP pass stops at down's input, and nothing reads the last block's outputs
    (dict(a_bits=16, propagate="weights", block_error=False), [1, 0]),
    (dict(a_bits=4, propagate="weights", block_error=False), [1, 0]),  # only the weight-only pass feeds block 1
])
def test_forward_passes_per_block(settings, passes, tiny_llada, char_tokenizer):
    from fair_calib.quant.gptq import GPTQ

    calib = _calib(char_tokenizer)
    calls = _count_block_forwards(tiny_llada)
    GPTQ(batch_size=len(calib.input_ids), progress=False, **settings).quantize(tiny_llada, calib)
    assert calls == passes


@pytest.mark.parametrize("settings, calls", [
    (dict(), dict(q=2, k=2, v=2, o=2, gate=2, up=2, down=2)),  # FP pass + quantized pass
    (dict(block_error=False), dict(q=2, k=2, v=2, o=2, gate=2, up=2, down=1)),  # no FP down projection
    # FP pass, then the o / gate-up / down groups' passes up to their linear's input, then the quantized pass
    (dict(true_sequential=True), dict(q=5, k=5, v=5, o=4, gate=3, up=3, down=2)),
])
def test_no_linear_runs_for_an_output_nobody_reads(settings, calls, tiny_llada, char_tokenizer, monkeypatch):
    """Forwards that only feed collectors stop at the last collected linear's input: the linear calls per role."""
    from fair_calib.quant.gptq import GPTQ

    calib = _calib(char_tokenizer)
    counts = dict.fromkeys(calls, 0)
    move = engine_mod.move_block

    def move_and_count(block, device):  # block 0's linears are QLinears by the time it is moved in
        if block is tiny_llada.blocks[0] and not any(counts.values()) and not hasattr(block, "_counted"):
            block._counted = True
            for role in calls:
                block.role(role).register_forward_hook(lambda m, a, o, r=role: counts.__setitem__(r, counts[r] + 1))
        move(block, device)

    monkeypatch.setattr(engine_mod, "move_block", move_and_count)
    GPTQ(batch_size=len(calib.input_ids), progress=False, w_bits=4, a_bits=16, **settings).quantize(tiny_llada, calib)
    assert counts == calls


def test_without_block_error_the_weights_are_the_same_and_no_targets_are_kept(tiny_dream, char_tokenizer):
    """block_error=false changes no weight (GPTQ reads no FP outputs) and drops the error keys from the report;
    FlatQuant, which trains on the FP outputs, keeps them and reports its errors anyway."""
    from fair_calib.quant.gptq import GPTQ

    calib = _calib(char_tokenizer)
    models, reports = [], []
    for block_error in (True, False):
        model = copy.deepcopy(tiny_dream)
        reports.append(GPTQ(w_bits=4, a_bits=16, batch_size=2, progress=False, block_error=block_error)
                       .quantize(model, calib))
        models.append(model)
    for (n, p), (_, q) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(p, q), n
    assert "mse_weighted" in reports[0]["blocks"][0] and reports[0]["mean_mse_weighted"] > 0
    assert "mse_weighted" not in reports[1]["blocks"][0] and reports[1]["mean_mse_weighted"] is None
    flat = build("quantizer", {"name": "flatquant", "epochs": 1, "w_bits": 4, "a_bits": 16, "block_error": False,
                               "progress": False}).quantize(copy.deepcopy(tiny_dream), calib)
    assert flat["blocks"][0]["mse_weighted"] > 0


@pytest.mark.parametrize("a_bits", [16, 4])
def test_weights_propagation_is_bit_identical_to_a_weight_only_pass(a_bits, tiny_dream, char_tokenizer):
    """Block 1's inputs are exactly block 0's weight-only forward (whichever pass computed them), and at A16
    propagate=weights gives the same bits as propagate=quantized (the weights and every block's inputs)."""
    calib = _calib(char_tokenizer)
    runs = {}
    for mode in ("weights", "quantized"):
        model = copy.deepcopy(tiny_dream)
        probe = Probe(propagate=mode, w_bits=4, a_bits=a_bits, batch_size=len(calib.input_ids))
        probe.quantize(model, calib)
        runs[mode] = (model, probe)
    model, probe = runs["weights"]
    with torch.no_grad(), weight_only(model.blocks[0]):
        bias = model.attention_bias(calib.attention_mask, probe.inputs[0].dtype)
        expect = model.blocks[0](probe.inputs[0], model.rope(probe.inputs[0].shape[1]), bias)
    assert torch.equal(probe.inputs[1], expect)
    same = torch.equal(runs["quantized"][1].inputs[1], probe.inputs[1])
    assert same == (a_bits == 16)
    if a_bits == 16:
        for (n, p), (_, q) in zip(model.state_dict().items(), runs["quantized"][0].state_dict().items()):
            assert torch.equal(p, q), n


def test_weight_only_is_identity_follows_the_bit_settings(tiny_llada):
    from fair_calib.quant.engine import weight_only_is_identity
    from fair_calib.quant.grids import QuantSpec
    from fair_calib.quant.qlinear import install_kv_quantizers, wrap_block_linears

    block = tiny_llada.blocks[0]
    assert weight_only_is_identity(block)  # plain linears quantize nothing
    wrap_block_linears(tiny_llada, QuantSpec(bits=4), QuantSpec(bits=16))
    assert weight_only_is_identity(block)
    install_kv_quantizers(tiny_llada, QuantSpec(bits=4, symmetric=False))
    assert not weight_only_is_identity(block)
    from conftest import make_tiny

    model = make_tiny("llada")
    wrap_block_linears(model, QuantSpec(bits=4), QuantSpec(bits=8))  # A8, no K/V quantizers
    assert not weight_only_is_identity(model.blocks[1])
    with weight_only(model.blocks[1]):
        assert weight_only_is_identity(model.blocks[1])


@pytest.mark.parametrize("name", ["gptq", "awq", "smoothquant", "quarot", "flatquant", "duquant"])
def test_every_layerwise_method_refuses_a_group_size_that_does_not_divide(tiny_llada, name):
    """One check (LayerwiseMethod.setup) for every method, before any weight changes."""
    from fair_calib.registry import build

    quantizer = build("quantizer", {"name": name, "w_granularity": "group", "group_size": 40, "progress": False})
    model = copy.deepcopy(tiny_llada)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"quantizer={name}: group_size=40 does not divide the input sizes"):
        quantizer.quantize(model, _calib(model.tokenizer), None)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
