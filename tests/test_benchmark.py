"""benchmark=tiny: shipped task files, exact-match scoring, lm-eval's simple_evaluate end to end, and the tiny
configuration as the harness over the tinyreason task folder (one evaluation path)."""

from __future__ import annotations

import pytest
import torch
from conftest import EOT_ID, VOCAB, make_tiny, tiny_config
from torch import nn

from fair_calib.benchmark.harness import HarnessBenchmark, metric_values, quiet_lm_eval
from fair_calib.benchmark.lm import DiffusionEvalLM
from fair_calib.benchmark.tiny import tiny_benchmark
from fair_calib.benchmark.tinyreason_tasks import (
    SHIPPED_N,
    TASK_FOLDER,
    TASKS_DIR,
    exact_match,
    expected_rows,
    process_exact_match,
    read_rows,
)
from fair_calib.data.tinyreason import TASKS
from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.tokenizer import build_char_tokenizer
from fair_calib.registry import ConfigError, build

NAMES = ["tinyreason_addition", "tinyreason_word_problems", "tinyreason_compare"]


class AdditionOracle(DiffusionLM):
    """Reads "a+b=" from each (left-padded) row and predicts a+b (zero-padded like the data), then end-of-text."""

    def __init__(self) -> None:
        super().__init__(tiny_config("llada"))
        self.wte = nn.Embedding(VOCAB, 4)
        self.tokenizer = build_char_tokenizer(VOCAB)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.wte

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tok = self.tokenizer
        eq = tok.convert_tokens_to_ids("=")
        logits = torch.zeros((*ids.shape, VOCAB))
        for b, row in enumerate(ids.tolist()):
            start = row.index(eq) + 1
            a, c = tok.decode(row[:start - 1], skip_special_tokens=True).split("+")
            answer = tok.encode(f"{int(a) + int(c):0{len(a) + 1}d}", add_special_tokens=False)  # zero-padded
            for t in range(start, len(row)):
                j = t - start
                logits[b, t, answer[j] if j < len(answer) else EOT_ID] = 10.0
        return logits


def test_shipped_files_are_the_generator_test_splits():
    for task in TASKS:
        rows = read_rows(task)
        assert len(rows) == SHIPPED_N
        assert rows == expected_rows(task, SHIPPED_N)
    compare = read_rows("compare")[0]
    assert compare["choices"][compare["label"]] == compare["target"]


def test_exact_match_scoring_on_hand_written_generations():
    assert exact_match("12+4=16\n#### 16", "16") == 1.0
    assert exact_match("#### 17", "16") == 0.0
    assert exact_match("405", "405") == 1.0  # addition: the first integer
    assert exact_match("0405", "405") == 1.0
    assert exact_match("12+4=16\n16-3=13", "13") == 0.0  # no '####': the first integer (12) is scored
    assert exact_match("", "3") == 0.0
    assert process_exact_match({"target": "16"}, ["12+4=16\n#### 16"]) == {"exact_match": 1.0}


def test_metric_values_keep_numbers_without_stderr():
    raw = {"alias": "x", "acc,none": 0.25, "acc_stderr,none": "N/A", "exact_match,none": 1, "flag,none": True}
    assert metric_values(raw) == {"acc": 0.25, "exact_match": 1.0}


def test_task_yamls_load_from_any_working_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {"tinyreason_addition", "tinyreason_word_problems", "tinyreason_compare", "tinyreason"} <= set(
        manager.all_tasks)
    tasks = manager.load(["tinyreason"])["tasks"]  # the tag expands to the three tasks
    assert sorted(tasks) == sorted(NAMES)
    compare = tasks["tinyreason_compare"]
    doc = compare.test_docs()[0]
    assert len(compare.test_docs()) == SHIPPED_N
    assert compare.doc_to_choice(doc) == doc["choices"] and compare.config.target_delimiter == ""
    assert tasks["tinyreason_addition"].config.generation_kwargs["max_gen_toks"] == 8


def test_simple_evaluate_end_to_end():
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = DiffusionEvalLM(make_tiny("llada"), LLaDASampler(gen_length=64, steps=64, block_length=32), mc_num=2,
                         show_progress=False)
    out = simple_evaluate(model=lm, tasks=NAMES, limit=3, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    assert set(out["results"]) == set(NAMES)
    for name in NAMES:
        metrics = metric_values(out["results"][name])
        accuracy = {k: v for k, v in metrics.items() if k != "answer_ll"}
        assert accuracy and all(0.0 <= v <= 1.0 for v in accuracy.values())
        assert len(out["samples"][name]) == 3
    # compare also reports the log-likelihood of the correct choice: the mean of the logged per-sample values
    lls = [s["answer_ll"] for s in out["samples"]["tinyreason_compare"]]
    assert all(v < 0 for v in lls)
    assert metric_values(out["results"]["tinyreason_compare"])["answer_ll"] == pytest.approx(sum(lls) / 3)


def test_tiny_benchmark_evaluate_and_records():
    bench = build("benchmark", {"name": "tiny", "n": {"addition": 4, "word_problems": 2, "compare": 3},
                                "mc_num": 2, "show_progress": False})
    assert isinstance(bench, HarnessBenchmark)
    metrics = bench.evaluate(make_tiny("dream"), DreamSampler(gen_length=64, steps=64), seed=0)
    assert list(metrics) == NAMES
    assert set(metrics["tinyreason_compare"]) == {"acc", "answer_ll"}
    assert set(metrics["tinyreason_addition"]) == {"exact_match", "answer_ll"}  # from tinyreason_addition_ll
    assert all(0.0 <= v <= 1.0 for m in metrics.values() for k, v in m.items() if k != "answer_ll")
    assert [len(bench.last_samples[n]) for n in NAMES] == [4, 2, 3]
    rec = bench.last_samples["tinyreason_compare"][0]
    label = read_rows("compare")[0]["label"]
    assert rec["acc"] == float(rec["pred"] == label)
    assert len(rec["loglikelihoods"]) == 2 and rec["answer_ll"] == rec["loglikelihoods"][label]
    for name in NAMES:  # every record carries its answer_ll; their mean is the task's metric
        lls = [r["answer_ll"] for r in bench.last_samples[name]]
        assert all(v < 0 for v in lls)
        assert metrics[name]["answer_ll"] == pytest.approx(sum(lls) / len(lls))
    assert bench.score_keys()["tinyreason_addition"] == ["exact_match", "answer_ll"]
    off = tiny_benchmark(n={"addition": 2, "word_problems": 2, "compare": 2}, mc_num=2, show_progress=False,
                        likelihood=False)
    plain = off.evaluate(make_tiny("dream"), DreamSampler(gen_length=64, steps=64), seed=0)
    assert set(plain["tinyreason_compare"]) == {"acc"} and set(plain["tinyreason_addition"]) == {"exact_match"}
    assert "answer_ll" not in off.last_samples["tinyreason_compare"][0]
    assert off.score_keys()["tinyreason_compare"] == ["acc"]


def test_oracle_scores_one_through_the_whole_stack():
    bench = tiny_benchmark(tasks=["addition"], n={"addition": 6}, show_progress=False, batch_size=4, likelihood=False)
    metrics = bench.evaluate(AdditionOracle(), LLaDASampler(), seed=0)  # default llada config: 8 steps, block 8
    assert metrics == {"tinyreason_addition": {"exact_match": 1.0}}
    assert [r["response"] for r in bench.last_samples["tinyreason_addition"]] == [
        r["target"] for r in read_rows("addition")[:6]]


def test_limit_caps_every_task_and_same_seed_same_metrics():
    bench = tiny_benchmark(n={"addition": 5, "word_problems": 5, "compare": 5}, mc_num=2, show_progress=False)
    model, sampler = make_tiny("llada"), LLaDASampler()
    a = bench.evaluate(model, sampler, seed=3, limit=2)
    assert [len(v) for v in bench.last_samples.values()] == [2, 2, 2]
    records = bench.last_samples
    assert bench.evaluate(model, sampler, seed=3, limit=2) == a
    assert bench.last_samples == records


def counts(bench: HarnessBenchmark) -> dict[str, int]:
    return {key.removeprefix("tinyreason_"): task.n for key, task in bench.tasks.items()}


def test_config_errors_and_pipeline_hooks():
    with pytest.raises(ConfigError, match="valid tinyreason tasks"):
        tiny_benchmark(tasks=["algebra"])
    with pytest.raises(ConfigError, match="benchmark.n.compare"):
        tiny_benchmark(n={"compare": SHIPPED_N + 1})
    with pytest.raises(ConfigError, match="benchmark.gen_length.addition must be positive"):
        tiny_benchmark(gen_length={"addition": 0})
    with pytest.raises(ConfigError, match="benchmark.diagnostic_task 'algebra': valid addition"):
        tiny_benchmark(diagnostic_task="algebra")
    with pytest.raises(ConfigError, match="mc_num=6 must be a multiple of mc_batch_size=4"):
        tiny_benchmark(estimator="official", mc_num=6, mc_batch_size=4)
    bench = tiny_benchmark()
    assert counts(bench) == {"addition": 200, "word_problems": 100, "compare": 200}
    assert counts(tiny_benchmark(n=4)) == {"addition": 4, "word_problems": 4, "compare": 4}  # benchmark.n=4
    with pytest.raises(ConfigError, match="give a count for every task"):
        tiny_benchmark(n=[4, 4])
    assert bench.diagnostic_prompts(2) == [r["prompt"] for r in read_rows("word_problems")[:2]]
    with pytest.raises(ConfigError, match="diagnostics.n_prompts=1001: only 1000 documents"):
        bench.diagnostic_prompts(SHIPPED_N + 1)
    bench.validate_sampler(LLaDASampler())  # default decoding config fits both generation lengths
    # the diagnostic task need not be evaluated: its prompts and answer length still come from its task
    only = tiny_benchmark(tasks=["addition"])
    assert only.task_names() == ["tinyreason_addition"]
    assert only.diagnostic_prompts(1) == [read_rows("word_problems")[0]["prompt"]]
    fitted = only.diagnostic_sampler(LLaDASampler(gen_length=64, steps=32, block_length=32))
    assert (fitted.gen_length, fitted.steps, fitted.block_length) == (32, 16, 32)  # the decoding ratio kept


def test_tiny_is_the_harness_over_the_tinyreason_folder():
    """One evaluation path: benchmark=tiny builds HarnessBenchmark (its evaluate, records, metric parsing) over
    the shipped task folder; what is tiny's own is configuration of those tasks."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fair_calib import CONF_DIR

    def composed(*overrides: str) -> HarnessBenchmark:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides))
        return build("benchmark", OmegaConf.to_container(cfg.benchmark, resolve=True))

    bench = composed("benchmark=tiny")
    assert type(bench) is HarnessBenchmark and type(bench).evaluate is HarnessBenchmark.evaluate
    assert bench.single_run and bench.task_names() == NAMES
    add, words, compare = (bench.tasks[n] for n in NAMES)
    assert {tuple(t.folders) for t in bench.tasks.values()} == {(str(TASK_FOLDER),)}
    assert (add.max_gen_toks, words.max_gen_toks, compare.max_gen_toks) == (8, 32, None)
    assert (add.companions, words.companions, compare.companions) == (
        ["tinyreason_addition_ll"], ["tinyreason_word_problems_ll"], [])
    assert bench.headline() == {"tinyreason_addition": "exact_match", "tinyreason_word_problems": "exact_match",
                                "tinyreason_compare": "acc"}  # each task YAML's first metric
    assert counts(bench) == {"addition": 200, "word_problems": 100, "compare": 200}
    assert counts(composed("benchmark=tiny_full")) == {"addition": 1000, "word_problems": 1000, "compare": 1000}
    assert counts(composed("benchmark=tiny", "benchmark.n=100")) == {"addition": 100, "word_problems": 100,
                                                                      "compare": 100}
    per_task = composed("benchmark=tiny", "benchmark.n={addition:7,word_problems:5,compare:3}",
                        "benchmark.likelihood=false", "benchmark.gen_length.addition=12",
                        "benchmark.tasks=[addition,compare]")
    assert counts(per_task) == {"addition": 7, "compare": 3}
    assert per_task.tasks["tinyreason_addition"].max_gen_toks == 12
    assert all(not t.companions and t.drop_metrics == ["answer_ll"] for t in per_task.tasks.values())
    assert per_task.score_keys() == {"tinyreason_addition": ["exact_match"], "tinyreason_compare": ["acc"]}
    with pytest.raises(ConfigError, match="benchmark.n.addition=0: must be in 1..1000"):
        composed("benchmark=tiny", "benchmark.n=0")


def test_lm_eval_git_lookup_is_silent_outside_a_checkout(tmp_path, monkeypatch, capfd):
    """lm-eval records `git describe`; outside a git checkout git printed 'fatal: not a git repository'."""
    import lm_eval.evaluator as evaluator_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never find a repository above tmp
    original = evaluator_module.get_git_commit_hash
    with quiet_lm_eval():
        assert evaluator_module.get_git_commit_hash() is None
    assert evaluator_module.get_git_commit_hash is original
    assert "fatal" not in capfd.readouterr().err


def test_the_benchmark_implements_the_one_contract():
    from fair_calib.benchmark.base import Benchmark

    assert isinstance(tiny_benchmark(), Benchmark) and issubclass(HarnessBenchmark, Benchmark)
    assert not getattr(HarnessBenchmark, "__abstractmethods__", None)

    class NoPrompts(Benchmark):  # the defaults: no diagnostic prompts (a one-line error), the run's sampler
        last_samples = {}

        def evaluate(self, model, sampler, seed=0, limit=None, label=""):
            return {}

        def headline(self):
            return {}

        def score_keys(self):
            return {}

        def task_names(self):
            return []

        def validate_sampler(self, sampler):
            return None

    with pytest.raises(ConfigError, match="provides no prompts for the diagnostics; set diagnostics.enabled=false"):
        NoPrompts().diagnostic_prompts(4)
    sampler = LLaDASampler()
    assert NoPrompts().diagnostic_sampler(sampler) is sampler
