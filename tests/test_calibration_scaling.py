"""The fitting, FLOP, projection and memory helpers of experiments/perf/calibration_scaling.py on hand-made numbers
(no timing, no calibration runs)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import build_model

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "perf" / "calibration_scaling.py"
sys.path.insert(0, str(SCRIPT.parent))  # as when the script runs: its sibling helper (procmem) imports
_spec = importlib.util.spec_from_file_location("calibration_scaling", SCRIPT)
cs = importlib.util.module_from_spec(_spec)
sys.modules["calibration_scaling"] = cs  # dataclasses look their module up there
_spec.loader.exec_module(cs)

# d_model 4, 2 heads (head_dim 2), no GQA, MLP 8: linears q, k, v, o 4x4, gate, up 8x4, down 4x8
TINY = cs.BlockShape(d_model=4, n_heads=2, n_kv_heads=2, intermediate=8)


def test_power_law_fit_recovers_a_known_power_law() -> None:
    x = [256, 512, 768, 1024]
    a, b, r2 = cs.power_law_fit(x, [3.0 * v ** 2.5 for v in x])
    assert a == pytest.approx(3.0, rel=1e-9)
    assert b == pytest.approx(2.5, rel=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_power_law_fit_r2_by_hand() -> None:
    # log x = 0, 1, 2; log y = 0, 1, 3: slope 3 / 2, intercept 4/3 - 3/2 = -1/6,
    # residuals 1/6, -1/3, 1/6 -> SS_res = 1/6; SS_tot = 16/9 + 1/9 + 25/9 = 14/3; R^2 = 1 - 1/28
    a, b, r2 = cs.power_law_fit([1.0, math.e, math.e ** 2], [1.0, math.e, math.e ** 3])
    assert b == pytest.approx(1.5)
    assert a == pytest.approx(math.exp(-1 / 6))
    assert r2 == pytest.approx(27 / 28)


@pytest.mark.parametrize(("x", "y"), [([512, 512], [1.0, 2.0]), ([256, 512], [1.0, 0.0])])
def test_power_law_fit_refuses_what_it_cannot_fit(x: list[float], y: list[float]) -> None:
    with pytest.raises(ValueError):
        cs.power_law_fit(x, y)


def test_block_shape_counts_the_parameters_of_a_real_llada_block() -> None:
    cfg = DLLMConfig(family="llada", vocab_size=16, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2,
                     intermediate_size=24, mask_id=2, eos_id=1, pad_id=0)
    block = build_model(cfg).blocks[0]
    shape = cs.BlockShape(d_model=8, n_heads=2, n_kv_heads=2, intermediate=24)
    assert shape.params == sum(p.numel() for p in block.parameters())
    # LLaDA-8B: 4 x 4096^2 + 3 x 4096 x 12288 + 2 x 4096
    assert cs.LLADA_8B.params == 218_112_000


def test_flops_by_hand() -> None:
    # linears 4 x 16 + 3 x 32 = 160 weights; attention 4 L d = 4 * 3 * 4 = 48 per token; 6 tokens
    fwd = 6 * (2 * 160 + 48)
    assert cs.forward_flops(TINY, n_samples=2, seq_len=3) == fwd == 2208
    # Hessians 2 T (4^2 + 4^2 + 4^2 + 8^2) = 12 * 112; solve sum r c^2 = 4 * 64 + 2 * 128 + 256 = 768, + 3 * 64 + 512
    hessians, solve = 12 * 112, 768 + 704
    assert cs.calibration_flops("gptq", TINY, 2, 3) == 3 * fwd + hessians + solve == 9440
    assert cs.calibration_flops("quarot", TINY, 2, 3) == 6 * fwd + hessians + solve
    assert cs.calibration_flops("flatquant", TINY, 2, 3, epochs=2) == 9 * fwd
    # LLaDA-8B, one token of one-token sequences: 2 x 218,103,808 linear weights + 4 x 4096
    assert cs.forward_flops(cs.LLADA_8B, 1, 1) == 436_224_000
    with pytest.raises(ValueError):
        cs.calibration_flops("rtn", TINY, 2, 3)


def test_project_time_by_hand() -> None:
    gpu = cs.GPUAssumption(peak_tflops=1e-10, utilisation=0.5)  # 50 FLOP/s sustained
    assert gpu.sustained_flops == pytest.approx(50.0)
    # fit s/block = 1 x width^1 -> 4 s at width 4, measured at 2 x 3 tokens (9440 FLOP); the paper size 4 x 3 costs
    # 3 x 4416 + 2 x 12 x 112 + 1472 = 17408 FLOP; this CPU ran 100 FLOP/s
    t = cs.project_time("gptq", (1.0, 1.0), 100.0, (2, 3, 1), (4, 3, 1), gpu, target=TINY, n_layers=2)
    cpu_block = 4.0 * 17408 / 9440
    assert t["flops_block"] == 17408
    assert t["cpu_fit_block_s"] == pytest.approx(cpu_block)
    assert t["gpu_fit_block_s"] == pytest.approx(cpu_block * 100 / 50)
    assert t["gpu_flop_block_s"] == pytest.approx(17408 / 50)
    assert t["gpu_fit_total_s"] == pytest.approx(2 * cpu_block * 2)
    assert t["gpu_flop_total_s"] == pytest.approx(2 * 17408 / 50)
    # FlatQuant: 1 epoch measured, 15 projected -> (3 + 45) / (3 + 3) of the fitted time at the same size
    flat = cs.project_time("flatquant", (1.0, 1.0), 100.0, (2, 3, 1), (2, 3, 15), gpu, target=TINY)
    assert flat["cpu_fit_block_s"] == pytest.approx(4.0 * 48 / 6)


def test_project_memory_of_llada_8b_by_hand() -> None:
    acts = 2 * 128 * 2048 * 4096 * 2  # two bf16 stores: 4 GiB
    weights = 218_112_000 * 2
    gptq = cs.project_memory("gptq", 128, 2048)
    assert gptq["block_weights"] == weights
    assert gptq["calib_activations"] == acts == 4 * 2**30
    assert gptq["hessians"] == 4 * (3 * 4096 ** 2 + 12288 ** 2) == 805_306_368
    assert gptq["solve_workspace"] == 4 * (4096 * 12288 + 12288 ** 2)  # down_proj: W and H^-1 in fp32
    assert gptq["total"] == weights + acts + 2 * 805_306_368
    assert gptq["gpu_with_offload_cpu"] == gptq["total"] - acts
    assert cs.project_memory("quarot", 128, 2048)["hessians"] == 4 * 12288 ** 2  # one group at a time
    saved = cs.SavedBytes(per_token_width=1.0, per_score=0.5, per_param=2.0)
    flat = cs.project_memory("flatquant", 128, 2048, batch_size=4, flat_trainable=100, saved=saved)
    assert flat["fp32_block"] == 4 * 218_112_000
    assert flat["transforms_and_adamw"] == 1600
    assert flat["autograd_activations"] == 4 * 2048 * 4096
    assert flat["autograd_scores"] == 0.5 * 4 * 32 * 2048 ** 2
    assert flat["autograd_weights"] == 2 * 218_112_000
    assert flat["total"] == weights + acts + 4 * 218_112_000 + 1600 + 4 * 2048 * 4096 + 2 * 32 * 2048 ** 2 \
        + 2 * 218_112_000


def test_flatquant_trainable_parameters_of_llada_8b() -> None:
    # transforms: attn_in and mlp_in 4096 = 64 x 64 (U, V 64^2 each + sigma 64, per factor) + scale 4096 = 20608 each;
    # mlp_mid 12288 = 96 x 128: 2 x 96^2 + 96 + 2 x 128^2 + 128 + scale 12288 = 63712; attn_ctx heads x head_dim
    # 32 x 128, no scale: 2 x 32^2 + 32 + 2 x 128^2 + 128 = 34976. Clipping: 2 per output channel of every linear
    # (4 x 4096 + 2 x 12288 + 4096 = 45056) + 2 scalars per activation quantizer (7 linears)
    transforms = 2 * 20608 + 63712 + 34976
    clipping = 2 * 45056 + 2 * 7
    assert cs.flatquant_trainable(cs.LLADA_8B) == transforms + clipping == 230_030


def test_saved_tensor_meter_peak_by_kind() -> None:
    meter = cs._SavedTensorMeter({2}, seq_len=3)
    leaves = [torch.randn(2, 3, 3, requires_grad=True), torch.randn(2, 3, 4, requires_grad=True),
              torch.randn(5, 5, requires_grad=True), torch.nn.Parameter(torch.randn(2, 3, 4))]
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        mids = [t * 2.0 for t in leaves[:3]]  # a product with a scalar saves no tensor
        loss = sum((m * m).sum() for m in mids) + (leaves[3] * leaves[3]).sum()  # a Parameter is not counted
    del mids
    # float32: score-shaped 18 x 4, activation (batch rows) 24 x 4, weight-shaped 25 x 4; m * m saves m twice
    assert meter.at_peak == {"score": 72, "activation": 96, "weight": 100}
    loss.backward()
    del loss
    assert meter.live == {"score": 0, "activation": 0, "weight": 0}


def test_plan_is_the_width_series_plus_the_depth_series_without_repeats() -> None:
    assert cs.plan(["gptq", "flatquant"], [256, 512], 4, [4, 8], 512) == [
        ("gptq", 256, 4), ("gptq", 512, 4), ("gptq", 512, 8),
        ("flatquant", 256, 4), ("flatquant", 512, 4), ("flatquant", 512, 8)]
