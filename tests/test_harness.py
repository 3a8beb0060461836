"""benchmark=<paper task> / paper10 / lm_eval: configs, offline behaviour, code-execution opt-in, and
lm-eval end to end on the tiny models with local task files in the format of each real task family
(multiple choice like PIQA, generation with `until` like GSM8K, rolling likelihood like WikiText, a
group aggregated like MMLU), plus lm-eval's real gsm8k task read from a local dataset mirror.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fair_calib.benchmark.harness import HarnessBenchmark, HarnessTask, metric_values, task_manager
from fair_calib.benchmark.lm_eval_plugin import install
from fair_calib.benchmark.offline_data import DatasetUnavailableError, hf_offline, leaf_configs
from fair_calib.benchmark.tinyreason_tasks import read_rows
from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.hf_folder import ASSETS
from fair_calib.pipeline import average
from fair_calib.registry import ConfigError, build

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER10 = ["piqa", "boolq", "winogrande", "arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc2", "mmlu",
           "humaneval", "gsm8k"]


def benchmark_cfg(option: str, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"benchmark={option}", *overrides])
    return OmegaConf.to_container(cfg.benchmark, resolve=True)


# ---- local task files in the real tasks' formats --------------------------------------------------
def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_local_tasks(root: Path) -> Path:
    """A task folder: PIQA-style multiple choice (x2, grouped with a size-weighted acc like MMLU), GSM8K-style
    generation with `until` and a '####' regex filter, and WikiText-style rolling likelihood."""
    root.mkdir(parents=True, exist_ok=True)
    compare = read_rows("compare")[:12]
    piqa_rows = [{"goal": r["prompt"], "sol1": r["choices"][0], "sol2": r["choices"][1], "label": r["label"]}
                 for r in compare]
    mc_common = ("output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{goal}}\"\n"
                 "doc_to_choice: \"{{[sol1, sol2]}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
                 "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                 "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    for name, rows in (("local_piqa", piqa_rows[:8]), ("local_piqa_b", piqa_rows[8:])):
        data = write_jsonl(root / f"{name}.jsonl", rows)
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n" + mc_common)
    (root / "local_group.yaml").write_text(
        "group: local_group\ntask: [local_piqa, local_piqa_b]\naggregate_metric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    weight_by_size: true\nmetadata:\n  version: 1.0\n")
    words = read_rows("word_problems")
    gsm = [{"question": r["prompt"], "answer": r["answer"]} for r in words[:6]]
    data = write_jsonl(root / "local_gsm8k.jsonl", gsm)
    (root / "local_gsm8k.yaml").write_text(
        f"task: local_gsm8k\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer.split('#### ')[-1]}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\", \"Question:\"]\n  max_gen_toks: 40\n  do_sample: false\n"
        "filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n"
        "        regex_pattern: \"#### (\\\\-?[0-9]+)\"\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    pages = [{"page": r["prompt"] + r["answer"]} for r in words[6:10]]
    data = write_jsonl(root / "local_wikitext.jsonl", pages)
    (root / "local_wikitext.yaml").write_text(
        f"task: local_wikitext\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\ndoc_to_target: \"{{page}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: byte_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
        "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")
    return root


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_local_tasks(tmp_path_factory.mktemp("tasks") / "local")


def local_benchmark(folder: Path, tasks: dict, **kw) -> HarnessBenchmark:
    spec = {k: {"folders": [str(folder)], **v} for k, v in tasks.items()}
    return build("benchmark", {"name": "lm_eval", "tasks": spec, "show_progress": False, **kw})


# ---- configs ------------------------------------------------------------------------------------------
def test_paper_task_configs_carry_the_papers_settings() -> None:
    paper = benchmark_cfg("paper10", "benchmark.confirm_run_unsafe_code=true")
    assert list(paper["tasks"]) == PAPER10 and "average" not in paper
    bench = build("benchmark", paper)
    t = bench.tasks
    gsm8k = t["gsm8k"]
    assert (gsm8k.num_fewshot, gsm8k.gen_length, gsm8k.steps, gsm8k.block_length) == (4, 256, 256, 32)
    assert (t["humaneval"].num_fewshot, t["humaneval"].gen_length, t["humaneval"].block_length) == (0, 512, 32)
    assert (t["mmlu"].num_fewshot, t["mmlu"].mc_num) == (5, 1)
    likelihood = [k for k in PAPER10 if k not in ("mmlu", "humaneval", "gsm8k")]
    assert {t[k].mc_num for k in likelihood} == {128}
    assert t["winogrande"].num_fewshot == 5 and t["truthfulqa_mc2"].cfg_scale == {"llada": 2.0}
    assert [k for k in PAPER10 if t[k].unsafe_code] == ["humaneval"]
    for option in PAPER10 + ["minerva_math", "mbpp"]:
        cfg = benchmark_cfg(option, "benchmark.confirm_run_unsafe_code=true", "benchmark.limit=5")
        one = build("benchmark", cfg)
        assert list(one.tasks) == [option] and one.limit == 5
        assert one.tasks[option] == t.get(option, one.tasks[option])  # the same task file as in paper10
    assert benchmark_cfg("mbpp")["tasks"]["mbpp"]["num_fewshot"] == 3


def test_task_folders_name_real_lm_eval_tasks() -> None:
    paper = build("benchmark", benchmark_cfg("paper10", "benchmark.confirm_run_unsafe_code=true"))
    extra = [build("benchmark", benchmark_cfg(o, "benchmark.confirm_run_unsafe_code=true")).tasks[o]
             for o in ("minerva_math", "mbpp")]
    for task in [*paper.tasks.values(), *extra]:
        manager = task_manager(tuple(task.folders))
        configs = leaf_configs(manager, task.task)
        assert configs, task.task
        assert all(c.get("dataset_path") for c in configs)
    assert len(leaf_configs(task_manager(("mmlu/default",)), "mmlu")) == 57
    assert len(leaf_configs(task_manager(("minerva_math", "benchmarks")), "minerva_math")) == 7


def test_task_settings_shape_the_sampler() -> None:
    gsm8k = HarnessTask(task="gsm8k", gen_length=256, steps=256, block_length=32)
    llada = gsm8k.sampler_for(LLaDASampler(gen_length=64, steps=64, block_length=64, remasking="random"))
    assert (llada.gen_length, llada.steps, llada.block_length, llada.remasking) == (256, 256, 32, "random")
    dream = gsm8k.sampler_for(DreamSampler(gen_length=64, steps=64, alg="topk_margin"))
    assert (dream.gen_length, dream.steps, dream.alg) == (256, 256, "topk_margin")
    assert HarnessTask(task="piqa").sampler_for(dream) is dream  # likelihood tasks keep the run's sampler
    with pytest.raises(ConfigError, match="gen_length must be positive"):
        HarnessTask(task="x", gen_length=0)
    with pytest.raises(ConfigError, match="valid keys"):
        build("benchmark", {"name": "lm_eval", "tasks": {"x": {"fewshot": 3}}})
    with pytest.raises(ConfigError, match="benchmark.tasks is empty"):
        build("benchmark", benchmark_cfg("lm_eval"))


def test_code_execution_needs_the_opt_in() -> None:
    for option in ("humaneval", "mbpp", "paper10"):
        with pytest.raises(ConfigError, match="confirm_run_unsafe_code=true") as err:
            build("benchmark", benchmark_cfg(option))
        assert "\n" not in str(err.value)
    assert build("benchmark", benchmark_cfg("humaneval", "benchmark.confirm_run_unsafe_code=true"))


# ---- offline --------------------------------------------------------------------------------------
def test_missing_dataset_is_one_clear_line(tmp_path: Path) -> None:
    bench = build("benchmark", benchmark_cfg("gsm8k", f"benchmark.data_dir={tmp_path}"))
    with pytest.raises(DatasetUnavailableError) as err:
        bench.validate_sampler(LLaDASampler())  # the pipeline's pre-run check, before any weights load
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("task gsm8k: dataset openai/gsm8k (config main) is not available")
    assert f"--local-dir {tmp_path / 'openai/gsm8k'}" in msg and f"benchmark.data_dir={tmp_path}" in msg
    mmlu = build("benchmark", benchmark_cfg("mmlu"))
    with pytest.raises(DatasetUnavailableError, match=r"task mmlu_\w+: dataset cais/mmlu \(config \w+\)"):
        mmlu.check_available()


def test_the_paper_datasets_are_listed_for_a_local_mirror(capsys: pytest.CaptureFixture) -> None:
    from fair_calib.benchmark.offline_data import main, required_datasets

    refs = required_datasets("paper10")
    assert {r.path for r in refs} == {"baber/piqa", "aps/super_glue", "allenai/winogrande", "allenai/ai2_arc",
                                      "Rowan/hellaswag", "truthfulqa/truthful_qa", "cais/mmlu",
                                      "openai/openai_humaneval", "openai/gsm8k"}
    assert len([r for r in refs if r.path == "cais/mmlu"]) == 57
    assert main(["list", "gsm8k"]) == 0 and capsys.readouterr().out == "openai/gsm8k\tmain\tgsm8k\n"
    assert main(["download", "gsm8k"]) == 2 and "--data-dir" in capsys.readouterr().err


@pytest.mark.slow  # a fresh fair-calib process
def test_fair_calib_stops_with_one_line_for_a_missing_dataset(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fair_calib", "benchmark=gsm8k", f"benchmark.data_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: task gsm8k: dataset openai/gsm8k (config main)")


def test_offline_scope_sets_and_restores_the_switches() -> None:
    import datasets.config
    import huggingface_hub.constants

    before = (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE,
              huggingface_hub.constants.HF_HUB_OFFLINE)
    with hf_offline(True):
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True and huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE,
            huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_metric_values_keep_filters() -> None:
    raw = {"alias": "g", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
           "exact_match,flexible-extract": 0.75, "acc,none": 1, "word_perplexity,none": 3.5}
    assert metric_values(raw) == {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 0.75,
                                  "acc": 1.0, "word_perplexity": 3.5}


# ---- end to end on the tiny models ----------------------------------------------------------------
def tiny(name: str):
    from fair_calib.models.hf_folder import HFFolderModel

    if not (ASSETS / name / "config.json").is_file():
        pytest.skip(f"{name} is not shipped")
    return HFFolderModel(name).load()


def test_local_task_families_end_to_end_on_tiny_llada(local_tasks: Path) -> None:
    bench = local_benchmark(local_tasks, {
        "local_group": {"mc_num": 4, "metric": "acc"},
        "local_gsm8k": {"gen_length": 40, "steps": 40, "block_length": 8, "metric": "exact_match,strict-match"},
        "local_wikitext": {"mc_num": 2},
    }, limit=4)
    bench.validate_sampler(LLaDASampler())
    metrics = bench.evaluate(tiny("tiny-llada"), LLaDASampler(), seed=0)
    assert set(metrics) == {"local_group", "local_gsm8k", "local_wikitext"}  # the average is not a task
    assert set(metrics["local_group"]) >= {"acc"} and 0 <= metrics["local_group"]["acc"] <= 1
    assert set(metrics["local_gsm8k"]) == {"exact_match,strict-match"}
    wiki = metrics["local_wikitext"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(wiki)
    assert wiki["byte_perplexity"] == pytest.approx(2 ** wiki["bits_per_byte"], rel=1e-6) and wiki["bits_per_byte"] > 0
    assert bench.headline() == {"local_group": "acc", "local_gsm8k": "exact_match,strict-match"}
    assert average(metrics, bench.headline()) == pytest.approx(
        (metrics["local_group"]["acc"] + metrics["local_gsm8k"]["exact_match,strict-match"]) / 2)
    assert len(bench.last_samples["local_group"]) == 8  # limit 4 per leaf task, two leaves
    assert {r["task"] for r in bench.last_samples["local_group"]} == {"local_piqa", "local_piqa_b"}
    gen = bench.last_samples["local_gsm8k"]
    assert len(gen) == 4 and all("\n\n" not in r["response"] for r in gen)  # cut at `until`
    mc = bench.last_samples["local_group"]
    assert all(len(r["loglikelihoods"]) == 2 for r in mc)
    assert metrics["local_group"]["acc"] == pytest.approx(sum(r["acc"] for r in mc) / len(mc))  # size-weighted
    assert metrics["local_gsm8k"]["exact_match,strict-match"] == pytest.approx(
        sum(r["exact_match"] for r in gen) / len(gen))
    # bits per byte = -sum log p(text) / (ln 2 * sum bytes), from the per-document rolling log-likelihoods
    rolling = bench.last_samples["local_wikitext"]
    assert len(rolling) == 4 and all(r["response"] < 0 for r in rolling)
    total_bytes = sum(len(r["prompt"].encode()) for r in rolling)
    assert wiki["bits_per_byte"] == pytest.approx(-sum(r["response"] for r in rolling) / total_bytes / math.log(2))


def test_local_tasks_on_tiny_dream_are_seeded(local_tasks: Path) -> None:
    bench = local_benchmark(local_tasks, {"local_piqa": {"mc_num": 4, "cfg_scale": {"dream": 0.0}},
                                          "local_wikitext": {"mc_num": 2}}, limit=3)
    model = tiny("tiny-dream")
    a = bench.evaluate(model, DreamSampler(gen_length=8, steps=8), seed=1)
    records = bench.last_samples
    assert bench.evaluate(model, DreamSampler(gen_length=8, steps=8), seed=1) == a
    assert bench.last_samples == records
    assert all(math.isfinite(v) for m in a.values() for v in m.values())


def test_real_gsm8k_task_from_a_local_mirror(tmp_path: Path) -> None:
    """lm-eval's own gsm8k YAML (4-shot, regex filters) reading a dataset folder under data_dir."""
    folder = tmp_path / "data" / "openai" / "gsm8k"
    (folder / "main").mkdir(parents=True)
    words = read_rows("word_problems")
    rows = [{"question": r["prompt"].strip(), "answer": r["answer"]} for r in words[:10]]
    write_jsonl(folder / "main" / "train.jsonl", rows[:6])
    write_jsonl(folder / "main" / "test.jsonl", rows[6:])
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n"
                                      "    path: main/train.jsonl\n  - split: test\n    path: main/test.jsonl\n---\n")
    cfg = benchmark_cfg("gsm8k", f"benchmark.data_dir={tmp_path / 'data'}", "benchmark.limit=2",
                        "benchmark.tasks.gsm8k.gen_length=16", "benchmark.tasks.gsm8k.steps=16",
                        "benchmark.tasks.gsm8k.block_length=16", "benchmark.show_progress=false")
    bench = build("benchmark", cfg)
    bench.validate_sampler(LLaDASampler())
    metrics = bench.evaluate(tiny("tiny-llada"), LLaDASampler(), seed=0)
    assert set(metrics["gsm8k"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    prompt = bench.last_samples["gsm8k"][0]["prompt"]
    assert prompt.count("Question:") == 5  # 4 few-shot examples + the test question
    assert bench.diagnostic_prompts(2)[0].startswith("Question: " + rows[6]["question"])


# ---- lm-eval's own CLI ------------------------------------------------------------------------------
def lm_eval_cli(args: list[str], site_dir: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """lm-eval's CLI in a fresh interpreter whose site-packages include `site_dir` (where the .pth was installed)."""
    code = ("import site, sys; site.addsitedir(sys.argv.pop(1)); sys.argv[0] = 'lm_eval'; "
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, str(site_dir), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_plugin_registers_the_model_at_interpreter_start(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    pth = install(site_dir)
    assert pth.read_text().startswith("import fair_calib.benchmark.lm_eval_plugin")
    code = ("import site, sys; site.addsitedir(sys.argv[1]); assert 'fair_calib.benchmark.lm' not in sys.modules; "
            "from lm_eval.api.registry import get_model; cls = get_model('fair_calib'); "
            "print(cls.__module__, cls.__name__, get_model('dummy').__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(site_dir)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["fair_calib.benchmark.lm", "DiffusionEvalLM", "DummyLM"]  # lm-eval's models intact


@pytest.mark.slow  # lm-eval's CLI indexes all of its ~15k task configs first
def test_lm_eval_cli_runs_the_registered_model(local_tasks: Path, tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    install(site_dir)
    out = tmp_path / "out"
    proc = lm_eval_cli(["run", "--model", "fair_calib", "--model_args",
                        f"path={ASSETS / 'tiny-llada'},mc_num=2,show_progress=false",
                        "--tasks", "local_piqa", "--include_path", str(local_tasks), "--limit", "3",
                        "--device", "cpu", "--output_path", str(out)], site_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0 <= results["results"]["local_piqa"]["acc,none"] <= 1
    assert results["config"]["model"] == "fair_calib" and results["config"]["mc_num"] == 2


DP_SCRIPT = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from fair_calib.benchmark.lm import DiffusionEvalLM
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.hf_folder import HFFolderModel

tasks, out = sys.argv[1], sys.argv[2]
lm = DiffusionEvalLM(HFFolderModel("tiny-llada").load(), LLaDASampler(), mc_num=4, show_progress=False, device="cpu")
res = simple_evaluate(model=lm, tasks=["local_piqa"], limit=8, bootstrap_iters=0, log_samples=True,
                      task_manager=TaskManager(include_path=tasks, include_defaults=False))
record = {"rank": lm.rank, "world": lm.world_size}
if res is not None:
    record["acc"] = res["results"]["local_piqa"]["acc,none"]
    record["ll"] = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in res["samples"]["local_piqa"]}
with open(f"{out}.{lm.rank}.json", "w") as f:
    json.dump(record, f)
"""


@pytest.mark.slow  # two processes
def test_data_parallel_ranks_split_the_requests_and_agree_with_one_process(local_tasks: Path, tmp_path: Path) -> None:
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), str(local_tasks), str(tmp_path / "single")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         "29517", str(script), str(local_tasks), str(tmp_path / "dp")],
                        capture_output=True, text=True, env=env, timeout=600)
    assert dp.returncode == 0, dp.stderr[-3000:]
    one = json.loads((tmp_path / "single.0.json").read_text())
    ranks = [json.loads((tmp_path / f"dp.{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)] and "acc" not in ranks[1]
    assert ranks[0]["acc"] == one["acc"]
    assert ranks[0]["ll"] == one["ll"]  # per-request seeds: the same numbers whichever rank ran a request
