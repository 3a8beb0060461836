"""Frontier diagnostics on scripted models whose flips, lags and mismatches are known in advance."""

from __future__ import annotations

import copy
import csv
import logging
import math

import pytest
import torch
from torch import nn

from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.decoding.trace import CommitTrace
from fair_calib.diagnostics import METRICS, run_diagnostics
from fair_calib.diagnostics.flips import selection_disagreement
from fair_calib.diagnostics.frontier_kl import kl_divergence
from fair_calib.diagnostics.hidden_mse import answer_offsets, per_token_hidden_error, weighted_mean
from fair_calib.diagnostics.lag import lag_histogram, lag_summary, trace_lags
from fair_calib.diagnostics.mismatch import PostCommit, trace_post_commit
from fair_calib.diagnostics.prob_mse import prob_mse
from fair_calib.diagnostics.runner import StepCurve, own_state_prob_mse, row_sums
from fair_calib.diagnostics.trajectory import encode_prompts, rollout, teacher_trajectory
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import build_model
from fair_calib.models.tokenizer import build_char_tokenizer
from fair_calib.quant.rtn import RTN
from fair_calib.registry import ConfigError

V, MASK = 128, 2
TARGETS = [10, 11, 12, 13]  # the teacher's answer tokens
STRENGTH = [5.0, 4.5, 4.0, 3.5]  # decreasing confidence: LLaDA commits position t at step t


class ScriptedLM(nn.Module):
    """Logits set by hand: answer position i puts logit STRENGTH[i] on TARGETS[i] (0 elsewhere), unless
    `overrides[(k, i)] = (token, logit)` applies in states where k answer tokens are already committed."""

    def __init__(self, overrides: dict[tuple[int, int], tuple[int, float]] | None = None, gen_length: int = 4) -> None:
        super().__init__()
        self.config = DLLMConfig(family="llada", vocab_size=V, d_model=V, n_layers=1, n_heads=1, n_kv_heads=1,
                                 intermediate_size=8, mask_id=MASK, eos_id=1, pad_id=0)
        self.tokenizer = build_char_tokenizer()
        self.overrides = overrides or {}
        self.gen_length = gen_length
        self.anchor = nn.Parameter(torch.tensor([float(len(self.overrides))] + [v for _, v in self.overrides.values()]))

    @property
    def mask_id(self) -> int:
        return MASK

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length = ids.shape
        g = self.gen_length
        logits = torch.zeros(b, length, V)
        k = (ids[:, length - g:] != MASK).sum(1)
        for r in range(b):
            for i in range(g):
                tok, val = self.overrides.get((int(k[r]), i), (TARGETS[i], STRENGTH[i]))
                logits[r, length - g + i, tok] = val
        return logits

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(ids, attention_mask)  # the logits serve as a d = V "hidden state"


def llada4() -> LLaDASampler:
    return LLaDASampler(gen_length=4, steps=4, block_length=4)


def tiny_model(family: str = "llada", seed: int = 0):
    torch.manual_seed(seed)
    cfg = DLLMConfig(family=family, vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                     n_kv_heads=4 if family == "llada" else 2, intermediate_size=64, mask_id=MASK, eos_id=1, pad_id=0,
                     qkv_bias=family == "dream")
    model = build_model(cfg).eval()
    model.tokenizer = build_char_tokenizer()
    return model


PROMPTS = ["12+34=", "what is 5+7?", "a"]


def zf_zq(fp_logit: float, q_logit: float) -> tuple[float, float]:
    """Partition functions with one raised logit and V - 2 zeros (the mask id is suppressed)."""
    return math.exp(fp_logit) + (V - 2), math.exp(q_logit) + (V - 2)


# ---- pure metric functions on hand-made inputs -------------------------------------------------

def hand_trace() -> CommitTrace:
    """T = 5 steps, one row, 4 positions; commits at steps 0, 1, 2, 4 with final tokens 7, 8, 4, 3."""
    top1 = torch.tensor([
        [7, 5, 4, 1],
        [7, 8, 4, 3],
        [7, 9, 4, 3],  # position 1 (committed 8 at step 1) switches to 9 ...
        [7, 8, 6, 3],  # ... and back to 8: its top-1 changed twice after commit
        [7, 8, 6, 3],
    ])
    commit = [0, 1, 2, 4]
    committed = [torch.tensor([[commit[i] == t for i in range(4)]]) for t in range(5)]
    return CommitTrace(torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.long), MASK, committed=committed,
                       confidence=[torch.zeros(1, 4)] * 5, top1=[r[None] for r in top1],
                       tokens=torch.tensor([[7, 8, 4, 3]]))


def test_stabilization_lag_by_hand():
    lags = trace_lags(hand_trace())
    # pos0 settled at 0, committed 0 -> 0; pos1 settles at step 3, committed 1 -> 2;
    # pos2's last top-1 (6) != 4 -> s* = T = 5, committed 2 -> 3; pos3 settled at 1, committed 4 -> -3
    assert lags.tolist() == [0, 2, 3, -3]
    s = lag_summary(lags)
    assert s["mean"] == pytest.approx(0.5)
    assert s["p90"] == pytest.approx(2.7)  # sorted [-3, 0, 2, 3]: 2 + 0.7 * (3 - 2)
    assert s["share_positive"] == pytest.approx(0.5)
    hist = lag_histogram({"fp": lags, "q": torch.tensor([0, 0])})
    assert [r["lag"] for r in hist] == list(range(-3, 4))
    assert [r["count_fp"] for r in hist] == [1, 0, 0, 1, 0, 1, 1]
    assert sum(r["count_q"] for r in hist) == 2 and hist[3]["share_q"] == 1.0


def test_post_commit_mismatch_by_hand():
    pc = trace_post_commit(hand_trace())
    # pos0: steps 1-4 agree -> 0; pos1: steps 2,3,4 = 9,8,8 -> 1/3; pos2: steps 3,4 = 6,6 -> 1 (never agrees);
    # pos3 is committed at the last step: no post-commit steps, excluded
    assert pc.disagree_fraction.tolist() == pytest.approx([0.0, 1 / 3, 1.0])
    assert pc.never_agree.tolist() == [False, False, True]
    s = pc.summary()
    assert s["mean_disagree"] == pytest.approx(4 / 9)
    assert s["never_agree"] == pytest.approx(1 / 3)
    assert s["excluded_last_step"] == 1 and s["excluded_share"] == pytest.approx(0.25)
    assert pc.rows.tolist() == [0, 0, 0] and pc.n_prompts == 1  # one prompt: every kept position is row 0
    both = PostCommit.cat([pc, pc])
    assert both.rows.tolist() == [0, 0, 0, 1, 1, 1] and both.n_prompts == 2
    assert both.per_prompt(both.disagree_fraction) == pytest.approx([4 / 3, 4 / 3])


def test_kl_and_prob_mse_two_tokens():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    assert kl_divergence(p, q).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert kl_divergence(p, p).item() == 0.0
    # mean over the 2 vocabulary entries of (0.25^2 + 0.25^2)
    assert prob_mse(p, q, torch.tensor([True])).item() == pytest.approx(0.0625)
    with_mask = torch.tensor([[0.0, 1.0, -torch.inf]])  # a suppressed entry contributes 0, not NaN
    assert kl_divergence(with_mask, with_mask).item() == 0.0


def test_selection_disagreement_jaccard():
    c = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    cq = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    value, valid = selection_disagreement(c, cq)
    assert value.tolist() == pytest.approx([1 - 1 / 3, 0.0, 0.0])
    assert valid.tolist() == [True, True, False]


def test_hidden_mse_weighting_by_hand():
    assert answer_offsets(torch.tensor([[0, 1, 1]]), 2).tolist() == [[-1, -1, -1, 0, 1]]
    h_fp = torch.zeros(1, 3, 2)
    h_q = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    err = per_token_hidden_error(h_fp, h_q)
    assert err.tolist() == [[1.0, 4.0, 0.0]]
    num, den = weighted_mean(err, torch.tensor([[1.0, 0.0, 1.0]]))
    assert num / den == pytest.approx(0.5)
    num, den = weighted_mean(err, torch.ones(1, 3))
    assert num / den == pytest.approx(5 / 3)


# ---- the runner on scripted models --------------------------------------------------------------

def test_flip_exactly_one_frontier_token_at_step_2(tmp_path):
    fp = ScriptedLM()
    q = ScriptedLM({(2, 2): (20, 6.0)})  # from S_2 the quantized model prefers 20 at the frontier position 2
    r = run_diagnostics(fp, q, ["ab"], llada4(), tmp_path, n_prompts=1)
    steps = r.tables["per_step"]
    assert [row["flips"] for row in steps] == [0, 0, 1, 0]
    assert [row["frontier_size"] for row in steps] == [1, 1, 1, 1]
    assert r["diag/flip_rate"] == pytest.approx(0.25)
    assert r["diag/selection_disagreement"] == 0.0  # it still picks position 2, only with a different token

    zf, zq = zf_zq(4.0, 6.0)
    kl = math.log(zq / zf) + 4 * math.exp(4) / zf - 6 / zf
    assert [row["frontier_kl"] for row in steps] == pytest.approx([0, 0, kl, 0], rel=1e-5, abs=1e-9)
    assert r["diag/frontier_kl"] == pytest.approx(kl / 4, rel=1e-5)
    sq = ((math.exp(4) / zf - 1 / zq) ** 2 + (1 / zf - math.exp(6) / zq) ** 2 + (V - 3) * (1 / zf - 1 / zq) ** 2) / V
    assert steps[2]["prob_mse_teacher"] == pytest.approx(sq / 2, rel=1e-4)  # masked: {2 (differs), 3 (same)}
    assert r["diag/prob_mse_teacher"] == pytest.approx(sq / 10, rel=1e-4)  # 4 + 3 + 2 + 1 masked positions
    # its own rollout commits 20 at step 2, then from S^q_3 its top-1 there is 12 again
    assert r["diag/teacher_token_mismatch"] == pytest.approx(0.25)
    assert r["diag/mean_disagree"] == pytest.approx(1 / 3)  # positions 0, 1: 0; position 2: 1; 3 excluded
    assert r["diag/never_agree"] == pytest.approx(1 / 3)
    assert r["diag/post_commit_excluded"] == 1
    assert r["diag/prob_mse_own"] == pytest.approx(r["diag/prob_mse_teacher"], rel=1e-6)
    # lags: FP [0, -1, -2, -3]; quantized [0, -1, 2, -3] (position 2 never settles on 20: s* = T = 4)
    assert r["diag/lag_mean_fp"] == pytest.approx(-1.5) and r["diag/lag_pos_share_fp"] == 0.0
    assert r["diag/lag_mean_q"] == pytest.approx(-0.5) and r["diag/lag_pos_share_q"] == pytest.approx(0.25)
    assert r["diag/lag_p90_fp"] == pytest.approx(-0.3) and r["diag/lag_p90_q"] == pytest.approx(1.4)


def test_selection_disagreement_without_flips(tmp_path):
    q = ScriptedLM({(1, 3): (13, 10.0)})  # from S_1 position 3 becomes the most confident; same token
    r = run_diagnostics(ScriptedLM(), q, ["ab"], llada4(), tmp_path, n_prompts=1,
                        metrics=["flip_rate", "selection_disagreement"])
    assert [row["selection_disagreement"] for row in r.tables["per_step"]] == [0, 1, 0, 0]
    assert r["diag/selection_disagreement"] == pytest.approx(0.25)
    assert r["diag/flip_rate"] == 0.0
    assert "diag/lag_mean_q" not in r  # metrics not asked for are not computed


def test_hidden_mse_weighted_by_position(tmp_path):
    q = ScriptedLM({(4, 3): (13, 9.0)})  # differs only on the complete sequence, at answer offset 3
    r = run_diagnostics(ScriptedLM(), q, ["ab"], llada4(), tmp_path, n_prompts=1, metrics=["hidden_mse"],
                        position_weight=lambda off: (off == 3).float())
    e3 = (9.0 - 3.5) ** 2 / V
    assert r["diag/hidden_mse_weighted"] == pytest.approx(e3)
    assert r["diag/hidden_mse_unweighted"] == pytest.approx(e3 / 6)  # 2 prompt + 4 answer tokens


def test_scripted_fp_against_itself_is_zero(tmp_path):
    fp = ScriptedLM()
    r = run_diagnostics(fp, fp, ["ab", "xyz"], llada4(), tmp_path, batch_size=1)
    for k in ("flip_rate", "selection_disagreement", "frontier_kl", "prob_mse_teacher", "prob_mse_own",
              "teacher_token_mismatch", "hidden_mse_weighted", "hidden_mse_unweighted"):
        assert r[f"diag/{k}"] == 0.0, k
    assert r["diag/lag_mean_fp"] == r["diag/lag_mean_q"] == pytest.approx(-1.5)


# ---- real (random) tiny models: every policy reproduces itself exactly -------------------------

SAMPLERS = {
    "llada": lambda: LLaDASampler(gen_length=8, steps=8, block_length=4),
    "llada_random": lambda: LLaDASampler(gen_length=8, steps=4, block_length=4, remasking="random"),
    "llada_cfg": lambda: LLaDASampler(gen_length=8, steps=4, block_length=8, cfg_scale=1.0),
    "fast_dllm": lambda: LLaDASampler(gen_length=8, steps=8, block_length=4, threshold=0.9),
    "dream": lambda: DreamSampler(gen_length=8, steps=6),
    "dream_maskgit_plus": lambda: DreamSampler(gen_length=8, steps=6, alg="maskgit_plus"),
    "dream_topk_margin": lambda: DreamSampler(gen_length=8, steps=6, alg="topk_margin"),
    "dream_origin": lambda: DreamSampler(gen_length=8, steps=6, alg="origin"),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_random_model_against_itself(name, tmp_path):
    model = tiny_model("dream" if name.startswith("dream") else "llada")
    r = run_diagnostics(model, model, PROMPTS, SAMPLERS[name](), None, batch_size=2,
                        metrics=["flip_rate", "selection_disagreement", "frontier_kl", "prob_mse"])
    for k in ("flip_rate", "selection_disagreement", "frontier_kl", "prob_mse_teacher", "prob_mse_own"):
        assert r[f"diag/{k}"] == 0.0, k
    assert r["diag/frontier_tokens"] == 3 * 8


def test_quantized_random_model_writes_tables_and_plots(tmp_path):
    fp = tiny_model("llada")
    q = copy.deepcopy(fp)
    RTN(w_bits=4, a_bits=4).quantize(q)
    r = run_diagnostics(fp, q, PROMPTS, SAMPLERS["llada"](), tmp_path / "diag", n_prompts=2, batch_size=2,
                        cache_dir=tmp_path / "cache")
    assert r["diag/n_prompts"] == 2
    assert all(isinstance(v, int | float) for v in r.values())
    assert 0 <= r["diag/flip_rate"] <= 1 and 0 <= r["diag/selection_disagreement"] <= 1
    assert r["diag/frontier_kl"] > 0 and r["diag/hidden_mse_unweighted"] > 0
    assert r["diag/hidden_mse_weighted"] == pytest.approx(r["diag/hidden_mse_unweighted"])  # default: uniform
    for key in ("flip_rate", "selection_disagreement", "frontier_kl", "prob_mse_teacher", "mean_disagree"):
        assert r[f"diag/{key}_ci_low"] <= r[f"diag/{key}"] <= r[f"diag/{key}_ci_high"], key  # CI over prompts
    for f in ("scalars.json", "per_step.csv", "lag_histogram.csv", "flip_rate.png", "prob_mse.png",
              "lag_histogram.png"):
        assert (tmp_path / "diag" / f).is_file(), f
    with open(tmp_path / "diag" / "per_step.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and float(rows[0]["frontier_size"]) == 2  # 2 prompts, one commit each per step
    assert sum(row["count_fp"] for row in r.tables["lag_histogram"]) == 2 * 8

    class Recorder:
        def __init__(self):
            self.tables, self.images = [], []

        def log_table(self, name, columns, rows):
            self.tables.append((name, columns, rows))

        def log_image(self, name, path):
            self.images.append(name)

    rec = Recorder()
    r.log_to(rec)
    assert {t[0] for t in rec.tables} == {"diagnostics/per_step", "diagnostics/lag_histogram"}
    assert len(rec.images) == 3


def test_unknown_metric_is_a_config_error():
    with pytest.raises(ConfigError, match="valid: flip_rate"):
        run_diagnostics(ScriptedLM(), ScriptedLM(), ["ab"], llada4(), None, metrics=["flip_rate", "flops"])
    assert len(METRICS) == 7


# ---- the teacher trajectory cache ------------------------------------------------------------------

def test_teacher_cache_hits_then_misses_when_prompts_change(tmp_path, caplog):
    model, sampler = tiny_model("llada"), SAMPLERS["llada"]()
    ids = encode_prompts(model, PROMPTS)
    with caplog.at_level(logging.INFO, logger="fair_calib.diagnostics"):
        first = teacher_trajectory(model, ids, sampler, batch_size=2, cache_dir=tmp_path)
        second = teacher_trajectory(model, ids, sampler, batch_size=2, cache_dir=tmp_path)
    assert not first.cache_hit and second.cache_hit
    assert "cache hit" in caplog.text
    assert len(second.traces) == 2 and second.num_prompts == 3
    for a, b in zip(first.traces, second.traces):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.prompt, b.prompt)
        assert torch.equal(a.stacked("committed"), b.stacked("committed"))
        assert torch.equal(a.stacked("top1"), b.stacked("top1"))
        assert torch.equal(a.stacked("prob"), b.stacked("prob"))
    assert not teacher_trajectory(model, ids[:2], sampler, batch_size=2, cache_dir=tmp_path).cache_hit
    other = LLaDASampler(gen_length=8, steps=4, block_length=4)
    assert not teacher_trajectory(model, ids, other, batch_size=2, cache_dir=tmp_path).cache_hit
    assert not teacher_trajectory(tiny_model("llada", seed=1), ids, sampler, batch_size=2,
                                  cache_dir=tmp_path).cache_hit
    assert len(list((tmp_path / "teacher_trajectory").glob("*.pt"))) == 4


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_corrupt_teacher_cache_is_logged_and_decoded_again(tmp_path, caplog, damage):
    model, sampler = tiny_model("llada"), SAMPLERS["llada"]()
    ids = encode_prompts(model, PROMPTS)
    first = teacher_trajectory(model, ids, sampler, batch_size=2, cache_dir=tmp_path)
    path = first.path
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    else:  # a valid torch file of another shape
        torch.save({"something": torch.zeros(2)}, path)
    with caplog.at_level(logging.WARNING, logger="fair_calib.diagnostics"):
        again = teacher_trajectory(model, ids, sampler, batch_size=2, cache_dir=tmp_path)
    assert not again.cache_hit and "unreadable" in caplog.text
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first.traces, again.traces))
    assert teacher_trajectory(model, ids, sampler, batch_size=2, cache_dir=tmp_path).cache_hit  # rewritten whole


def test_runner_reports_the_cache_hit(tmp_path):
    fp = ScriptedLM()
    kw = dict(metrics=["flip_rate"], cache_dir=tmp_path, n_prompts=1)
    assert run_diagnostics(fp, fp, ["ab"], llada4(), None, **kw)["diag/teacher_cache_hit"] == 0.0
    assert run_diagnostics(fp, fp, ["ab"], llada4(), None, **kw)["diag/teacher_cache_hit"] == 1.0
    assert run_diagnostics(fp, fp, ["ba"], llada4(), None, **kw)["diag/teacher_cache_hit"] == 0.0


def test_own_state_mse_during_rollout_equals_separate_pass():
    fp = tiny_model("dream")
    q = copy.deepcopy(fp)
    RTN(w_bits=4, a_bits=4).quantize(q)
    sampler = SAMPLERS["dream"]()
    r = run_diagnostics(fp, q, PROMPTS, sampler, None, batch_size=2, metrics=["prob_mse"])
    own = rollout(q, encode_prompts(fp, PROMPTS), sampler, batch_size=2)
    curve = own_state_prob_mse(fp, q, sampler, own.traces)
    assert [row["prob_mse_own"] for row in r.tables["per_step"]] == pytest.approx(curve.curve(), rel=1e-6)
    assert r["diag/prob_mse_own"] == pytest.approx(curve.overall(), rel=1e-6) and curve.overall() > 0


def test_decoding_override_and_pipeline_call_pattern(tmp_path):
    """The pipeline passes its sampler positionally and the `diagnostics` config keys as keywords."""
    cfg = {"n_prompts": 1, "metrics": ["flip_rate"], "decoding": {"name": "llada", "gen_length": 4, "steps": 4,
                                                                   "block_length": 4},
           "cache_dir": str(tmp_path), "seed": 0, "gen_length": None, "batch_size": 8, "force": False}
    run_sampler = DreamSampler(gen_length=8, steps=8)  # would commit differently; the override wins
    q = ScriptedLM({(2, 2): (20, 6.0)})
    r = run_diagnostics(ScriptedLM(), q, ["ab", "cd"], run_sampler, tmp_path / "d", position_weight=None, **cfg)
    assert r.get("scalars", r)["diag/flip_rate"] == pytest.approx(0.25)
    assert r["diag/frontier_tokens"] == 4


def test_step_curve_keeps_prompt_totals_and_their_ci():
    c = StepCurve()
    c.add_rows(0, 0, torch.tensor([1, 0]), torch.tensor([2, 2]))
    c.add_rows(1, 0, torch.tensor([1, 1]), torch.tensor([2, 2]))
    c.add_rows(0, 2, torch.tensor([0]), torch.tensor([4]))  # the next batch: prompt 2
    assert c.num == [1.0, 2.0] and c.den == [8.0, 4.0] and c.overall() == pytest.approx(3 / 12)
    assert c.prompt_num == {0: 2.0, 1: 1.0, 2: 0.0} and c.prompt_den == {0: 4.0, 1: 4.0, 2: 4.0}
    low, high = c.interval()
    assert 0.0 <= low <= 0.25 <= high <= 0.5  # bounded by the smallest and largest per-prompt ratio
    assert StepCurve().interval() is None
    same = StepCurve()
    same.add_rows(0, 0, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))
    assert same.interval() == pytest.approx((0.5, 0.5))  # every prompt at 1/2: no spread
    values = torch.tensor([1.0, 2.0, 3.0])
    assert row_sums(values, torch.tensor([[True, False], [True, True]])).tolist() == [1.0, 5.0]
