"""tinyreason generators: arithmetic is right, layouts are fixed-width, splits are disjoint and seeded."""

from __future__ import annotations

import re

import pytest

from fair_calib.data.tinyreason import (
    ADD_VERBS,
    ITEMS,
    NAMES,
    SUB_VERBS,
    Difficulty,
    examples,
    extract_answer,
    iter_examples,
    split_of,
)


def test_addition_sums_and_zero_padding():
    for ex in examples("addition", "test", 200):
        m = re.fullmatch(r"(\d\d)\+(\d\d)=", ex.prompt)
        assert m, ex.prompt
        assert ex.answer == ex.target == f"{int(m[1]) + int(m[2]):03d}"


def test_word_problem_steps_are_correct_and_fixed_width():
    assert len({len(w) for w in NAMES}) == len({len(w) for w in ITEMS}) == 1
    assert len({len(w) for w in ADD_VERBS + SUB_VERBS}) == 1
    d = Difficulty()
    verbs = "|".join(ADD_VERBS + SUB_VERBS)
    for ex in examples("word_problems", "test", 300):
        lines = ex.answer.split("\n")
        n_steps = len(lines) - 1
        assert d.wp_min_steps <= n_steps <= d.wp_max_steps
        value = int(re.search(r"has (\d) ", ex.prompt)[1])
        found = re.findall(r" (" + verbs + r") (\d)\.", ex.prompt)
        assert len(found) == n_steps
        for line, (verb, n) in zip(lines[:-1], found):
            m = re.fullmatch(r"(\d)([+-])(\d)=(\d)", line)
            assert m, line
            assert int(m[1]) == value and m[3] == n and (m[2] == "+") == (verb in ADD_VERBS)
            value = value + int(n) if m[2] == "+" else value - int(n)
            assert int(m[4]) == value and 0 <= value <= d.wp_max_value  # every value stays one digit
        assert lines[-1] == f"#### {value}" and ex.target == f"{value}"
        assert extract_answer(ex.answer) == ex.target
        # every number of the prompt sits at the same offset in all problems of this many steps
        assert [m.start() for m in re.finditer(r"\d", ex.prompt)] == [8] + [25 + 12 * i for i in range(n_steps)]


def test_word_problems_cover_every_answer_and_both_operations():
    exs = examples("word_problems", "test", 500)
    assert {ex.target for ex in exs} == {str(v) for v in range(10)}
    ops = [line[1] for ex in exs for line in ex.answer.split("\n")[:-1]]
    assert 0.35 < ops.count("+") / len(ops) < 0.65


def test_word_problems_copy_at_fixed_distances():
    # a fixed step count makes prompt and answer lengths constant, so every answer digit copies from
    # the same relative offset in every problem (what the shipped models' attention has to learn)
    exs = examples("word_problems", "test", 200)
    assert {len(ex.prompt) for ex in exs} == {55} and {len(ex.answer) for ex in exs} == {18}
    for ex in exs:
        text = ex.prompt + ex.answer
        assert text[55] == text[8]        # step 1 restates the starting value
        assert text[57] == text[25]       # ... and the first operand
        assert text[61] == text[59]       # step 2 starts from step 1's result
        assert text[63] == text[37]       # ... with the second operand
        assert text[72] == text[65]       # the #### line copies step 2's result


def test_compare_label_points_at_the_right_choice():
    for ex in examples("compare", "test", 200):
        a, b = (int(c) for c in ex.choices)
        want = max(a, b) if "larger" in ex.prompt else min(a, b)
        assert int(ex.choices[ex.label]) == want and ex.target == ex.choices[ex.label]
        assert all(len(c) == 3 for c in ex.choices)


@pytest.mark.parametrize("task", ["addition", "word_problems", "compare"])
def test_splits_are_disjoint_seeded_and_distinct(task):
    test = examples(task, "test", 150)
    calib = examples(task, "calibration", 150)
    assert {e.prompt for e in test}.isdisjoint(e.prompt for e in calib)
    assert all(split_of(e.prompt) == "test" for e in test)
    assert len({e.prompt for e in test}) == 150  # evaluation splits never repeat a prompt
    assert examples(task, "test", 150) == test
    assert examples(task, "test", 20, seed=1) != test[:20]
    train = iter_examples(task, "train")
    assert all(split_of(next(train).prompt) == "train" for _ in range(100))


def test_extract_answer_and_errors():
    assert extract_answer("2+4=6\n6-3=3\n#### 3") == "3"
    assert extract_answer("12+04=16\n#### 16") == "16"
    assert extract_answer("055") == "055"
    assert extract_answer("no digits") is None
    with pytest.raises(ValueError, match="valid: addition"):
        next(iter_examples("poetry", "test"))
    with pytest.raises(ValueError, match="split"):
        next(iter_examples("addition", "dev"))
