"""The one evaluation path: lm-eval tasks (lm-eval's own, or local task folders) run in process.

`HarnessBenchmark` serves `benchmark=lm_eval` / `<task>` / `paper10` and, configured over the shipped
tinyreason task folder, `benchmark=tiny` (`tiny.py` only turns tiny's keys into tasks). What differs per
task is configuration (`HarnessTask`; `conf/benchmark/task/*.yaml` for the paper's tasks): few-shot count,
Monte Carlo samples, guidance, generation length / steps / block, code execution, the documents (`n`),
companion tasks whose metrics join the task's (`companions`), metrics left out (`drop_metrics`) and the
further per-document scores (`scores`). Each task runs as its own `simple_evaluate` call, because the
wrapper settings (sampler, mc_num, cfg scale) are per task; `single_run` runs tasks that share them in
one call instead (their generations then draw from one random stream, as `benchmark=tiny` always has).

Datasets are read without network (`offline_data`: the Hugging Face cache or a local mirror folder);
a missing dataset is one line that says which and how to provide it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fair_calib.benchmark.base import Benchmark
from fair_calib.benchmark.families import model_family, resolve_cfg_scale
from fair_calib.benchmark.lm import DiffusionEvalLM, check_estimator
from fair_calib.benchmark.offline_data import (
    check_datasets,
    dataset_refs,
    hf_offline,
    leaf_configs,
    load_error,
    local_mirror,
)
from fair_calib.decoding.base import Sampler
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError, register

log = logging.getLogger(__name__)

# the settings of the lm-eval wrapper (DiffusionEvalLM) and of the call: tasks of one `single_run` share them
RUN_SETTINGS = ("mc_num", "cfg_scale", "gen_length", "steps", "block_length", "num_fewshot")


@dataclass
class HarnessTask:
    """One lm-eval task or group and the settings the dLLM papers evaluate it with."""

    task: str                                  # lm-eval task or group name
    folders: list[str] = field(default_factory=list)  # task folders to index (relative: under lm_eval/tasks);
    #                                            empty = every lm-eval task (slow to index)
    num_fewshot: int | None = None             # None: the task's own default
    mc_num: int = 128                          # Monte Carlo samples per likelihood request
    cfg_scale: float | dict[str, float] | str | None = None  # guidance: a number, {family: scale}, or
    #                                            "decoding" (the run's sampler's; `families.resolve_cfg_scale`)
    gen_length: int | None = None              # generation tasks: answer length fixed in the wrapper, with `steps`
    steps: int | None = None                   # sampler steps (None: gen_length, one token per step)
    block_length: int | None = None            # LLaDA semi-autoregressive block (Dream has none)
    max_gen_toks: int | None = None            # generation tasks: the task's own answer length (lm-eval's
    #                                            max_gen_toks), the run's sampler fitted to it (`Sampler.fitted`)
    unsafe_code: bool = False                  # runs model-written code (HumanEval, MBPP)
    metric: str | None = None                  # headline metric for the average (lm-eval key, filter after ',')
    n: int | None = None                       # documents: the first n (None: all, or the benchmark's limit)
    companions: list[str] = field(default_factory=list)  # lm-eval tasks run on the same documents whose metrics
    #                                            and per-document values join this task's (tinyreason's *_ll)
    drop_metrics: list[str] = field(default_factory=list)  # metrics not reported (nor kept per document)
    scores: list[str] = field(default_factory=list)  # per-document scores resampled by the CIs, after `metric`

    def __post_init__(self) -> None:
        for key in ("gen_length", "steps", "block_length", "max_gen_toks", "mc_num", "n"):
            value = getattr(self, key)
            if value is not None and int(value) <= 0:
                raise ConfigError(f"benchmark task {self.task}: {key} must be positive, got {value}")
        if self.num_fewshot is not None and int(self.num_fewshot) < 0:
            raise ConfigError(f"benchmark task {self.task}: num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.gen_length is not None and self.max_gen_toks is not None:
            raise ConfigError(f"benchmark task {self.task}: give gen_length (with steps) or max_gen_toks, not both")

    @property
    def answer_length(self) -> int | None:
        """The generation length of this task (None: a likelihood task)."""
        length = self.gen_length if self.gen_length is not None else self.max_gen_toks
        return None if length is None else int(length)

    def sampler_for(self, sampler: Sampler) -> Sampler:
        """The run's sampler with this task's generation length, steps and (LLaDA) block length."""
        if self.gen_length is None:
            return sampler
        return sampler.with_length(int(self.gen_length), self.steps, self.block_length)

    def documents(self, limit: int | float | None) -> int | None:
        """How many documents of `n` to run under an evaluation `limit` (a count, or a fraction < 1)."""
        if self.n is None:
            return None
        if limit is None:
            return int(self.n)
        return min(int(self.n), int(limit) if limit >= 1 else math.ceil(int(self.n) * limit))


# ---- task folders ---------------------------------------------------------------------------------
def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def resolve_folder(folder: str) -> Path:
    path = Path(folder).expanduser()
    path = path if path.is_absolute() else lm_eval_tasks_dir() / path
    if not path.is_dir():
        raise ConfigError(f"benchmark task folder {folder} does not exist ({path})")
    return path


@functools.lru_cache(maxsize=8)
def task_manager(folders: tuple[str, ...] | None):
    """lm-eval's TaskManager over these folders (None: all of lm-eval's tasks); cached, indexing is the slow part."""
    from lm_eval.tasks import TaskManager

    if folders is None:
        return TaskManager()
    return TaskManager(include_path=[str(resolve_folder(f)) for f in folders], include_defaults=False)


# ---- lm-eval's output, quietly ------------------------------------------------------------------------
class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_git_hash() -> str | None:
    """`git describe` of the working directory as lm-eval records it, without git's 'fatal: not a git
    repository' on stderr when the run is launched outside a checkout (then None)."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
    except OSError:  # git not installed
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval at WARNING and above, without its per-task context-building bars nor git's complaint outside a
    checkout; restored on exit."""
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator_module

    root = logging.getLogger("lm_eval")
    task_log = logging.getLogger("lm_eval.api.task")
    custom_kwargs_note = _DropMessage("Custom kwargs can be passed")  # printed for every custom_dataset task
    old_level, old_tqdm, old_git = root.level, task_module.tqdm, evaluator_module.get_git_commit_hash
    evaluator_module.get_git_commit_hash = quiet_git_hash
    root.setLevel(level)
    task_log.addFilter(custom_kwargs_note)
    task_module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        root.setLevel(old_level)
        task_log.removeFilter(custom_kwargs_note)
        task_module.tqdm = old_tqdm
        evaluator_module.get_git_commit_hash = old_git


def metric_values(task_results: Mapping[str, Any]) -> dict[str, float]:
    """{'acc,none': v, 'exact_match,strict-match': w, '*_stderr,*': s} -> {'acc': v, 'exact_match,strict-match': w}."""
    out = {}
    for key, value in task_results.items():
        if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        if not metric.endswith("_stderr"):
            out[metric if filt == "none" else key] = float(value)
    return out


def sample_record(sample: Mapping[str, Any], task: str | None = None,
                  doc_fields: Sequence[str] = ()) -> dict[str, Any]:
    """A compact, JSON-able record of one lm-eval logged sample (prompt, target, responses, metrics).

    `task`: the lm-eval subtask, recorded when it is not the benchmark task itself (a group's or tag's
    leaves); `doc_fields`: fields of the document copied in (over the request's prompt and target where named).
    """
    args = sample.get("arguments") or [()]
    record: dict[str, Any] = {"task": task} if task is not None else {}
    record.update({"doc_id": sample["doc_id"], "prompt": args[0][0] if args[0] else None,
                   "target": sample.get("target")})
    doc = sample.get("doc") or {}
    record.update({name: doc[name] for name in doc_fields if name in doc})
    resp = sample.get("filtered_resps") or []
    if resp and isinstance(resp[0], list | tuple):  # multiple choice: one (loglikelihood, is_greedy) per choice
        record["loglikelihoods"] = [float(r[0]) for r in resp]
        record["pred"] = int(max(range(len(resp)), key=lambda i: resp[i][0]))
    elif resp:
        record["response"] = resp[0]
    record["filter"] = sample.get("filter", "none")
    for metric in sample.get("metrics", []):
        if metric in sample and isinstance(sample[metric], int | float | str | bool):
            record[metric] = sample[metric]
    return record


@contextlib.contextmanager
def code_execution(allowed: bool) -> Iterator[None]:
    """HF_ALLOW_CODE_EVAL=1 (the `code_eval` metric's own switch) only inside an opted-in evaluation."""
    old = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if allowed:
            if old is None:
                os.environ.pop("HF_ALLOW_CODE_EVAL", None)
            else:
                os.environ["HF_ALLOW_CODE_EVAL"] = old


def unsafe_code_error(task: str) -> ConfigError:
    return ConfigError(f"benchmark task {task} executes model-generated code; rerun with "
                       "benchmark.confirm_run_unsafe_code=true (passed to lm-eval's confirm_run_unsafe_code) "
                       "on a machine where that is acceptable")


def load_tasks(manager, tasks: Sequence[HarnessTask]) -> tuple[list[Any], dict[str, list[str]]]:
    """The lm-eval task / group objects of `tasks`, then of their companions (the order their requests reach the
    model in), and the leaf task names of each name; generation leaves of a task with `max_gen_toks` get it."""
    objects: list[Any] = []
    leaves: dict[str, list[str]] = {}
    named = [(t.task, t.max_gen_toks) for t in tasks] + [(c, None) for t in tasks for c in t.companions]
    for name, length in named:
        part = manager.load([name])
        objects += [part["groups"][name]] if name in part["groups"] else list(part["tasks"].values())
        leaves[name] = list(part["tasks"])
        for leaf in part["tasks"].values() if length is not None else ():
            if leaf.get_config("output_type") == "generate_until":
                leaf.set_config(key="generation_kwargs", value={"max_gen_toks": int(length)}, update=True)
    return objects, leaves


def build_task(where: str, key: str, spec: Mapping[str, Any] | None) -> HarnessTask:
    spec = dict(spec or {})
    spec.setdefault("task", key)
    try:
        return HarnessTask(**spec)
    except TypeError as err:
        valid = ", ".join(f.name for f in dataclasses.fields(HarnessTask))
        raise ConfigError(f"{where}: {err}; valid keys: {valid}") from err


# ---- the benchmark -----------------------------------------------------------------------------
@register("benchmark", "lm_eval")
class HarnessBenchmark(Benchmark):
    """lm-eval tasks by name, one `simple_evaluate` per task with that task's wrapper settings (or one for all of
    them: `single_run`)."""

    def __init__(self, tasks: Mapping[str, Mapping[str, Any]], limit: int | float | None = None,
                 offline: bool = True, data_dir: str | None = None, confirm_run_unsafe_code: bool = False,
                 apply_chat_template: bool = False, fewshot_as_multiturn: bool = False, batch_size: int = 8,
                 mc_batch_size: int = 32, max_length: int = 4096, add_special_tokens: bool = False,
                 check_greedy: bool = False, bootstrap_iters: int = 0,
                 diagnostic_task: str | Mapping[str, Any] | None = None, show_progress: bool = True,
                 estimator: str = "stratified", single_run: bool = False,
                 record_fields: Sequence[str] = ()) -> None:
        self.estimator = check_estimator(str(estimator))
        if not tasks:
            raise ConfigError("benchmark.tasks is empty: name lm-eval tasks, e.g. "
                              "+benchmark.tasks.arc_easy.task=arc_easy, or pick benchmark=paper10 / gsm8k / ...")
        self.tasks: dict[str, HarnessTask] = {key: build_task(f"benchmark.tasks.{key}", key, spec)
                                              for key, spec in tasks.items()}
        for task in self.tasks.values():
            check_estimator(self.estimator, task.mc_num, mc_batch_size)
        if limit is not None and float(limit) <= 0:
            raise ConfigError(f"benchmark.limit must be positive (a count, or a fraction < 1), got {limit}")
        self.limit = limit
        self.offline = bool(offline)
        self.data_dir = str(Path(data_dir).expanduser()) if data_dir else None
        self.confirm_run_unsafe_code = bool(confirm_run_unsafe_code)
        unsafe = [t.task for t in self.tasks.values() if t.unsafe_code]
        if unsafe and not self.confirm_run_unsafe_code:
            raise unsafe_code_error(", ".join(unsafe))
        self.apply_chat_template = bool(apply_chat_template)
        self.fewshot_as_multiturn = bool(fewshot_as_multiturn)
        self.batch_size, self.mc_batch_size, self.max_length = int(batch_size), int(mc_batch_size), int(max_length)
        self.add_special_tokens = bool(add_special_tokens)
        self.check_greedy = bool(check_greedy)
        self.bootstrap_iters = int(bootstrap_iters)
        if isinstance(diagnostic_task, Mapping):  # a task for the diagnostics only (not evaluated)
            self.diagnostic = build_task("benchmark.diagnostic_task", "", diagnostic_task)
            self.diagnostic_task = self.diagnostic.task
        else:
            if diagnostic_task is not None and diagnostic_task not in self.tasks:
                raise ConfigError(f"benchmark.diagnostic_task {diagnostic_task!r}: not one of "
                                  f"{', '.join(self.tasks)}")
            self.diagnostic_task = diagnostic_task or next(
                (k for k, t in self.tasks.items() if t.answer_length is not None), next(iter(self.tasks)))
            self.diagnostic = self.tasks[self.diagnostic_task]
        self.show_progress = bool(show_progress)
        self.single_run = bool(single_run)
        if self.single_run:
            for setting in RUN_SETTINGS:
                values = {repr(getattr(t, setting)) for t in self.tasks.values()}
                if len(values) > 1:
                    raise ConfigError(f"benchmark.single_run: the tasks run in one lm-eval call and must share "
                                      f"{setting}, got {', '.join(sorted(values))}")
            if len({t.n is None for t in self.tasks.values()}) > 1:
                raise ConfigError("benchmark.single_run: give every task its document count n, or none of them")
        self.record_fields = [str(f) for f in record_fields]
        self.last_samples: dict[str, list[dict[str, Any]]] = {}
        self._available: set[tuple[str, str | None]] = set()  # datasets found by an earlier check

    # ---- what the pipeline asks before running ------------------------------------------------
    def task_names(self) -> list[str]:
        return [t.task for t in self.tasks.values()]

    def validate_sampler(self, sampler: Sampler) -> None:
        """Before any weights load: the sampler runs every task's generation settings, and every task
        exists with its datasets available (`check_available`)."""
        for t in self.tasks.values():
            s = t.sampler_for(sampler)
            if t.gen_length is not None and hasattr(s, "validate"):
                s.validate(s.gen_length)
            if t.answer_length is not None:
                s.fitted(t.answer_length)
        self.check_available()

    def check_available(self) -> None:
        """Every task name known, code execution confirmed where needed, every dataset readable offline."""
        manager = self._manager(list(self.tasks.values()))
        for task in self.tasks.values():
            with self._environment([task]):
                self._preflight(task, manager)

    def _manager(self, tasks: Sequence[HarnessTask]):
        folders = [f for t in tasks for f in t.folders]
        everything = any(not t.folders for t in tasks)
        return task_manager(None if everything else tuple(dict.fromkeys(folders)))

    def _preflight(self, task: HarnessTask, manager) -> None:
        """Unknown name, unconfirmed code execution, missing dataset: one line each, before any model call."""
        for name in [task.task, *task.companions]:
            if name not in manager.all_tasks:
                where = ", ".join(task.folders) if task.folders else "lm-eval's task folders"
                raise ConfigError(f"benchmark task {name!r} is not an lm-eval task in {where}")
        configs = [c for name in [task.task, *task.companions] for c in leaf_configs(manager, name)]
        if any(c.get("unsafe_code") for c in configs) and not self.confirm_run_unsafe_code:
            raise unsafe_code_error(task.task)
        if self.offline:
            check_datasets(dataset_refs(configs), self.data_dir, self._available)

    @contextlib.contextmanager
    def _environment(self, tasks: Sequence[HarnessTask]) -> Iterator[None]:
        with hf_offline(self.offline), local_mirror(self.data_dir), \
                code_execution(any(t.unsafe_code for t in tasks)), quiet_lm_eval(), torch.no_grad():
            yield

    def diagnostic_prompts(self, n: int) -> list[str]:
        """The first n documents of `diagnostic_task` as zero-shot prompts (doc_to_text)."""
        task = self.diagnostic
        manager = self._manager([task])
        with self._environment([task]):
            self._preflight(task, manager)
            leaves = list(manager.load([task.task])["tasks"].values())
        prompts = [str(leaf.doc_to_text(doc)) for leaf in leaves for doc in leaf.eval_docs][:n]
        if len(prompts) < n:
            raise ConfigError(f"diagnostics.n_prompts={n}: only {len(prompts)} documents in {task.task}")
        return prompts

    def diagnostic_sampler(self, sampler: Sampler) -> Sampler:
        """The run's sampler as the diagnostic task's generations use it: fitted to the task's answer length (a
        likelihood task: to the decoding config's own gen_length)."""
        s = self.diagnostic.sampler_for(sampler)
        length = self.diagnostic.answer_length
        return s.fitted(length if length is not None else int(s.gen_length))[0]

    # ---- evaluation ------------------------------------------------------------------------------
    def _runs(self) -> list[list[str]]:
        """The task keys of each `simple_evaluate` call."""
        return [list(self.tasks)] if self.single_run else [[key] for key in self.tasks]

    def evaluate(self, model: DiffusionLM, sampler: Sampler, seed: int = 0,
                 limit: int | float | None = None, label: str = "") -> dict[str, dict[str, float]]:
        """Run every task; {task: {metric: value}}. The average is not a task: see `headline()`."""
        from lm_eval import simple_evaluate

        family = model_family(model)
        limit = limit if limit is not None else self.limit
        manager = self._manager(list(self.tasks.values()))
        metrics: dict[str, dict[str, float]] = {}
        self.last_samples = {}
        for run in self._runs():
            tasks = [self.tasks[key] for key in run]
            first = tasks[0]  # the wrapper settings (RUN_SETTINGS) of every task of the run
            lm = DiffusionEvalLM(model, first.sampler_for(sampler), seed=seed, batch_size=self.batch_size,
                                 mc_num=first.mc_num, mc_batch_size=self.mc_batch_size, max_length=self.max_length,
                                 gen_length=first.gen_length, cfg_scale=resolve_cfg_scale(first.cfg_scale, family),
                                 add_special_tokens=self.add_special_tokens, check_greedy=self.check_greedy,
                                 show_progress=self.show_progress, estimator=self.estimator,
                                 label=label)
            with self._environment(tasks):
                for task in tasks:
                    self._preflight(task, manager)
                try:
                    loaded, leaves = load_tasks(manager, tasks)
                    docs = {name: list(range(count)) for task in tasks if (count := task.documents(limit)) is not None
                            for name in [*leaves[task.task], *task.companions]}
                    results = simple_evaluate(
                        model=lm, tasks=loaded, task_manager=manager, num_fewshot=first.num_fewshot,
                        limit=None if docs else limit, samples=docs or None, bootstrap_iters=self.bootstrap_iters,
                        log_samples=True, apply_chat_template=self.apply_chat_template,
                        fewshot_as_multiturn=self.fewshot_as_multiturn and self.apply_chat_template,
                        confirm_run_unsafe_code=self.confirm_run_unsafe_code,
                        random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=seed)
                except (ImportError, ConnectionError, FileNotFoundError) as err:
                    raise load_error(", ".join(t.task for t in tasks), err) from err
            if results is None:  # a non-zero rank of a data-parallel run: rank 0 reports
                continue
            for key, task in zip(run, tasks):
                metrics[key], self.last_samples[key] = self._collect(task, results, leaves[task.task])
        return metrics

    def _collect(self, task: HarnessTask, results: Mapping[str, Any],
                 leaves: Sequence[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """A task's metrics and per-sample records from its run's results; each companion's metrics join the
        metrics, its per-document values the records of the same document."""
        def row(name: str) -> Mapping[str, Any]:
            return results["results"].get(name) or results.get("groups", {}).get(name) or {}

        logged = results.get("samples", {})
        metrics = metric_values(row(task.task))
        records = [sample_record(s, None if name == task.task else name, self.record_fields)
                   for name, samples in logged.items() if name in leaves for s in samples]
        for companion in task.companions:
            metrics.update(metric_values(row(companion)))
            by_doc = {s["doc_id"]: s for s in logged.get(companion, [])}
            fields = list(dict.fromkeys(m for s in by_doc.values() for m in s.get("metrics", [])))
            for record in records:
                sample = by_doc.get(record["doc_id"], {})
                record.update({m: sample.get(m) for m in fields})
        for metric in task.drop_metrics:
            metrics.pop(metric, None)
            for record in records:
                record.pop(metric, None)
        return metrics, records

    def headline(self) -> dict[str, str]:
        """{task: headline metric key} for every task whose config names one (`metric:`): the one rule
        behind `*/avg`, table.md, the report, W&B and the sweep objective."""
        return {key: task.metric for key, task in self.tasks.items() if task.metric is not None}

    def score_keys(self) -> dict[str, list[str]]:
        """{task: metric keys kept per document}: each task's headline metric, then its `scores`."""
        return {key: [metric, *self.tasks[key].scores] for key, metric in self.headline().items()}
