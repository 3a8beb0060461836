"""Stage I position prior: hand-computed F and R on a hand-made trace, cache behaviour, end-to-end probe."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fair_calib.decoding.trace import CommitTrace
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import build_model
from fair_calib.models.tokenizer import build_char_tokenizer
from fair_calib.prior.fair import FairPrior, accumulate_trace, lambda0, normalize_scores
from fair_calib.prior.position_prior import PositionPrior
from fair_calib.registry import ConfigError, build

# ---- a hand-made trace: 2 rows, 3 steps, G = 4 ---------------------------------------------------
# commits  row 0: t0 {0}, t1 {1, 2}, t2 {3}      row 1: t0 {2, 3}, t1 {}, t2 {0, 1}
COMMITS = [
    [[1, 0, 0, 0], [0, 0, 1, 1]],
    [[0, 1, 1, 0], [0, 0, 0, 0]],
    [[0, 0, 0, 1], [1, 1, 0, 0]],
]
# top-1 prob at each (t, row, position); 5.0 / -3.0 sit at already-committed positions and must be ignored
PROB = [
    [[0.9, 0.5, 0.7, 0.1], [0.2, 0.4, 0.6, 1.0]],
    [[5.0, 0.4, 0.8, 0.6], [0.5, 0.5, -3.0, 5.0]],
    [[5.0, -3.0, 5.0, 0.3], [0.3, 0.7, 5.0, 5.0]],
]
# per row and step, min-max over the still-masked positions (0 elsewhere):
#   row 0: t0 [1, .5, .75, 0]   t1 [0, 0, 1, .5]   t2 [0, 0, 0, 1] (one masked -> 1)
#   row 1: t0 [0, .25, .5, 1]   t1 [1, 1, 0, 0] (equal -> 1)   t2 [0, 1, 0, 0]
C_PROB = [
    [[1, 0.5, 0.75, 0], [0, 0.25, 0.5, 1]],
    [[0, 0, 1, 0.5], [1, 1, 0, 0]],
    [[0, 0, 0, 1], [0, 1, 0, 0]],
]


def hand_trace() -> CommitTrace:
    tr = CommitTrace(torch.tensor([[5, 6], [0, 7]]), torch.tensor([[1, 1], [0, 1]]), mask_id=2)
    prob = torch.tensor(PROB)
    for t in range(3):
        tr.committed.append(torch.tensor(COMMITS[t], dtype=torch.bool))
        tr.confidence.append(torch.zeros(2, 4))
        tr.top1.append(torch.zeros(2, 4, dtype=torch.long))
        tr.scores["prob"].append(prob[t])
        tr.scores["neg_entropy"].append(3 * prob[t] - 7)  # affine: same normalized c as prob
        tr.scores["margin"].append(1 - prob[t])  # reversed order: c -> 1 - c (1 stays 1 on ties)
    tr.tokens = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])
    return tr


def test_lambda0_schedules():
    # u = t / (T - 1) = [0, .5, 1]
    assert lambda0(3, "early", 1.0).tolist() == [2.0, 1.5, 1.0]
    assert lambda0(3, "late", 1.0).tolist() == [1.0, 1.5, 2.0]
    assert lambda0(3, "flat", 1.0).tolist() == [1.0, 1.0, 1.0]
    assert lambda0(3, "early", 0.5).tolist() == [1.5, 1.25, 1.0]
    assert lambda0(1, "early", 1.0).tolist() == [2.0]
    with pytest.raises(ConfigError):
        lambda0(3, "middle")


def test_normalize_scores_per_row_per_step():
    prob = torch.tensor(PROB)
    masked = hand_trace().masked_before()
    assert torch.allclose(normalize_scores(prob, masked), torch.tensor(C_PROB, dtype=torch.float64))
    # a row with one masked position gets 1; equal scores get 1; a row with nothing masked gets 0
    s = torch.tensor([[0.3, 0.9, 0.1], [0.4, 0.4, 0.2], [0.5, 0.6, 0.7]])
    m = torch.tensor([[False, True, False], [True, True, False], [False, False, False]])
    assert normalize_scores(s, m).tolist() == [[0, 1, 0], [1, 1, 0], [0, 0, 0]]


def test_normalize_scores_rejects_nan_at_masked_positions():
    s = torch.tensor([[float("nan"), 0.2]])
    with pytest.raises(ValueError, match="non-finite"):
        normalize_scores(s, torch.tensor([[True, True]]))
    assert normalize_scores(s, torch.tensor([[False, True]])).tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("schedule,gamma,expected", [
    # F_i = sum of lambda0(commit step) over the two rows; commit steps row 0 [0,1,1,2], row 1 [2,2,0,0]
    ("early", 1.0, [2 + 1, 1.5 + 1, 1.5 + 2, 1 + 2]),
    ("late", 1.0, [1 + 2, 1.5 + 2, 1.5 + 1, 2 + 1]),
    ("flat", 1.0, [2, 2, 2, 2]),
    ("early", 0.5, [1.5 + 1, 1.25 + 1, 1.25 + 1.5, 1 + 1.5]),
])
def test_frontier_hits_by_hand(schedule, gamma, expected):
    f, _ = accumulate_trace(hand_trace(), window=4, schedule=schedule, gamma=gamma)
    assert f.dtype == torch.float64
    assert f.tolist() == pytest.approx(expected)


@pytest.mark.parametrize("score,lambda1,expected", [
    ("prob", 1.0, [2.0, 2.75, 2.25, 2.5]),  # column sums of C_PROB over t and rows
    ("neg_entropy", 1.0, [2.0, 2.75, 2.25, 2.5]),  # min-max is invariant to 3 s - 7
    ("margin", 1.0, [3.0, 3.25, 0.75, 2.5]),  # c -> 1 - c, ties stay 1
    ("prob", 2.0, [4.0, 5.5, 4.5, 5.0]),
])
def test_masked_reliability_by_hand(score, lambda1, expected):
    _, r = accumulate_trace(hand_trace(), window=4, score=score, lambda1=lambda1)
    assert r.tolist() == pytest.approx(expected)


def test_window_truncates_after_normalizing_over_all_masked_positions():
    f, r = accumulate_trace(hand_trace(), window=3, schedule="early")
    assert f.tolist() == pytest.approx([3.0, 2.5, 3.5])
    # row 1, t0: position 3 (prob 1.0) is the max even though it lies outside the window
    assert r.tolist() == pytest.approx([2.0, 2.75, 2.25])
    with pytest.raises(ConfigError, match="window"):
        accumulate_trace(hand_trace(), window=5)


def test_position_prior_normalization_and_roundtrip(tmp_path):
    f, r = accumulate_trace(hand_trace(), window=4)
    prior = PositionPrior(f, r, n_rollouts=2, settings={"schedule": "early"}, n_steps=3, key="abc")
    assert prior.window == 4
    assert prior.frontier_hits.tolist() == pytest.approx([1.0, 2.5 / 3, 3.5 / 3, 1.0])  # F / mean(F), mean 3
    assert prior.masked_reliability.tolist() == pytest.approx([2 / 2.375, 2.75 / 2.375, 2.25 / 2.375, 2.5 / 2.375])
    back = PositionPrior.from_json(prior.to_json(tmp_path / "p.json"))
    assert torch.equal(back.frontier_hits_raw, prior.frontier_hits_raw)
    assert torch.equal(back.masked_reliability_raw, prior.masked_reliability_raw)
    assert (back.n_rollouts, back.n_steps, back.key, back.settings) == (2, 3, "abc", {"schedule": "early"})
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["frontier_hits"] == pytest.approx(prior.frontier_hits.tolist())
    lines = prior.to_csv(tmp_path / "p.csv", weights=torch.tensor([1.0, 2.0, 0.5, 0.5])).read_text().splitlines()
    assert lines[0] == "position,frontier_hits_raw,frontier_hits,masked_reliability_raw,masked_reliability,weight"
    assert lines[1].split(",")[:2] == ["0", "3.0"] and lines[2].split(",")[-1] == "2.0"
    assert PositionPrior(torch.zeros(3), torch.ones(3), 1).frontier_hits.tolist() == [0.0, 0.0, 0.0]


# ---- a small random model --------------------------------------------------------------------------
def small_model(family: str = "llada", seed: int = 0):
    torch.manual_seed(seed)
    cfg = DLLMConfig(family=family, vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2,
                     intermediate_size=64, mask_id=2, eos_id=1, pad_id=0, qkv_bias=family == "dream")
    model = build_model(cfg)
    model.tokenizer = build_char_tokenizer()
    return model


PROMPTS = ["12+34=", "Ann has 3 pens. Ann buys 4. How many?", "7+8="]


@pytest.fixture
def counted_probe(monkeypatch):
    """Replace the probe by a counter returning a fixed prior (the cache logic is what is tested)."""
    calls = []

    def fake_probe(self, model, prompts):
        calls.append(list(prompts))
        k = self.window
        return PositionPrior(torch.arange(1.0, k + 1), torch.ones(k), self.n_probe, self.settings(), n_steps=1)

    monkeypatch.setattr(FairPrior, "probe", fake_probe)
    return calls


def test_cache_hit_on_second_call(tmp_path, counted_probe, caplog):
    model = small_model()
    probe = FairPrior(n_probe=4, window=8, cache_dir=str(tmp_path / "cache"), progress=False)
    first = probe.estimate(model, PROMPTS)
    files = list((tmp_path / "cache").glob("prior-*.json"))
    assert len(counted_probe) == 1 and len(files) == 1 and files[0].name == f"prior-{first.key}.json"
    with caplog.at_level(logging.INFO, logger="fair_calib.prior.fair"):
        second = FairPrior(n_probe=4, window=8, cache_dir=str(tmp_path / "cache"), progress=False).estimate(
            model, PROMPTS)
    assert len(counted_probe) == 1
    assert f"prior cache hit: {files[0]}" in caplog.text
    assert torch.equal(second.frontier_hits_raw, first.frontier_hits_raw) and second.key == first.key
    # force re-probes
    FairPrior(n_probe=4, window=8, cache_dir=str(tmp_path / "cache"), force=True, progress=False).estimate(
        model, PROMPTS)
    assert len(counted_probe) == 2


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"frontier_hits": "abc"}', '{"frontier_hits": [1', "\x00\xff"])
def test_corrupt_prior_cache_is_logged_and_probed_again(tmp_path, counted_probe, caplog, content):
    """A truncated, foreign or wrong-type cache entry is never trusted: logged, re-probed and overwritten."""
    model = small_model()
    first = FairPrior(n_probe=4, window=8, cache_dir=str(tmp_path), progress=False).estimate(model, PROMPTS)
    path = tmp_path / f"prior-{first.key}.json"
    path.write_text(content, errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="fair_calib.prior.fair"):
        again = FairPrior(n_probe=4, window=8, cache_dir=str(tmp_path), progress=False).estimate(model, PROMPTS)
    assert len(counted_probe) == 2 and f"prior cache {path} unreadable" in caplog.text
    assert torch.equal(again.frontier_hits_raw, first.frontier_hits_raw)
    assert json.loads(path.read_text())  # rewritten whole


@pytest.mark.parametrize("change", ["weights", "schedule", "seed", "score", "sampler", "prompts", "n_probe"])
def test_cache_misses_when_a_key_input_changes(tmp_path, counted_probe, change):
    model = small_model()
    kw = dict(n_probe=4, window=8, cache_dir=str(tmp_path), progress=False)
    base = FairPrior(**kw).estimate(model, PROMPTS)
    prompts = list(PROMPTS)
    if change == "weights":
        with torch.no_grad():
            model.blocks[0].role("q").weight[0, 0] += 1e-3
    elif change == "schedule":
        kw["schedule"] = "late"
    elif change == "seed":
        kw["seed"] = 1
    elif change == "score":
        kw["score"] = "margin"
    elif change == "sampler":
        kw["sampler"] = {"name": "dream", "alg": "origin"}
    elif change == "prompts":
        prompts[1] = prompts[1].replace("3", "5")
    elif change == "n_probe":
        kw["n_probe"] = 5
    other = FairPrior(**kw).estimate(model, prompts)
    assert len(counted_probe) == 2
    assert other.key != base.key
    assert len(list(tmp_path.glob("prior-*.json"))) == 2


def test_no_cache_dir_always_probes(counted_probe):
    model = small_model()
    FairPrior(n_probe=2, window=4, progress=False).estimate(model, PROMPTS)
    FairPrior(n_probe=2, window=4, progress=False).estimate(model, PROMPTS)
    assert len(counted_probe) == 2


def test_sampler_config_defaults_and_errors():
    p = FairPrior(window=32)
    want = {"name": "llada", "remasking": "random", "gen_length": 32, "steps": 32, "block_length": 32}
    assert {k: p.sampler_cfg[k] for k in want} == want  # plus the sampler's other fields at their defaults
    assert build("decoding", p.sampler_cfg) == build("decoding", want)
    dream = FairPrior(window=8, sampler={"name": "dream", "alg": "maskgit_plus"}).sampler_cfg
    assert (dream["gen_length"], dream["steps"], "block_length" in dream) == (8, 8, False)
    with pytest.raises(ConfigError, match="prior.sampler: block_length 3 does not divide"):
        FairPrior(window=8, sampler={"name": "llada", "block_length": 3})  # refused at construction
    p = FairPrior(window=8, gen_length=16, steps=8, sampler={"name": "llada", "remasking": "random",
                                                              "block_length": 8})
    assert (p.sampler_cfg["gen_length"], p.sampler_cfg["steps"], p.sampler_cfg["block_length"]) == (16, 8, 8)
    with pytest.raises(ConfigError, match="gen_length"):
        FairPrior(window=32, gen_length=16)
    with pytest.raises(ConfigError, match="schedule"):
        FairPrior(schedule="middle")
    with pytest.raises(ConfigError, match="score"):
        FairPrior(score="logit")


def test_registry_entries():
    assert isinstance(build("prior", {"name": "fair", "n_probe": 8, "window": 4}), FairPrior)
    assert build("prior", {"name": "none"}) is None


# ---- end to end on a random model ----------------------------------------------------------------
@pytest.mark.parametrize("family,score", [("llada", "prob"), ("dream", "margin")])
def test_estimate_end_to_end(tmp_path, family, score):
    torch.set_num_threads(1)
    model = small_model(family)
    # 6 rollouts over 3 prompts in batches of 4 (a partial last batch); G = steps = K = 8, one commit per step
    probe = FairPrior(n_probe=6, window=8, batch_size=4, score=score, cache_dir=str(tmp_path / "c"), progress=False)
    prior = probe.estimate(model, PROMPTS, out_dir=tmp_path / "run")
    k, n, t = 8, 6, 8
    assert prior.window == k and prior.n_rollouts == n and prior.n_steps == 2 * t
    assert torch.isfinite(prior.frontier_hits_raw).all() and torch.isfinite(prior.masked_reliability_raw).all()
    # every position is committed exactly once per rollout: sum F = n * sum_t lambda0(t) = 6 * (8 + 4)
    assert prior.frontier_hits_raw.sum().item() == pytest.approx(n * lambda0(t, "early").sum().item())
    assert ((prior.frontier_hits_raw >= n * 1.0) & (prior.frontier_hits_raw <= n * 2.0)).all()
    # each (row, step) adds 1 at its sharpest masked position and at most 1 per masked position
    r_sum = prior.masked_reliability_raw.sum().item()
    assert n * t <= r_sum <= n * sum(k - s for s in range(t))
    assert prior.frontier_hits.mean().item() == pytest.approx(1.0)
    assert prior.masked_reliability.mean().item() == pytest.approx(1.0)
    for name in ("prior.json", "prior.csv", "prior.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0


def test_flat_schedule_random_policy_hits_each_position_once_per_rollout():
    prior = FairPrior(n_probe=3, window=4, schedule="flat", batch_size=2, progress=False).probe(small_model(), PROMPTS)
    assert prior.frontier_hits_raw.tolist() == [3.0, 3.0, 3.0, 3.0]


def test_probe_is_deterministic_given_seed():
    model = small_model()
    a = FairPrior(n_probe=3, window=4, batch_size=2, progress=False).probe(model, PROMPTS)
    b = FairPrior(n_probe=3, window=4, batch_size=2, progress=False).probe(model, PROMPTS)
    assert torch.equal(a.frontier_hits_raw, b.frontier_hits_raw)
    assert torch.equal(a.masked_reliability_raw, b.masked_reliability_raw)


def test_estimate_neg_entropy_end_to_end():
    prior = FairPrior(n_probe=2, window=4, score="neg_entropy", progress=False).probe(small_model(), PROMPTS)
    assert torch.isfinite(prior.masked_reliability_raw).all()
