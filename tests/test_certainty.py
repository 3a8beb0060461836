"""weighting=certainty (DLLMQuant CGQ): w = (lambda * 1[mask] + sqrt(c))^2 from the FP teacher, mean 1 on real
tokens, padding 0; only with quantizers that take token weights."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_config import compose_cfg
from torch import Tensor, nn

from fair_calib.data.calibration import CalibrationSet, tinyreason_calibration
from fair_calib.models.hf_folder import HFFolderModel
from fair_calib.pipeline import Pipeline
from fair_calib.quant.gptq import GPTQ
from fair_calib.registry import ConfigError, build
from fair_calib.weighting.certainty import Certainty, certainty_weights, teacher_confidence

MASK = 5  # the scripted model's mask id (vocab 6)


def _logits_for(c: float) -> list[float]:
    """A logit row whose top-1 probability over tokens 0..4 is c (the rest spread evenly); the mask logit is huge,
    so a confidence that forgot to exclude the mask token would come out ~1."""
    rest = (1.0 - c) / 4
    return [math.log(c)] + [math.log(rest)] * 4 + [50.0]


class Scripted(nn.Module):
    """A fake teacher: at position i its logits give top-1 probability MASKED_C[i] when the input there is the mask
    token and UNMASKED_C[i] otherwise. Records whether it ran with grad enabled and its batch sizes."""

    MASKED_C = (0.64, 0.36, 0.81, 0.49)
    UNMASKED_C = (0.81, 0.49, 0.64, 0.36)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.mask_id = MASK
        self.masked_rows = torch.tensor([_logits_for(c) for c in self.MASKED_C])
        self.unmasked_rows = torch.tensor([_logits_for(c) for c in self.UNMASKED_C])
        self.calls: list[tuple[int, bool]] = []

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.calls.append((ids.shape[0], torch.is_grad_enabled()))
        length = ids.shape[1]
        masked = (ids == MASK)[..., None]
        return torch.where(masked, self.masked_rows[:length], self.unmasked_rows[:length]).expand(
            ids.shape[0], length, -1).to(torch.bfloat16).clone()


# row 0: positions 0, 2 masked; row 1: position 1 masked, position 3 padding; row 2: nothing masked
IDS = torch.tensor([[MASK, 0, MASK, 1], [0, MASK, 2, 0], [3, 4, 0, 1]])
ATTN = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
OFFSETS = torch.tensor([[0, 1, 2, 3], [-1, 0, 1, -1], [-1, -1, 0, 1]])


def _calib(masked: bool = True) -> CalibrationSet:
    return CalibrationSet(IDS, ATTN, OFFSETS, ["a", "b", "c"], (IDS == MASK) if masked else None)


def _confidences_of_bf16(cs: tuple[float, ...]) -> list[float]:
    """The top-1 probabilities the scripted bf16 logits really give (fp32 softmax over tokens 0..4)."""
    rows = torch.tensor([_logits_for(c) for c in cs]).to(torch.bfloat16).float()[:, :MASK]
    return torch.softmax(rows, -1).amax(-1).tolist()


def test_scripted_teacher_weights_are_the_cgq_rule_by_hand():
    cm, cu = _confidences_of_bf16(Scripted.MASKED_C), _confidences_of_bf16(Scripted.UNMASKED_C)
    assert cm == pytest.approx(Scripted.MASKED_C, abs=5e-3)  # bf16 logits round the scripted values a little
    # masked: (1 + sqrt c)^2; unmasked: c; padding: 0
    raw = torch.tensor([[(1 + math.sqrt(cm[0])) ** 2, cu[1], (1 + math.sqrt(cm[2])) ** 2, cu[3]],
                        [cu[0], (1 + math.sqrt(cm[1])) ** 2, cu[2], 0.0],
                        [cu[0], cu[1], cu[2], cu[3]]])
    expected = raw * (11 / raw.sum())  # mean 1 over the 11 real tokens
    teacher = Scripted()
    w = Certainty().calibration_weights(_calib(), None, teacher)
    assert w.dtype == torch.float32 and w[1, 3].item() == 0.0
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)
    assert all(not grad for _, grad in teacher.calls)  # no grad
    # with the plain confidences: masked c = .64 -> 3.24, unmasked c = .81 -> .81 (the rule on round numbers)
    c = torch.tensor([0.64, 0.81, 0.36, 0.49])
    m = torch.tensor([True, False, True, False])
    torch.testing.assert_close(certainty_weights(m, c), torch.tensor([3.24, 0.81, 2.56, 0.49]))
    torch.testing.assert_close(certainty_weights(m, c, mask_weight=2.0), torch.tensor([7.84, 0.81, 6.76, 0.49]))
    torch.testing.assert_close(certainty_weights(m, c, mask_weight=0.0), c)


def test_batching_does_not_change_the_weights_and_unmasked_rows_weigh_by_confidence():
    one, many = Scripted(), Scripted()
    w1 = Certainty(batch_size=1).calibration_weights(_calib(), None, one)
    w8 = Certainty(batch_size=8).calibration_weights(_calib(), None, many)
    assert [n for n, _ in one.calls] == [1, 1, 1] and [n for n, _ in many.calls] == [3]
    assert torch.equal(w1, w8)
    # nothing masked (today's teacher-forced rows): w ∝ c on real tokens; the mask status comes from `masked`
    cu = _confidences_of_bf16(Scripted.UNMASKED_C)
    ids = IDS.masked_fill(IDS == MASK, 0)
    calib = CalibrationSet(ids, ATTN, OFFSETS, ["a", "b", "c"])
    w = Certainty().calibration_weights(calib, None, Scripted())
    raw = torch.tensor([cu, cu, cu]) * ATTN
    torch.testing.assert_close(w, raw * (11 / raw.sum()), rtol=1e-5, atol=1e-6)
    assert Certainty().summary(calib, w) == {"weight_masked_share": 0.0, "weight_mean_unmasked": pytest.approx(1.0)}


def test_summary_means_on_masked_and_unmasked_tokens():
    w = Certainty().calibration_weights(_calib(), None, Scripted())
    s = Certainty().summary(_calib(), w)
    masked = IDS == MASK
    real = ATTN != 0
    assert s["weight_masked_share"] == pytest.approx(3 / 11)
    assert s["weight_mean_masked"] == pytest.approx(float(w[masked].mean()))
    assert s["weight_mean_unmasked"] == pytest.approx(float(w[real & ~masked].mean()))
    assert s["weight_mean_masked"] > 2 * s["weight_mean_unmasked"]


def test_bad_settings_and_missing_teacher_are_clear():
    with pytest.raises(ConfigError, match=r"weighting.mask_weight=-1: must be a number >= 0"):
        build("weighting", {"name": "certainty", "mask_weight": -1})
    with pytest.raises(ConfigError, match=r"weighting.batch_size=0: must be a positive integer"):
        build("weighting", {"name": "certainty", "batch_size": 0})
    with pytest.raises(ValueError, match="needs the FP teacher"):
        Certainty().calibration_weights(_calib(), None, None)
    with pytest.raises(TypeError, match="calibration_weights"):
        Certainty().token_weights(OFFSETS, ATTN, None)
    w = build("weighting", {"name": "certainty"})
    assert isinstance(w, Certainty) and not w.needs_prior and w.needs_teacher


@pytest.fixture(scope="module")
def shipped_llada():
    torch.set_num_threads(1)
    return HFFolderModel("tiny-llada").load()


def _masked_calib(model, n: int = 8) -> CalibrationSet:
    """tinyreason rows with answer tokens masked at a per-row rate t ~ U(0.1, 0.9) (as MCS / TMAS states), the
    last two positions of row 0 as padding."""
    calib = tinyreason_calibration(tokenizer=model.tokenizer, n_samples=n, seed=0)
    g = torch.Generator().manual_seed(0)
    t = 0.1 + 0.8 * torch.rand(len(calib), 1, generator=g)
    masked = (torch.rand(calib.input_ids.shape, generator=g) < t) & (calib.answer_offset >= 0)
    attn = calib.attention_mask.clone()
    attn[0, -2:] = 0
    masked &= attn.bool()
    return CalibrationSet(calib.input_ids.masked_fill(masked, model.mask_id), attn, calib.answer_offset,
                          calib.prompts, masked)


def test_shipped_llada_weights_are_finite_mean_one_and_favour_masked_tokens(shipped_llada):
    calib = _masked_calib(shipped_llada)
    w = Certainty(batch_size=3).calibration_weights(calib, None, shipped_llada)
    real = calib.attention_mask != 0
    assert w.shape == calib.input_ids.shape and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert w[~real].abs().sum().item() == 0.0
    assert w[real].mean().item() == pytest.approx(1.0, abs=1e-5)
    # the confidences are the model's own fp32 softmax top-1 (mask token excluded) on the masked inputs
    with torch.no_grad():
        logits = shipped_llada(calib.input_ids, calib.attention_mask).float()
    logits[..., shipped_llada.mask_id] = -torch.inf
    c = torch.softmax(logits, -1).amax(-1)
    torch.testing.assert_close(teacher_confidence(shipped_llada, calib.input_ids, calib.attention_mask), c)
    raw = certainty_weights(calib.masked, c) * real
    torch.testing.assert_close(w, raw * (real.sum() / raw.sum()), rtol=1e-5, atol=1e-6)
    s = Certainty().summary(calib, w)
    assert s["weight_mean_masked"] > s["weight_mean_unmasked"]  # (1 + sqrt c)^2 >= 1 >= c


def test_gptq_with_certainty_equals_gptq_with_those_weights_passed_explicitly(tmp_path, monkeypatch):
    """The pipeline's weighting=certainty run quantizes bit-identically to GPTQ handed the same weights by hand, and
    differently from uniform GPTQ (so the weights reach the Hessian)."""
    seen = {}
    real_quantize = GPTQ.quantize

    def spy(self, model, calib=None, token_weights=None):
        out = real_quantize(self, model, calib, token_weights)
        seen.update(model=model, calib=calib, weights=token_weights)
        return out

    monkeypatch.setattr(GPTQ, "quantize", spy)
    cfg = compose_cfg("experiment=none", "method=gptq", "weighting=certainty", "logger=none", "device=cpu",
                      "data.n_samples=4", "compare_fp=false", "diagnostics.enabled=false",
                      "benchmark.n={addition:2,word_problems:2,compare:2}", "benchmark.mc_num=2",
                      "benchmark.show_progress=false", "quantizer.progress=false", f"cache_dir={tmp_path / 'cache'}")
    results = Pipeline(cfg, tmp_path / "run").run()
    assert results["status"] == "ok" and results["run"]["weighting"] == "certainty"
    assert "weighting_s" in results["timings"]
    assert results["calibration"]["weight_mean_unmasked"] == pytest.approx(1.0)  # teacher-forced rows: none masked
    assert results["summary"]["calib/weight_masked_share"] == 0.0

    fp = HFFolderModel("tiny-llada").load()
    calib = build("data", cfg.data, tokenizer=fp.tokenizer)
    weights = Certainty().calibration_weights(calib, None, fp)
    assert torch.equal(seen["weights"], weights) and not torch.equal(weights, torch.ones_like(weights))
    by_hand, uniform = copy.deepcopy(fp), copy.deepcopy(fp)
    quantizer = build("quantizer", cfg.quantizer)
    real_quantize(quantizer, by_hand, calib, weights)
    real_quantize(build("quantizer", cfg.quantizer), uniform, calib, None)
    ours, hand, plain = (m.state_dict() for m in (seen["model"], by_hand, uniform))
    assert ours.keys() == hand.keys()
    assert all(torch.equal(ours[k], hand[k]) for k in ours)
    assert any(not torch.equal(ours[k], plain[k]) for k in ours if k.endswith("weight"))


@pytest.mark.parametrize("overrides", [("method=rtn",), ("method=smoothquant",), ("method=fp",),
                                       ("method=quarot", "quantizer.weight_method=rtn")])
def test_certainty_with_a_quantizer_that_takes_no_weights_fails_at_construction(overrides, tmp_path):
    cfg = compose_cfg("experiment=none", *overrides, "weighting=certainty", "logger=none")
    name = cfg.quantizer.name
    with pytest.raises(ConfigError, match=f"weighting=certainty weights the calibration tokens but quantizer={name} "
                                          "takes no token weights"):
        Pipeline(cfg, tmp_path)


@pytest.mark.parametrize("method", ["gptq", "awq", "flatquant", "quarot"])
def test_certainty_is_accepted_by_the_quantizers_that_take_weights(method, tmp_path):
    pipe = Pipeline(compose_cfg("experiment=none", f"method={method}", "weighting=certainty", "logger=none"), tmp_path)
    assert pipe.quantizer.uses_token_weights and pipe.weighting.needs_teacher


def test_cli_certainty_with_rtn_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "FAIR_CALIB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "fair_calib", "experiment=none", "method=rtn", "weighting=certainty",
                           "logger=none", "hydra.run.dir=run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "weighting=certainty weights the calibration tokens but quantizer=rtn takes no token weights" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout and not (Path(tmp_path) / "run" / "results.json").exists()
