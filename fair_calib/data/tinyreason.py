"""tinyreason: seeded synthetic reasoning tasks for the shipped tiny dLLMs.

Three tasks, each a deterministic function of (split, index, seed):
  addition      "47+08="                       -> "055"                    (exact match)
  word_problems "Ann has 3 pens. Ann buys 4. Ann uses 2. How many pens?\\n"
                -> "3+4=7\\n7-2=5\\n#### 5"                (exact match on ####)
  compare       "Which is larger: 47 or 52?\\nAnswer:" -> " 52" among [" 47", " 52"] (likelihood)

Numbers are zero-padded to a fixed width (the addition sum to width + 1), and the word problems'
names, items and verbs all have the same length: digit j of every number then sits at a fixed
offset, which a few-million-parameter bidirectional model learns on two CPU cores. With ragged
widths, or three digits, addition plateaued for the first 700 steps (about 12 minutes) of
training, and word problems with ragged numbers and words stayed at 6% exact match after 2400.
Word problems have a fixed number of steps (two) for the same reason: with two or three steps the
distance from an answer digit to the prompt digit it copies depended on the step count, and the
shipped models never learned the copy (single-digit probes at chance after 3600 steps).
Word-problem values stay single digits (`wp_max_value`). With values up to 38 the models learned
the copies and the first step, but the second step's units digit stayed at chance (10-35% with
every other token given) after 3000 steps: its first operand is the first step's result, which
the prompt never shows. A drill of bare second steps, or of the same rows with the first step
given, did not move it in 500 steps either. Single-digit problems reach 55% exact match after 600
steps of training from scratch.

Splits are disjoint by construction: an example belongs to the split chosen by a hash of its
prompt, and a generator for one split rejects prompts hashed to another.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

TASKS = ("addition", "word_problems", "compare")
SPLITS = {"train": (0, 80), "calibration": (80, 90), "test": (90, 100)}
ANSWER_RE = re.compile(r"####\s*(-?\d+)")

# every name, item and verb has the same length, so the numbers of a problem sit at fixed offsets
NAMES = ("Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy", "Joe", "Kim")
ITEMS = ("pens", "cups", "toys", "eggs", "hats", "keys", "jars", "bags")
ADD_VERBS = ("buys", "gets", "wins")
SUB_VERBS = ("uses", "lost", "sold")


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str  # reference continuation (worked steps included)
    target: str  # what is scored: final number, or the correct choice text
    choices: tuple[str, ...] = field(default_factory=tuple)
    label: int = -1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generators; defaults are what the shipped models were trained on."""

    add_max_digits: int = 2
    wp_min_steps: int = 2
    wp_max_steps: int = 2
    wp_max_start: int = 9
    wp_max_operand: int = 9
    wp_max_value: int = 9  # every value of a problem (start, each step, answer) stays in 0..wp_max_value
    cmp_max_value: int = 99


def split_of(prompt: str) -> str:
    bucket = int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_addition(rng: random.Random, d: Difficulty) -> Example:
    w = d.add_max_digits
    a, b = _number(rng, w), _number(rng, w)
    total = f"{a + b:0{w + 1}d}"
    return Example("addition", f"{a:0{w}d}+{b:0{w}d}=", total, total)


def make_word_problem(rng: random.Random, d: Difficulty) -> Example:
    w = len(str(d.wp_max_value))

    def num(v: int) -> str:
        return f"{v:0{w}d}"

    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, min(d.wp_max_start, d.wp_max_value))
    sentences, steps = [f"{name} has {num(value)} {item}."], []
    for _ in range(rng.randint(d.wp_min_steps, d.wp_max_steps)):
        if value == 0 or (value < d.wp_max_value and rng.random() < 0.5):
            n = rng.randint(1, min(d.wp_max_operand, d.wp_max_value - value))
            sentences.append(f"{name} {rng.choice(ADD_VERBS)} {num(n)}.")
            steps.append(f"{num(value)}+{num(n)}={num(value + n)}")
            value += n
        else:
            n = rng.randint(1, min(d.wp_max_operand, value))
            sentences.append(f"{name} {rng.choice(SUB_VERBS)} {num(n)}.")
            steps.append(f"{num(value)}-{num(n)}={num(value - n)}")
            value -= n
    prompt = " ".join(sentences) + f" How many {item}?\n"
    answer = "\n".join(steps) + f"\n#### {num(value)}"
    return Example("word_problems", prompt, answer, num(value))


def make_compare(rng: random.Random, d: Difficulty) -> Example:
    a = rng.randint(0, d.cmp_max_value)
    b = rng.randint(0, d.cmp_max_value)
    while b == a:
        b = rng.randint(0, d.cmp_max_value)
    kind = rng.choice(("larger", "smaller"))
    right = max(a, b) if kind == "larger" else min(a, b)
    w = len(str(d.cmp_max_value))
    choices = (f" {a:0{w}d}", f" {b:0{w}d}")
    label = 0 if right == a else 1
    prompt = f"Which is {kind}: {a:0{w}d} or {b:0{w}d}?\nAnswer:"
    return Example("compare", prompt, choices[label], choices[label], choices, label)


GENERATORS = {"addition": make_addition, "word_problems": make_word_problem, "compare": make_compare}


def _seed(task: str, split: str, seed: int) -> int:
    return int(hashlib.md5(f"{task}/{split}/{seed}".encode()).hexdigest()[:12], 16)


def iter_examples(task: str, split: str, seed: int = 0, difficulty: Difficulty | None = None) -> Iterator[Example]:
    """Endless stream of distinct-split examples of one task (train may repeat prompts; eval splits do not)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown tinyreason task {task!r}; valid: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    rng = random.Random(_seed(task, split, seed))
    d = difficulty or Difficulty()
    seen: set[str] = set()
    while True:
        ex = GENERATORS[task](rng, d)
        if split_of(ex.prompt) != split:
            continue
        if split != "train":
            if ex.prompt in seen:
                continue
            seen.add(ex.prompt)
        yield ex


def examples(task: str, split: str, n: int, seed: int = 0, difficulty: Difficulty | None = None) -> list[Example]:
    it = iter_examples(task, split, seed, difficulty)
    return [next(it) for _ in range(n)]


def extract_answer(text: str) -> str | None:
    """Final answer of a generation: the number after '####', else the first integer (as written)."""
    m = ANSWER_RE.search(text)
    if m:
        return m.group(1)
    m = re.search(r"-?\d+", text)
    return m.group(0) if m else None
