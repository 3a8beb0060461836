"""LLaDA and Dream samplers: schedules, block structure, commit-once invariants, policies, traces, config errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MASK_ID, PAD_ID, VOCAB, make_tiny

from fair_calib.decoding.base import DecodingConfigError, GenerationOutput, left_pad
from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler, add_gumbel_noise, num_transfer_tokens
from fair_calib.decoding.trace import CommitTrace, sharpness_scores
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError, build

PROMPT = torch.tensor([[11, 12, 13, 14, 15], [40, 41, 42, 43, 44]])


def _run(sampler, model: DiffusionLM, prompt: torch.Tensor = PROMPT, mask: torch.Tensor | None = None,
         seed: int = 0) -> tuple[GenerationOutput, list[torch.Tensor]]:
    """Generate with a trace and also record the canvas x the model saw at every forward call."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        out = sampler.generate(model, prompt, mask, record_trace=True, generator=torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
    return out, seen


def _check_commit_invariants(out: GenerationOutput, seen: list[torch.Tensor], prompt_len: int) -> None:
    """Every answer position committed exactly once, committed tokens never change, trace states = real canvases."""
    tr = out.trace
    assert tr is not None and tr.num_steps == len(seen)
    committed = tr.stacked("committed")
    assert committed.sum(0).eq(1).all(), "every position is committed exactly once"
    assert not (out.tokens == MASK_ID).any()
    for t, x in enumerate(seen):
        ans = x[: out.tokens.shape[0], prompt_len:]  # cfg doubles the batch: the first half is the conditional one
        assert torch.equal(ans, tr.state(t)), f"trace state {t} differs from the canvas the model saw"
        done = ans != MASK_ID
        # what is already committed is final: equal to the output tokens, and it is never re-committed
        assert torch.equal(ans[done], out.tokens[done])
        assert not committed[t][done].any()


# ---- LLaDA -----------------------------------------------------------------------------------------
def test_num_transfer_tokens_hand_values() -> None:
    # 10 masks over 4 steps: 10 = 4 * 2 + 2 -> the first two steps take one more
    assert num_transfer_tokens(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    assert num_transfer_tokens(torch.tensor([8, 3, 0]), 4).tolist() == [[2, 2, 2, 2], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_llada_is_deterministic_at_temperature_zero(tiny_llada: DiffusionLM) -> None:
    s = LLaDASampler(gen_length=8, steps=4, block_length=4)
    a = s.generate(tiny_llada, PROMPT, generator=torch.Generator().manual_seed(0)).tokens
    b = s.generate(tiny_llada, PROMPT, generator=torch.Generator().manual_seed(123)).tokens
    assert torch.equal(a, b) and a.shape == (2, 8)


def test_llada_one_block_schedule(tiny_llada: DiffusionLM) -> None:
    out, seen = _run(LLaDASampler(gen_length=10, steps=4, block_length=10), tiny_llada)
    counts = out.trace.stacked("committed").sum(-1)  # (T, B)
    assert counts.T.tolist() == [[3, 3, 2, 2], [3, 3, 2, 2]]
    _check_commit_invariants(out, seen, PROMPT.shape[1])


def test_llada_blocks_are_semi_autoregressive(tiny_llada: DiffusionLM) -> None:
    """gen 15, blocks of 5, 6 steps: 2 steps per block, 5 masks -> [3, 2] per block; block b only at steps 2b, 2b+1."""
    out, seen = _run(LLaDASampler(gen_length=15, steps=6, block_length=5), tiny_llada)
    tr = out.trace
    assert tr.stacked("committed").sum(-1).T.tolist() == [[3, 2, 3, 2, 3, 2]] * 2
    step = tr.commit_step()
    for b in range(3):
        in_block = step[:, 5 * b: 5 * (b + 1)]
        assert ((in_block == 2 * b) | (in_block == 2 * b + 1)).all()
    # positions after the current block are not eligible: confidence -inf there
    conf = tr.stacked("confidence")
    for t in range(6):
        assert torch.isinf(conf[t][:, 5 * (t // 2 + 1):]).all()
    _check_commit_invariants(out, seen, PROMPT.shape[1])


def test_llada_commits_the_most_confident(tiny_llada: DiffusionLM) -> None:
    out, _ = _run(LLaDASampler(gen_length=8, steps=4, block_length=8), tiny_llada)
    tr = out.trace
    for t in range(tr.num_steps):
        conf, com = tr.confidence[t], tr.committed[t]
        for row in range(2):
            # the lowest committed confidence is at least the highest confidence left masked
            assert conf[row][com[row]].min() >= conf[row][~com[row]].max()
    # at temperature 0 the committed token is the (mask-suppressed) argmax at its commit step
    step = tr.commit_step()
    top1 = tr.stacked("top1")
    chosen = top1.gather(0, step[None]).squeeze(0)
    assert torch.equal(chosen, out.tokens)


def test_llada_random_remasking_and_temperature(tiny_llada: DiffusionLM) -> None:
    s = LLaDASampler(gen_length=8, steps=4, block_length=4, remasking="random", temperature=1.0)
    out, seen = _run(s, tiny_llada, seed=1)
    assert out.trace.stacked("committed").sum(-1).T.tolist() == [[2, 2, 2, 2]] * 2
    _check_commit_invariants(out, seen, PROMPT.shape[1])
    again, _ = _run(s, tiny_llada, seed=1)
    assert torch.equal(out.tokens, again.tokens)  # same generator seed -> same sample


def test_llada_cfg_guidance(tiny_llada: DiffusionLM) -> None:
    s = LLaDASampler(gen_length=4, steps=4, block_length=4, cfg_scale=1.5)
    out, seen = _run(s, tiny_llada)
    assert seen[0].shape == (4, 9)  # conditional + unconditional rows in one batch
    assert (seen[0][2:, :5] == MASK_ID).all() and torch.equal(seen[0][:2, :5], PROMPT)
    _check_commit_invariants(out, seen, PROMPT.shape[1])
    # first step's top-1 is the argmax of un + (cfg + 1) * (cond - un) with the mask token excluded
    x = torch.cat([PROMPT, torch.full((2, 4), MASK_ID)], 1)
    un = x.clone()
    un[:, :5] = MASK_ID
    with torch.no_grad():
        cond, unc = tiny_llada(x), tiny_llada(un)
    guided = unc + 2.5 * (cond - unc)
    guided[..., MASK_ID] = -math.inf
    assert torch.equal(out.trace.top1[0], guided[:, 5:].argmax(-1))


def test_fast_dllm_threshold(tiny_llada: DiffusionLM) -> None:
    thr = 0.03  # a random 128-token model has top-1 probabilities around 0.01..0.1
    out, seen = _run(LLaDASampler(gen_length=12, steps=3, block_length=4, threshold=thr), tiny_llada)
    tr = out.trace
    counts = tr.stacked("committed").sum(-1)
    assert (counts >= 1).all(), "Fast-dLLM commits at least one position per row and step"
    _check_commit_invariants(out, seen, PROMPT.shape[1])
    for t in range(tr.num_steps):
        conf, com = tr.confidence[t], tr.committed[t]
        best = torch.zeros_like(com)
        best[torch.arange(2), conf.argmax(-1)] = True
        # committed = {masked in-block positions with confidence >= threshold} plus the most confident one
        assert torch.equal(com, (conf >= thr) | best)
    # each block is finished before the next starts, and no step runs after the last block is done
    step = tr.commit_step()
    for b in range(2):
        assert (step[:, 4 * b: 4 * b + 4].amax(1) < step[:, 4 * b + 4: 4 * b + 8].amin(1)).all()
    assert step.max() == tr.num_steps - 1
    assert tr.num_steps < 12  # fewer forward passes than one commit per step would need
    # with threshold 1.0 it degenerates to exactly one commit per step
    one, _ = _run(LLaDASampler(gen_length=4, steps=1, block_length=4, threshold=1.0), tiny_llada)
    assert one.trace.stacked("committed").sum(-1).tolist() == [[1, 1]] * 4


def test_llada_config_errors() -> None:
    with pytest.raises(DecodingConfigError, match="block_length 5 does not divide gen_length 12") as err:
        LLaDASampler(gen_length=12, steps=4, block_length=5)
    assert isinstance(err.value, ConfigError)
    with pytest.raises(DecodingConfigError, match="steps 5 is not a multiple of the number of blocks 3"):
        LLaDASampler(gen_length=12, steps=5, block_length=4)
    with pytest.raises(DecodingConfigError, match="remasking 'lowest' unknown; valid: low_confidence, random"):
        LLaDASampler(gen_length=8, steps=4, block_length=4, remasking="lowest")
    with pytest.raises(DecodingConfigError, match=r"threshold must be in \(0, 1\]"):
        LLaDASampler(gen_length=8, steps=4, block_length=4, threshold=1.5)
    s = LLaDASampler(gen_length=8, steps=4, block_length=4)
    with pytest.raises(DecodingConfigError, match="block_length 4 does not divide gen_length 6"):
        s.generate(make_tiny("llada"), PROMPT, gen_length=6)


def test_gumbel_noise_is_float64_and_identity_at_zero_temperature() -> None:
    logits = torch.randn(3, 5)
    assert add_gumbel_noise(logits, 0.0, None) is logits
    noisy = add_gumbel_noise(logits, 1.0, torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float64 and (noisy > 0).all()


# ---- Dream -----------------------------------------------------------------------------------------
def test_dream_schedule_hand_values(tiny_dream: DiffusionLM) -> None:
    # timesteps linspace(1, 1e-3, 5) = [1, .75025, .5005, .25075, .001]
    # k = int(n * (1 - s/t)): int(8 * .24975) = 1, int(7 * .33289) = 2, int(5 * .49900) = 2, last step: all 3
    out, seen = _run(DreamSampler(gen_length=8, steps=4), tiny_dream)
    assert out.trace.stacked("committed").sum(-1).T.tolist() == [[1, 2, 2, 3]] * 2
    _check_commit_invariants(out, seen, PROMPT.shape[1])


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_ranked_algs(tiny_dream: DiffusionLM, alg: str) -> None:
    out, seen = _run(DreamSampler(gen_length=8, steps=4, alg=alg), tiny_dream)
    tr = out.trace
    _check_commit_invariants(out, seen, PROMPT.shape[1])
    x = torch.cat([PROMPT, torch.full((2, 8), MASK_ID)], 1)
    with torch.no_grad():
        logits = tiny_dream(x)[:, 5:]
    logits[..., MASK_ID] = -math.inf
    p = logits.softmax(-1)
    top2 = p.topk(2, -1).values
    expected = {"maskgit_plus": top2[..., 0], "topk_margin": top2[..., 0] - top2[..., 1],
                "entropy": (p * torch.log(p + 1e-10)).sum(-1)}[alg]
    torch.testing.assert_close(tr.confidence[0], expected, rtol=1e-5, atol=1e-6)
    first = tr.committed[0]
    assert torch.equal(first, expected == expected.amax(-1, keepdim=True))  # step 0 commits the single best


def test_dream_origin_and_alg_temp(tiny_dream: DiffusionLM) -> None:
    out, seen = _run(DreamSampler(gen_length=8, steps=4, alg="origin"), tiny_dream, seed=3)
    _check_commit_invariants(out, seen, PROMPT.shape[1])
    s = DreamSampler(gen_length=8, steps=4, alg="entropy", alg_temp=0.5, temperature=0.7, top_p=0.95, top_k=20)
    out, seen = _run(s, tiny_dream, seed=3)
    assert out.trace.stacked("committed").sum(-1).T.tolist() == [[1, 2, 2, 3]] * 2
    _check_commit_invariants(out, seen, PROMPT.shape[1])
    again, _ = _run(s, tiny_dream, seed=3)
    assert torch.equal(again.tokens, out.tokens)


def test_dream_deterministic_and_config_errors(tiny_dream: DiffusionLM) -> None:
    s = DreamSampler(gen_length=6, steps=3)
    assert torch.equal(s.generate(tiny_dream, PROMPT).tokens, s.generate(tiny_dream, PROMPT).tokens)
    with pytest.raises(DecodingConfigError, match="alg 'greedy' unknown; valid: origin, maskgit_plus"):
        DreamSampler(alg="greedy")
    with pytest.raises(DecodingConfigError, match="must be positive"):
        DreamSampler(steps=0)


# ---- padding and texts -------------------------------------------------------------------------------
def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6, 7], [8], []], PAD_ID)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="no prompts"):
        left_pad([], PAD_ID)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padded_batch_decodes_like_single_rows(family: str) -> None:
    model = make_tiny(family)
    s = LLaDASampler(gen_length=8, steps=8, block_length=4) if family == "llada" else DreamSampler(gen_length=8,
                                                                                                      steps=8)
    prompts = [[20, 21, 22, 23, 24, 25], [30, 31, 32]]
    ids, mask = left_pad(prompts, PAD_ID)
    batched = s.generate(model, ids, mask).tokens
    for row, p in enumerate(prompts):
        assert torch.equal(batched[row], s.generate(model, torch.tensor([p])).tokens[0])


def test_generate_texts(tiny_llada: DiffusionLM) -> None:
    s = LLaDASampler(gen_length=8, steps=4, block_length=8)
    texts, out = s.generate_texts(tiny_llada, ["12+3=", "Ann has 4 pens."], seed=0, record_trace=True)
    assert len(texts) == 2 and out.tokens.shape == (2, 8) and out.trace is not None
    tok = tiny_llada.tokenizer
    for text, row in zip(texts, out.tokens.tolist()):
        cut = row[: row.index(1)] if 1 in row else row  # everything before the first end-of-text token
        assert text == tok.decode(cut, skip_special_tokens=True)


# ---- CommitTrace ------------------------------------------------------------------------------------
def _hand_trace() -> CommitTrace:
    """B = 1, G = 4, T = 3: position 1 at step 0, positions 0 and 2 at step 1, position 3 never."""
    tr = CommitTrace(prompt=torch.tensor([[9, 8]]), prompt_mask=torch.tensor([[1, 1]]), mask_id=MASK_ID)
    logits = torch.zeros(1, 4, VOCAB)
    for step in ([False, True, False, False], [True, False, True, False], [False, False, False, False]):
        tr.record(torch.tensor([step]), torch.tensor([[0.5, 0.9, 0.1, 0.2]]), logits)
    tr.tokens = torch.tensor([[70, 71, 72, MASK_ID]])
    return tr


def test_commit_trace_helpers() -> None:
    tr = _hand_trace()
    assert (tr.num_steps, tr.batch_size, tr.gen_length) == (3, 1, 4)
    assert tr.commit_step().tolist() == [[1, 0, 1, -1]]
    assert tr.masked_before()[:, 0].tolist() == [[True] * 4, [True, False, True, True], [False, False, False, True]]
    assert tr.state(0).tolist() == [[MASK_ID] * 4]
    assert tr.state(1).tolist() == [[MASK_ID, 71, MASK_ID, MASK_ID]]
    assert tr.state(2).tolist() == [[70, 71, 72, MASK_ID]]
    assert tr.full_state(1).tolist() == [[9, 8, MASK_ID, 71, MASK_ID, MASK_ID]]
    assert tr.stacked("committed").shape == (3, 1, 4) and tr.stacked("confidence").dtype == torch.float32
    # uniform logits: top-1 prob 1/V, entropy log V, margin 0
    torch.testing.assert_close(tr.stacked("prob"), torch.full((3, 1, 4), 1 / VOCAB))
    torch.testing.assert_close(tr.stacked("neg_entropy"), torch.full((3, 1, 4), -math.log(VOCAB)))
    assert tr.stacked("margin").eq(0).all()


def test_sharpness_scores_hand_values() -> None:
    p = torch.tensor([0.5, 0.3, 0.2])
    s = sharpness_scores(p.log())
    torch.testing.assert_close(s["prob"], torch.tensor(0.5))
    torch.testing.assert_close(s["margin"], torch.tensor(0.2))
    torch.testing.assert_close(s["neg_entropy"], torch.tensor(0.5 * math.log(0.5) + 0.3 * math.log(0.3)
                                                              + 0.2 * math.log(0.2)))
    # samplers set the mask token's logit to -inf: 0 * log 0 counts as 0, not NaN
    masked = sharpness_scores(torch.tensor([0.5, 0.3, 0.0, 0.2]).log())
    for k in ("prob", "neg_entropy", "margin"):
        torch.testing.assert_close(masked[k], s[k])


def test_trace_scores_are_finite_in_a_rollout(tiny_llada: DiffusionLM) -> None:
    out, _ = _run(LLaDASampler(gen_length=4, steps=2, block_length=4, cfg_scale=0.5), tiny_llada)
    for k in ("prob", "neg_entropy", "margin"):
        assert torch.isfinite(out.trace.stacked(k)).all(), k


def test_decoding_registry_builds_samplers() -> None:
    s = build("decoding", {"name": "llada", "gen_length": 16, "steps": 8, "block_length": 8, "threshold": None})
    assert isinstance(s, LLaDASampler) and (s.gen_length, s.steps, s.block_length) == (16, 8, 8)
    d = build("decoding", {"name": "dream", "alg": "topk_margin", "steps": 5})
    assert isinstance(d, DreamSampler) and d.alg == "topk_margin" and d.steps == 5
    with pytest.raises(ConfigError, match="block_length 3 does not divide gen_length 64"):
        build("decoding", {"name": "llada", "block_length": 3})
