"""The CI math on hand-computed cases: bootstrap CIs, paired differences, MDD, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fair_calib import stats
from fair_calib.stats import (
    Difference,
    Estimate,
    bootstrap_ci,
    bootstrap_ci_mean_of_means,
    bootstrap_p_value,
    docs_needed,
    mdd,
    mdd_mean_of_means,
    paired_bootstrap,
    paired_bootstrap_mean_of_means,
)


def test_constant_scores_give_a_zero_width_ci_at_the_value():
    est = bootstrap_ci(np.full(300, 0.7), n_resamples=500)
    assert isinstance(est, Estimate)
    assert est.mean == pytest.approx(0.7, abs=1e-15)
    assert est.ci_low == est.ci_high == pytest.approx(0.7, abs=1e-15)
    assert (est.n_docs, est.n_seeds, est.sd_seeds) == (300, 1, None)


def test_binary_scores_ci_matches_the_normal_approximation():
    n, k = 4000, 1200  # p = 0.3
    scores = np.zeros(n)
    scores[:k] = 1.0
    est = bootstrap_ci(scores, n_resamples=4000, seed=3)
    p = k / n
    half = 1.959964 * math.sqrt(p * (1 - p) / n)  # 0.0142
    assert est.mean == pytest.approx(p)
    assert est.ci_low == pytest.approx(p - half, abs=0.0015)
    assert est.ci_high == pytest.approx(p + half, abs=0.0015)


def test_confidence_level_orders_the_intervals():
    scores = np.random.default_rng(0).random(200)
    wide = bootstrap_ci(scores, confidence=0.99)
    narrow = bootstrap_ci(scores, confidence=0.5)
    assert wide.ci_low < narrow.ci_low < narrow.mean < narrow.ci_high < wide.ci_high


def test_seeded_calls_are_identical_bit_for_bit_and_seeds_differ():
    x = np.random.default_rng(1).random((3, 250))
    y = x.copy()
    assert bootstrap_ci(x, seed=7) == bootstrap_ci(y, seed=7)
    assert paired_bootstrap(x, y[::-1], seed=7) == paired_bootstrap(x, y[::-1], seed=7)
    assert bootstrap_ci(x, seed=7).ci_low != bootstrap_ci(x, seed=8).ci_low


def test_two_seeds_report_the_sd_of_the_per_seed_means_and_widen_the_ci():
    docs = np.random.default_rng(2).random(400)
    runs = np.stack([docs, docs + 0.1])  # per-seed means differ by exactly 0.1
    est = bootstrap_ci(runs, seed=0)
    assert est.n_seeds == 2 and est.n_docs == 400
    assert est.mean == pytest.approx(docs.mean() + 0.05)
    assert est.sd_seeds == pytest.approx(0.1 / math.sqrt(2))  # sample sd (ddof=1) of {m, m + 0.1}
    one = bootstrap_ci(docs, seed=0)
    # seed resampling adds the between-seed spread: some resamples pick seed 0 twice, some seed 1 twice
    assert est.ci_high - est.ci_low > one.ci_high - one.ci_low + 0.03


def test_identical_seed_rows_match_the_one_seed_ci():
    docs = np.random.default_rng(4).random(150)
    three = bootstrap_ci(np.stack([docs] * 3), seed=5)
    one = bootstrap_ci(docs, seed=5)
    assert three.sd_seeds == 0.0
    assert three.ci_low == pytest.approx(one.ci_low) and three.ci_high == pytest.approx(one.ci_high)


def test_a_constant_shift_is_an_exact_difference_with_zero_width_ci():
    a = np.random.default_rng(5).random(500)
    d = paired_bootstrap(a, a - 0.05, n_resamples=1000)
    assert isinstance(d, Difference)
    assert d.mean == pytest.approx(0.05, abs=1e-12)
    assert d.ci_low == pytest.approx(0.05, abs=1e-12) and d.ci_high == pytest.approx(0.05, abs=1e-12)
    assert d.p_value == pytest.approx(1 / 1001)
    assert d.significant and d.n_docs == 500


def test_identical_methods_have_a_ci_at_zero_and_p_one():
    a = np.random.default_rng(6).random((2, 300))
    d = paired_bootstrap(a[:1], a[:1])
    assert d.mean == 0.0 and d.ci_low <= 0.0 <= d.ci_high
    assert d.p_value == 1.0 and not d.significant


def test_pairing_narrows_the_ci_for_correlated_methods():
    rng = np.random.default_rng(7)
    a = (rng.random(400) < 0.6).astype(float)
    b = a.copy()
    b[:12] = 1.0 - b[:12]  # b disagrees with a on 12 of 400 documents
    paired = paired_bootstrap(a, b, seed=1)
    ea, eb = bootstrap_ci(a, seed=1), bootstrap_ci(b, seed=2)
    unpaired_half = math.hypot((ea.ci_high - ea.ci_low) / 2, (eb.ci_high - eb.ci_low) / 2)
    assert paired.mean == pytest.approx(a.mean() - b.mean())
    assert (paired.ci_high - paired.ci_low) / 2 < unpaired_half / 3


def test_p_value_rule_on_a_hand_made_bootstrap_distribution():
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.5)  # 2 * min(1/4, 3/4)
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.25)  # clipped to 1/(B+1)
    assert bootstrap_p_value(np.array([-1.0, 1.0])) == 1.0
    assert bootstrap_p_value(np.array([0.0, 0.0])) == 1.0


def test_p_value_is_small_for_a_clear_difference_and_large_for_noise():
    rng = np.random.default_rng(8)
    a = rng.random(500)
    clear = paired_bootstrap(a + 0.1 + 0.01 * rng.standard_normal(500), a)
    noise = paired_bootstrap(a + 0.05 * rng.standard_normal(500), a)
    assert clear.significant and clear.p_value < 0.001
    assert noise.p_value > 0.05 or noise.significant  # p and CI agree
    assert noise.significant == (noise.p_value < 0.05)


def test_two_methods_may_have_different_seed_counts():
    rng = np.random.default_rng(9)
    a, b = rng.random((3, 200)), rng.random((1, 200))
    d = paired_bootstrap(a, b)
    assert d.mean == pytest.approx(a.mean() - b.mean())
    assert d.ci_low < d.mean < d.ci_high


def test_mean_of_means_weighs_tasks_equally_and_pairs_per_task():
    t1, t2 = np.full(100, 1.0), np.zeros(10)
    est = bootstrap_ci_mean_of_means([t1, t2])
    assert est.mean == 0.5 and est.ci_low == est.ci_high == 0.5  # not the pooled 110-doc mean 0.909
    assert est.n_docs == 110
    rng = np.random.default_rng(10)
    a = [rng.random(300), rng.random(50)]
    d = paired_bootstrap_mean_of_means(a, [a[0] - 0.02, a[1] - 0.04], n_resamples=500)
    assert d.mean == pytest.approx(0.03) and d.ci_low == pytest.approx(0.03) and d.ci_high == pytest.approx(0.03)
    one = bootstrap_ci_mean_of_means([a[0]], seed=4)
    assert one == bootstrap_ci(a[0], seed=4)


def test_mdd_and_docs_needed_against_a_hand_calculation():
    diff = np.array([1.0, -1.0] * 50 + [0.0] * 100)  # n = 200, discordance 0.5
    sd = math.sqrt(100 / 199)  # sample sd: sum of squares 100, mean 0
    z = 1.959963984540054 + 0.8416212335729143
    assert mdd(diff) == pytest.approx(z * sd / math.sqrt(200), rel=1e-9)  # ~0.1404
    assert mdd(diff) == pytest.approx(2.8 * math.sqrt(0.5 / 200), rel=0.01)
    assert mdd(diff, power=0.9) > mdd(diff)
    assert docs_needed(diff, 0.05) == math.ceil((z * sd / 0.05) ** 2)  # 1580
    assert mdd(np.tile(diff, 4)) == pytest.approx(mdd(diff) / 2, rel=0.01)
    # the average of two tasks with this spread: sqrt(2 * sd^2 / 200) / 2 = sd / 20
    assert mdd_mean_of_means([diff, diff]) == pytest.approx(z * sd / 20, rel=1e-9)
    assert mdd_mean_of_means([diff]) == pytest.approx(mdd(diff))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_ci([]), "is empty"),
        (lambda: bootstrap_ci(np.zeros((2, 0))), "is empty"),
        (lambda: bootstrap_ci(np.zeros((2, 2, 2))), "1-D .* or 2-D"),
        (lambda: bootstrap_ci([0.5, float("nan")]), "NaN or inf"),
        (lambda: bootstrap_ci([1.0, 0.0], confidence=1.5), r"confidence must be in \(0, 1\)"),
        (lambda: bootstrap_ci([1.0, 0.0], confidence=0.0), r"confidence must be in \(0, 1\)"),
        (lambda: bootstrap_ci([1.0, 0.0], n_resamples=0), "n_resamples must be a positive integer"),
        (lambda: paired_bootstrap(np.zeros(5), np.zeros(4)), "same documents: a has 5, b has 4"),
        (lambda: paired_bootstrap([], []), "a is empty"),
        (lambda: paired_bootstrap([1.0], [1.0], confidence=-0.1), "confidence"),
        (lambda: bootstrap_ci_mean_of_means([]), "no tasks"),
        (lambda: bootstrap_ci_mean_of_means([np.zeros((2, 3)), np.zeros((3, 3))]), "same seeds"),
        (lambda: paired_bootstrap_mean_of_means([np.zeros(3)], [np.zeros(3), np.zeros(3)]), "same tasks"),
        (lambda: paired_bootstrap_mean_of_means([np.zeros(3)], [np.zeros(4)]), "same documents"),
        (lambda: mdd([0.5]), "at least 2 documents"),
        (lambda: mdd(np.zeros((2, 3))), "1-D"),
        (lambda: mdd([0.0, 1.0], power=1.0), "power must be in"),
        (lambda: mdd([0.0, 1.0], alpha=0.0), "alpha must be in"),
        (lambda: docs_needed([0.0, 1.0], 0.0), "target difference must be > 0"),
        (lambda: mdd_mean_of_means([]), "no tasks"),
    ],
)
def test_bad_input_is_a_value_error_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_large_inputs_are_chunked_without_changing_the_result(monkeypatch):
    x = np.random.default_rng(11).random((3, 500))
    whole = bootstrap_ci(x, n_resamples=300)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 3 * 500 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(x, n_resamples=300) == whole


def test_bootstrap_ratio_ci_pools_numerators_and_denominators():
    num, den = [1.0, 0.0, 3.0, 1.0], [2.0, 2.0, 4.0, 0.0]
    low, high = stats.bootstrap_ratio_ci(num, den, n_resamples=4000, seed=1)
    rng = np.random.default_rng(1)  # by hand: the same index draws, ratio of sums per resample
    idx = rng.integers(0, 4, size=(4000, 4))
    n, d = np.asarray(num)[idx].sum(1), np.asarray(den)[idx].sum(1)
    ref = np.quantile(n[d != 0] / d[d != 0], [0.025, 0.975])
    assert (low, high) == pytest.approx(tuple(ref))
    assert low <= sum(num) / sum(den) <= high
    with pytest.raises(ValueError, match="same non-zero length"):
        stats.bootstrap_ratio_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="zero denominator"):
        stats.bootstrap_ratio_ci([1.0, 2.0], [0.0, 0.0])
