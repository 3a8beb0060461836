"""The Monte Carlo masked likelihood against the exact ELBO, enumerated on a toy model with input-dependent logits.

ELBO(x_ans | ctx) = (1/L) sum_{m=1..L} C(L, m)^-1 sum_{|M| = m} (L / m) sum_{i in M} log p(x_i | x with M masked)
(uniform mask count m, uniform positions given m; the prompt never masked). The estimator draws
exactly these (stratified m, random positions), so it is unbiased for this value.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn

from fair_calib.benchmark.lm import (
    answer_logits,
    greedy_unmask,
    mc_loglikelihood,
    mc_masks,
    official_mask_counts,
    official_masks,
    rolling_windows,
    stratified_mask_counts,
)
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError

MASK = 2  # tiny_config's mask id; the toy vocabulary is {0 pad, 1 eot, 2 mask, 3, 4, 5}
VOCAB = 6


class PairwiseLM(DiffusionLM):
    """logits(t) = base[t] + sum_{s != t, x_s visible} inter[t, s, x_s]: predictions depend on what is unmasked."""

    def __init__(self, length: int, seed: int = 0, scale: float = 1.5) -> None:
        super().__init__(tiny_config("llada", vocab_size=VOCAB))
        g = torch.Generator().manual_seed(seed)
        self.base = nn.Parameter(torch.randn(length, VOCAB, generator=g) * scale)
        self.inter = nn.Parameter(torch.randn(length, length, VOCAB, VOCAB, generator=g) * scale)
        self.wte = nn.Embedding(VOCAB, 2)
        self.inputs: list[Tensor] = []

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.wte

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.inputs.append(ids.clone())
        b, n = ids.shape
        logits = self.base[:n].expand(b, -1, -1).clone()
        for t in range(n):
            for s in range(n):
                if s != t:
                    visible = ids[:, s] != MASK
                    logits[:, t] += visible[:, None] * self.inter[t, s, ids[:, s]]
        return logits.detach()


def exact_elbo(model: DiffusionLM, context: list[int], answer: list[int], cfg_scale: float = 0.0) -> float:
    """Enumerate every mask pattern of the answer (never the context) with its probability under the estimator."""
    p, length = len(context), len(answer)
    seq = torch.tensor([context + answer])
    total = 0.0
    for m in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), m))
        for subset in subsets:
            x = seq.clone()
            x[0, [p + i for i in subset]] = MASK
            logits = model(x)
            if cfg_scale > 0:  # written out here independently of answer_logits
                un = x.clone()
                un[0, :p] = MASK
                logits = model(un) + (cfg_scale + 1) * (logits - model(un))
            logp = torch.log_softmax(logits[0].double(), -1)
            term = sum(logp[p + i, answer[i]].item() for i in subset) * length / m
            total += term / (length * len(subsets))
    return total


CASES = [([3], [4]), ([3, 5], [4, 5]), ([5, 3, 4], [3, 5, 4])]  # (context, answer): answers of 1, 2 and 3 tokens


@pytest.mark.parametrize(("context", "answer"), CASES, ids=["L1", "L2", "L3"])
def test_estimate_converges_to_the_enumerated_elbo(context: list[int], answer: list[int]) -> None:
    model = PairwiseLM(len(context) + len(answer))
    exact = exact_elbo(model, context, answer)
    errors = {}
    for n in (16, 256, 8192):
        est = mc_loglikelihood(model, context, answer, mc_num=n, mc_batch_size=64,
                               generator=torch.Generator().manual_seed(1))
        errors[n] = abs(est - exact)
    if len(answer) == 1:
        assert max(errors.values()) < 1e-5  # one token (float32): every sample is the exact log-probability
    else:
        # the per-sample spread is O(1) nats here, so 8192 samples are within a few hundredths
        assert errors[8192] < 0.03 * abs(exact) and errors[8192] < 0.1
        assert errors[8192] < errors[16] or errors[16] < 0.01


def test_l2_estimate_with_even_mc_num_has_only_position_noise() -> None:
    # L = 2, n even: exactly n/2 samples mask both tokens (a deterministic term) and n/2 mask one token
    context, answer = [3, 5], [4, 5]
    model = PairwiseLM(4, seed=3)
    seq = torch.tensor([context + answer])
    logp = {}
    for subset in ([0], [1], [0, 1]):
        x = seq.clone()
        x[0, [2 + i for i in subset]] = MASK
        lp = torch.log_softmax(model(x)[0].double(), -1)
        logp[tuple(subset)] = sum(lp[2 + i, answer[i]].item() for i in subset)
    exact = 0.5 * (2 * logp[(0,)] + 2 * logp[(1,)]) / 2 + 0.5 * logp[(0, 1)]
    assert exact_elbo(model, context, answer) == pytest.approx(exact, abs=1e-9)
    # every single-token sample is 2 * logp[(0,)] or 2 * logp[(1,)]: the estimate lies on the segment between
    est = mc_loglikelihood(model, context, answer, mc_num=64, generator=torch.Generator().manual_seed(0))
    lo, hi = sorted((logp[(0,)], logp[(1,)]))
    assert 0.5 * logp[(0, 1)] + lo - 1e-5 <= est <= 0.5 * logp[(0, 1)] + hi + 1e-5


def test_guided_estimate_converges_to_the_guided_elbo() -> None:
    context, answer = [3, 5], [4, 5]
    model = PairwiseLM(4, seed=2)
    exact = exact_elbo(model, context, answer, cfg_scale=0.5)
    assert exact != pytest.approx(exact_elbo(model, context, answer), abs=1e-3)  # guidance changes the value
    est = mc_loglikelihood(model, context, answer, mc_num=8192, mc_batch_size=64,
                           generator=torch.Generator().manual_seed(4), cfg_scale=0.5)
    assert est == pytest.approx(exact, abs=0.05)


def test_prompt_never_masked_and_same_seed_same_number() -> None:
    context, answer = [5, 3, 4], [3, 5, 4]
    model = PairwiseLM(6, seed=1)
    est = [mc_loglikelihood(model, context, answer, 32, 4, torch.Generator().manual_seed(7)) for _ in range(2)]
    x = torch.cat(model.inputs)
    assert est[0] == est[1]
    assert mc_loglikelihood(model, context, answer, 32, 4, torch.Generator().manual_seed(8)) != est[0]
    assert torch.equal(x[:, :3], torch.tensor(context).expand(len(x), -1))
    assert ((x[:, 3:] == MASK).sum(1) >= 1).all()
    # guidance masks the prompt only in the unconditional branch
    model.inputs.clear()
    answer_logits(model, torch.tensor([context + [MASK] * 3]), 3, cfg_scale=1.0)
    both = model.inputs[0]
    assert both.shape == (2, 6) and both[0, :3].tolist() == context and (both[1, :3] == MASK).all()


def test_greedy_unmask_follows_the_most_confident_position() -> None:
    model = PairwiseLM(4, seed=5)
    context = [3, 5]
    out = greedy_unmask(model, context, 2)
    # by hand: both masked -> most confident position takes its argmax, then the other given it
    x = torch.tensor([context + [MASK, MASK]])
    probs = torch.softmax(model(x)[0, 2:].double().index_fill(1, torch.tensor([MASK]), -math.inf), -1)
    first = int(probs.max(-1).values.argmax())
    x[0, 2 + first] = int(probs[first].argmax())
    second = 1 - first
    probs2 = torch.softmax(model(x)[0, 2:].double().index_fill(1, torch.tensor([MASK]), -math.inf), -1)
    x[0, 2 + second] = int(probs2[second].argmax())
    assert out == x[0, 2:].tolist() and MASK not in out


def test_rolling_windows() -> None:
    toks = list(range(10))
    assert rolling_windows(toks, 4) == [([], [0, 1, 2, 3]), ([], [4, 5, 6, 7]), ([], [8, 9])]
    assert rolling_windows(toks, 4, 3) == [([], [0, 1, 2, 3]), ([1, 2, 3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows(toks, 16) == [([], toks)]
    assert rolling_windows([], 4) == []


# ---- the mask-count distribution of both estimators, against enumeration ------------------------------
def exact_elbo_by_count(model: DiffusionLM, context: list[int], answer: list[int]) -> list[float]:
    """E[(L / m) sum_{i in M} log p(x_i | x_M masked) | |M| = m] for m = 1..L, enumerating every subset."""
    p, length = len(context), len(answer)
    seq = torch.tensor([context + answer])
    out = []
    for m in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), m))
        total = 0.0
        for subset in subsets:
            x = seq.clone()
            x[0, [p + i for i in subset]] = MASK
            logp = torch.log_softmax(model(x)[0].double(), -1)
            total += sum(logp[p + i, answer[i]].item() for i in subset) * length / m
        out.append(total / len(subsets))
    return out


def _by_hand_official(length: int, b: int, k: int) -> list[int]:
    """LLaDA forward_process counts from start k in exact rationals: round-half-even(k + j L / b), wrapped."""
    return [(round(Fraction(k) + Fraction(j * length, b)) - 1) % length + 1 for j in range(b)]


def _by_hand_stratified(length: int, n: int, k: int) -> list[int]:
    return [(k - 1 + (j * length) // n) % length + 1 for j in range(n)]


def _distribution(counts_of_start, length: int) -> list[Fraction]:
    """P(m) for m = 1..L of one drawn count: the start k uniform on 1..L, the slot j uniform."""
    hits = [0] * (length + 1)
    for k in range(1, length + 1):
        for m in counts_of_start(k):
            hits[m] += 1
    total = sum(hits)
    return [Fraction(h, total) for h in hits[1:]]


def _tv_from_uniform(p: list[Fraction]) -> Fraction:
    return sum(abs(q - Fraction(1, len(p))) for q in p) / 2


@pytest.mark.parametrize("length", range(1, 21))
def test_mask_count_distributions_match_enumeration(length: int) -> None:
    b = 16
    for k in range(1, length + 1):
        assert official_mask_counts(length, b, k).tolist() == _by_hand_official(length, b, k), k
        assert stratified_mask_counts(length, b, start=k).tolist() == _by_hand_stratified(length, b, k), k
    stratified = _distribution(lambda k: stratified_mask_counts(length, b, start=k).tolist(), length)
    official = _distribution(lambda k: official_mask_counts(length, b, k).tolist(), length)
    assert stratified == [Fraction(1, length)] * length  # exactly uniform: the ELBO's weighting, unbiased
    assert official == _distribution(lambda k: _by_hand_official(length, b, k), length)
    # round-half-even makes the official counts non-uniform whenever j L / b hits a half: even L not dividing b
    tv = _tv_from_uniform(official)
    expected_tv = {2: Fraction(1, 16), 4: Fraction(1, 8), 8: Fraction(1, 4), 16: Fraction(0)}
    if length in expected_tv:
        assert tv == expected_tv[length]
    assert tv <= Fraction(1, 4)
    assert (tv == 0) == (length in (1, 16))


def test_official_masks_follow_the_reference_draw_order() -> None:
    """Per batch: one start k from randint, then one randperm per row; row j masks positions with perm < m_j."""
    length, mc_num, b = 7, 32, 16
    masks = official_masks(length, mc_num, b, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(mc_num // b):
        k = int(torch.randint(1, length + 1, (), generator=g))
        for m in _by_hand_official(length, b, k):
            rows.append(torch.randperm(length, generator=g) < m)
    assert torch.equal(masks, torch.stack(rows))
    with pytest.raises(ConfigError, match="mc_num=24 is not a multiple of mc_batch_size=16"):
        official_masks(length, 24, b)
    with pytest.raises(ConfigError, match="benchmark.estimator='exact' unknown; valid: stratified, official"):
        mc_masks(length, 16, estimator="exact")


def test_official_estimator_is_biased_where_its_counts_are_not_uniform() -> None:
    """At L = 8 (TV 0.25 from uniform) the official estimator's expectation is not the ELBO; stratified's is."""
    context, answer = [3], [4, 5, 3, 4, 5, 3, 4, 5]
    model = PairwiseLM(len(context) + len(answer), scale=0.8)
    exact = exact_elbo_by_count(model, context, answer)
    length = len(answer)
    uniform = sum(exact) / length
    official_p = _distribution(lambda k: official_mask_counts(length, 16, k).tolist(), length)
    official_mean = sum(float(p) * e for p, e in zip(official_p, exact))
    assert abs(official_mean - uniform) > 1e-3 * abs(uniform)  # a systematic shift, not noise
