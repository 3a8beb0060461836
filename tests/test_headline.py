"""One headline rule: each task's config names its metric; `*/avg`, table.md and the report read only that."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fair_calib import CONF_DIR
from fair_calib.pipeline import average, flat_metrics, format_table
from fair_calib.registry import build
from fair_calib.report.tables import primary_metric

# a paper10-shaped metrics dict as lm-eval reports it: several metrics per task, the "wrong" one first
PAPER10_METRICS = {
    "piqa": {"acc": 0.80, "acc_norm": 0.81},
    "boolq": {"acc": 0.85},
    "winogrande": {"acc": 0.70},
    "arc_easy": {"acc": 0.75, "acc_norm": 0.72},
    "arc_challenge": {"acc": 0.50, "acc_norm": 0.55},
    "hellaswag": {"acc": 0.60, "acc_norm": 0.78},
    "truthfulqa_mc2": {"acc": 0.45},
    "mmlu": {"acc": 0.65},  # lm-eval's group row: size-weighted over the 57 subjects
    "humaneval": {"pass_at_k,create_test": 0.30},
    "gsm8k": {"exact_match,strict-match": 0.40, "exact_match,flexible-extract": 0.44},
}


def paper10():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["benchmark=paper10", "benchmark.confirm_run_unsafe_code=true"])
    return build("benchmark", OmegaConf.to_container(cfg.benchmark, resolve=True))


def test_paper10_average_follows_the_papers_rule_over_exactly_ten_tasks() -> None:
    headline = paper10().headline()
    assert len(headline) == 10
    assert headline["arc_challenge"] == "acc_norm" and headline["hellaswag"] == "acc_norm"
    assert headline["gsm8k"] == "exact_match,flexible-extract" and headline["humaneval"] == "pass_at_k,create_test"
    assert headline["mmlu"] == "acc" and headline["arc_easy"] == "acc"
    paper_rule = (0.80 + 0.85 + 0.70 + 0.75 + 0.55 + 0.78 + 0.45 + 0.65 + 0.30 + 0.44) / 10
    assert average(PAPER10_METRICS, headline) == pytest.approx(paper_rule)
    summary = flat_metrics("quant", PAPER10_METRICS, headline)
    assert summary["quant/avg"] == pytest.approx(paper_rule)
    table = format_table({"FP": PAPER10_METRICS}, headline)
    assert table.count("| average") == 1 and len(table.splitlines()) == 2 + 10 + 1
    assert "| arc_challenge  | 55.0 |" in table


def test_a_missing_headline_metric_gives_no_average_rather_than_a_partial_one() -> None:
    metrics = {k: v for k, v in PAPER10_METRICS.items() if k != "gsm8k"}
    assert average(metrics, paper10().headline()) is None
    assert average({"a": {"acc": 1.0}}, {}) is None


def test_tiny_benchmark_headline_and_report_reader() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=none"])
    bench = build("benchmark", OmegaConf.to_container(cfg.benchmark, resolve=True))
    assert bench.headline() == {"tinyreason_addition": "exact_match", "tinyreason_word_problems": "exact_match",
                                "tinyreason_compare": "acc"}
    assert primary_metric({"acc": 0.5, "acc_norm": 0.9}, "acc_norm") == 0.9
    assert primary_metric({"acc": 0.5, "acc_norm": 0.9}) == 0.5  # results.json without a headline record


def test_seed_is_the_calibration_seed_and_names_the_sweep_folder() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["seed=2", "method=fair_calib"], return_hydra_config=True)
        excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    assert "seed" not in excluded  # seed=0,1,2 sweeps get one folder per seed
    assert cfg.data.seed == 2 and cfg.prior.seed == 2 and cfg.quantizer.seed == 2


def test_run_table_shows_each_cells_bootstrap_ci() -> None:
    from fair_calib.pipeline import interval_metrics

    headline = {"a": "acc", "b": "exact_match"}
    columns = {"FP": {"a": {"acc": 0.75}, "b": {"exact_match": 0.5}},
               "Q": {"a": {"acc": 0.5}, "b": {"exact_match": 0.5}}}
    scores = {"FP": {"a": {"acc": [1.0, 1.0, 1.0, 0.0]}, "b": {"exact_match": [1.0, 0.0, 1.0, 0.0]}}}
    ci = interval_metrics("fp", scores["FP"], headline)
    lines = format_table(columns, headline, scores).splitlines()
    cell = lambda key: f"[{100 * ci[key + '_ci_low']:.1f}, {100 * ci[key + '_ci_high']:.1f}]"  # noqa: E731
    assert lines[2].split("|")[2].strip() == f"75.0 {cell('fp/a/acc')}"
    assert lines[4].split("|")[2].strip() == f"62.5 {cell('fp/avg')}"
    assert lines[2].split("|")[3].strip() == "50.0"  # no scores for Q: the bare mean
    assert lines[-1].startswith("cells: %") and format_table(columns, headline).splitlines()[-1].startswith("| average")
