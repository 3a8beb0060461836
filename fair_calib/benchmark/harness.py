"""`benchmark=<task>` / `paper10` / `lm_eval`: lm-eval's own tasks (or local task folders) run in process.

One class for every task; what differs per task (few-shot count, Monte Carlo samples, guidance,
generation length / steps / block, code execution) is configuration in `conf/benchmark/task/*.yaml`,
composed into `conf/benchmark/<name>.yaml`. Each task runs as its own `simple_evaluate` call,
because the wrapper settings (sampler, mc_num, cfg scale) are per task.

Offline first: datasets are read from the Hugging Face cache (HF_HOME) or from a local mirror
folder (`data_dir/<dataset path>`, e.g. `data_dir/openai/gsm8k`), never downloaded unless
`offline=false`; a missing dataset is one line that says which and how to provide it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fair_calib.benchmark.base import Benchmark
from fair_calib.benchmark.families import model_family, resolve_cfg_scale
from fair_calib.benchmark.lm import DiffusionEvalLM, check_estimator
from fair_calib.benchmark.tiny import metric_values, quiet_lm_eval
from fair_calib.decoding.base import Sampler
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError, register

log = logging.getLogger(__name__)


class DatasetUnavailableError(ConfigError):
    """A task's dataset (or another resource it loads) is not available offline."""


@dataclass
class HarnessTask:
    """One lm-eval task or group and the settings the dLLM papers evaluate it with."""

    task: str                                  # lm-eval task or group name
    folders: list[str] = field(default_factory=list)  # task folders to index (relative: under lm_eval/tasks);
    #                                            empty = every lm-eval task (slow to index)
    num_fewshot: int | None = None             # None: the task's own default
    mc_num: int = 128                          # Monte Carlo samples per likelihood request
    cfg_scale: float | dict[str, float] | None = None  # guidance; a number or {family: scale}
    gen_length: int | None = None              # generation tasks: answer length (lm-eval's max_gen_toks)
    steps: int | None = None                   # sampler steps (None: gen_length, one token per step)
    block_length: int | None = None            # LLaDA semi-autoregressive block (Dream has none)
    unsafe_code: bool = False                  # runs model-written code (HumanEval, MBPP)
    metric: str | None = None                  # headline metric for the average (lm-eval key, filter after ',')

    def __post_init__(self) -> None:
        for key in ("gen_length", "steps", "block_length", "mc_num"):
            value = getattr(self, key)
            if value is not None and int(value) <= 0:
                raise ConfigError(f"benchmark task {self.task}: {key} must be positive, got {value}")
        if self.num_fewshot is not None and int(self.num_fewshot) < 0:
            raise ConfigError(f"benchmark task {self.task}: num_fewshot must be >= 0, got {self.num_fewshot}")

    def sampler_for(self, sampler: Sampler) -> Sampler:
        """The run's sampler with this task's generation length, steps and (LLaDA) block length."""
        if self.gen_length is None:
            return sampler
        return sampler.with_length(int(self.gen_length), self.steps, self.block_length)


# ---- task folders and datasets -------------------------------------------------------------------
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


@dataclass(frozen=True)
class DatasetRef:
    path: str
    name: str | None
    task: str  # a leaf task that reads it (for the message)


def leaf_configs(manager, name: str) -> list[dict[str, Any]]:
    """The raw YAML configs (functions unresolved) of every leaf task under a task / group / tag name."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    out: list[dict[str, Any]] = []
    seen: set[str] = set()

    def walk(spec: str | Mapping[str, Any]) -> None:
        key = spec if isinstance(spec, str) else str(spec.get("task") or spec.get("group"))
        if key in seen:
            return
        seen.add(key)
        entry = manager.task_index.get(key)
        if entry is None:
            if isinstance(spec, Mapping) and "task" in spec:
                out.append(dict(spec))
            return
        if entry.kind == Kind.TAG:
            for child in sorted(entry.tags):
                walk(child)
            return
        cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else dict(entry.cfg or {})
        if entry.kind == Kind.GROUP:
            for child in cfg.get("task") or []:
                walk(child)
        else:
            out.append(cfg if isinstance(spec, str) else {**cfg, **spec})

    walk(name)
    return out


def dataset_refs(configs: Sequence[Mapping[str, Any]]) -> list[DatasetRef]:
    refs: dict[tuple[str, str | None], DatasetRef] = {}
    for cfg in configs:
        path = cfg.get("dataset_path")
        if path and not (cfg.get("dataset_kwargs") or {}).get("data_files"):
            refs.setdefault((str(path), cfg.get("dataset_name")), DatasetRef(str(path), cfg.get("dataset_name"),
                                                                             str(cfg.get("task"))))
    return list(refs.values())


def missing_dataset_message(ref: DatasetRef, data_dir: str | None) -> str:
    config = f" (config {ref.name})" if ref.name else ""
    name = f", {ref.name!r}" if ref.name else ""
    root = data_dir or "<data_dir>"
    return (f"task {ref.task}: dataset {ref.path}{config} is not available offline; provide local files with "
            f"`hf download --repo-type dataset {ref.path} --local-dir {Path(root) / ref.path}` on a machine with "
            f"network and benchmark.data_dir={root} (or FAIR_CALIB_DATA), or fill the Hugging Face cache there with "
            f"datasets.load_dataset({ref.path!r}{name}) and copy ~/.cache/huggingface to HF_HOME here")


def check_datasets(refs: Sequence[DatasetRef], data_dir: str | None, known: set | None = None) -> None:
    """Raise DatasetUnavailableError (one line) for the first dataset neither in the local mirror nor the cache.
    `known`: (path, name) pairs already found, skipped and extended (a benchmark checks before every run)."""
    import datasets

    known = set() if known is None else known
    for ref in refs:
        if (ref.path, ref.name) in known or (data_dir and (Path(data_dir) / ref.path).is_dir()):
            continue
        try:
            datasets.load_dataset_builder(ref.path, ref.name)
        except Exception as err:  # noqa: BLE001 - offline datasets raise ConnectionError, FileNotFoundError, ValueError
            raise DatasetUnavailableError(missing_dataset_message(ref, data_dir)) from err
        known.add((ref.path, ref.name))


@contextlib.contextmanager
def hf_offline(enabled: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / HF_EVALUATE_OFFLINE for this scope, also in already imported modules
    (they read the variables at import), so a missing file fails at once instead of retrying the network."""
    if not enabled:
        yield
        return
    import sys

    import datasets.config  # noqa: F401  (imported here, with the caller's environment, then patched)
    import huggingface_hub.constants  # noqa: F401

    with contextlib.suppress(ImportError):
        import evaluate.config  # noqa: F401

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")
    old_env = {k: os.environ.get(k) for k in names}
    patched: list[tuple[Any, str, Any]] = []
    for module, attrs in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                          ("evaluate.config", ("HF_EVALUATE_OFFLINE",))):
        mod = sys.modules.get(module)
        for attr in attrs if mod is not None else ():
            patched.append((mod, attr, getattr(mod, attr, None)))
            setattr(mod, attr, True)
    os.environ.update({k: "1" for k in names})
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_mirror(data_dir: str | None) -> Iterator[None]:
    """datasets.load_dataset(path, ...) reads `data_dir/path` when that folder exists (a local copy of the dataset
    repository: parquet / json / csv files, or a hub snapshot with its README configs)."""
    if not data_dir:
        yield
        return
    import datasets

    original = datasets.load_dataset

    @functools.wraps(original)
    def load_dataset(path: str, *args: Any, **kwargs: Any):
        local = Path(data_dir) / str(path)
        return original(str(local) if local.is_dir() else path, *args, **kwargs)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original


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


def load_error(task: str, err: BaseException) -> ConfigError:
    """One line for an exception raised while lm-eval builds a task (missing package, metric or file)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, ImportError):
        return ConfigError(f"task {task} needs a Python package that is not installed ({first}); install lm-eval's "
                           "extra for it, e.g. pip install 'lm-eval[math]' for minerva_math")
    if "code_eval" in str(err) or "evaluate" in type(err).__module__:
        return DatasetUnavailableError(
            f"task {task}: the Hugging Face `evaluate` metric code_eval is not available offline ({first}); on a "
            "machine with network run python -c \"import evaluate; evaluate.load('code_eval')\" and copy "
            "~/.cache/huggingface/modules to HF_HOME/modules here")
    return DatasetUnavailableError(f"task {task} could not be loaded offline ({type(err).__name__}: {first}); "
                                   "see the README section on datasets for offline use")


def sample_record(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A compact, JSON-able record of one lm-eval logged sample (prompt, target, responses, metrics)."""
    args = sample.get("arguments") or [()]
    record: dict[str, Any] = {"doc_id": sample["doc_id"], "prompt": args[0][0] if args[0] else None,
                              "target": sample.get("target")}
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


# ---- the benchmark -----------------------------------------------------------------------------
@register("benchmark", "lm_eval")
class HarnessBenchmark(Benchmark):
    """lm-eval tasks by name, one `simple_evaluate` per task with that task's wrapper settings."""

    def __init__(self, tasks: Mapping[str, Mapping[str, Any]], limit: int | float | None = None,
                 offline: bool = True, data_dir: str | None = None, confirm_run_unsafe_code: bool = False,
                 apply_chat_template: bool = False, fewshot_as_multiturn: bool = False, batch_size: int = 8,
                 mc_batch_size: int = 32, max_length: int = 4096, add_special_tokens: bool = False,
                 check_greedy: bool = False, bootstrap_iters: int = 0,
                 diagnostic_task: str | None = None, show_progress: bool = True,
                 estimator: str = "stratified") -> None:
        self.estimator = check_estimator(str(estimator))
        if not tasks:
            raise ConfigError("benchmark.tasks is empty: name lm-eval tasks, e.g. "
                              "+benchmark.tasks.arc_easy.task=arc_easy, or pick benchmark=paper10 / gsm8k / ...")
        self.tasks: dict[str, HarnessTask] = {}
        for key, spec in tasks.items():
            spec = dict(spec or {})
            spec.setdefault("task", key)
            try:
                self.tasks[key] = HarnessTask(**spec)
            except TypeError as err:
                valid = ", ".join(f.name for f in dataclasses.fields(HarnessTask))
                raise ConfigError(f"benchmark.tasks.{key}: {err}; valid keys: {valid}") from err
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
        if diagnostic_task is not None and diagnostic_task not in self.tasks:
            raise ConfigError(f"benchmark.diagnostic_task {diagnostic_task!r}: not one of {', '.join(self.tasks)}")
        self.diagnostic_task = diagnostic_task or next(
            (k for k, t in self.tasks.items() if t.gen_length is not None), next(iter(self.tasks)))
        self.show_progress = bool(show_progress)
        self.last_samples: dict[str, list[dict[str, Any]]] = {}
        self._available: set[tuple[str, str | None]] = set()  # datasets found by an earlier check

    # ---- what the pipeline asks before running ------------------------------------------------
    def task_names(self) -> list[str]:
        return [t.task for t in self.tasks.values()]

    def validate_sampler(self, sampler: Sampler) -> None:
        """Before any weights load: the sampler runs every task's generation settings, and every task
        exists with its datasets available (`check_available`)."""
        for t in self.tasks.values():
            if t.gen_length is not None:
                s = t.sampler_for(sampler)
                if hasattr(s, "validate"):
                    s.validate(s.gen_length)
                s.fitted(int(t.gen_length))
        self.check_available()

    def check_available(self) -> None:
        """Every task name known, code execution confirmed where needed, every dataset readable offline."""
        manager = self._manager(list(self.tasks.values()))
        for task in self.tasks.values():
            with self._environment(task):
                self._preflight(task, manager)

    def _manager(self, tasks: Sequence[HarnessTask]):
        folders = [f for t in tasks for f in t.folders]
        everything = any(not t.folders for t in tasks)
        return task_manager(None if everything else tuple(dict.fromkeys(folders)))

    def _preflight(self, task: HarnessTask, manager) -> None:
        """Unknown name, unconfirmed code execution, missing dataset: one line each, before any model call."""
        if task.task not in manager.all_tasks:
            where = ", ".join(task.folders) if task.folders else "lm-eval's task folders"
            raise ConfigError(f"benchmark task {task.task!r} is not an lm-eval task in {where}")
        configs = leaf_configs(manager, task.task)
        if any(c.get("unsafe_code") for c in configs) and not self.confirm_run_unsafe_code:
            raise unsafe_code_error(task.task)
        if self.offline:
            check_datasets(dataset_refs(configs), self.data_dir, self._available)

    @contextlib.contextmanager
    def _environment(self, task: HarnessTask) -> Iterator[None]:
        with hf_offline(self.offline), local_mirror(self.data_dir), code_execution(task.unsafe_code), \
                quiet_lm_eval(), torch.no_grad():
            yield

    def diagnostic_prompts(self, n: int) -> list[str]:
        """The first n documents of `diagnostic_task` as zero-shot prompts (doc_to_text)."""
        task = self.tasks[self.diagnostic_task]
        manager = self._manager([task])
        with self._environment(task):
            self._preflight(task, manager)
            leaves = list(manager.load([task.task])["tasks"].values())
        prompts = [str(leaf.doc_to_text(doc)) for leaf in leaves for doc in leaf.eval_docs][:n]
        if len(prompts) < n:
            raise ConfigError(f"diagnostics.n_prompts={n}: only {len(prompts)} documents in {task.task}")
        return prompts

    def diagnostic_sampler(self, sampler: Sampler) -> Sampler:
        task = self.tasks[self.diagnostic_task]
        s = task.sampler_for(sampler)
        return s.fitted(int(task.gen_length))[0] if task.gen_length else s

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, model: DiffusionLM, sampler: Sampler, seed: int = 0,
                 limit: int | float | None = None, label: str = "") -> dict[str, dict[str, float]]:
        """Run every task; {task: {metric: value}}. The average is not a task: see `headline()`."""
        from lm_eval import simple_evaluate

        family = model_family(model)
        limit = limit if limit is not None else self.limit
        manager = self._manager(list(self.tasks.values()))
        metrics: dict[str, dict[str, float]] = {}
        self.last_samples = {}
        for key, task in self.tasks.items():
            lm = DiffusionEvalLM(model, task.sampler_for(sampler), seed=seed, batch_size=self.batch_size,
                                 mc_num=task.mc_num, mc_batch_size=self.mc_batch_size, max_length=self.max_length,
                                 gen_length=task.gen_length, cfg_scale=resolve_cfg_scale(task.cfg_scale, family),
                                 add_special_tokens=self.add_special_tokens, check_greedy=self.check_greedy,
                                 show_progress=self.show_progress, estimator=self.estimator,
                                 label=label)
            with self._environment(task):
                self._preflight(task, manager)
                try:
                    results = simple_evaluate(
                        model=lm, tasks=[task.task], task_manager=manager, num_fewshot=task.num_fewshot,
                        limit=limit, bootstrap_iters=self.bootstrap_iters, log_samples=True,
                        apply_chat_template=self.apply_chat_template,
                        fewshot_as_multiturn=self.fewshot_as_multiturn and self.apply_chat_template,
                        confirm_run_unsafe_code=self.confirm_run_unsafe_code,
                        random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=seed)
                except (ImportError, ConnectionError, FileNotFoundError) as err:
                    raise load_error(task.task, err) from err
            if results is None:  # a non-zero rank of a data-parallel run: rank 0 reports
                continue
            row = results["results"].get(task.task) or results.get("groups", {}).get(task.task) or {}
            metrics[key] = metric_values(row)
            self.last_samples[key] = [{"task": name, **sample_record(s)}
                                      for name, samples in results.get("samples", {}).items() for s in samples]
        return metrics

    def headline(self) -> dict[str, str]:
        """{task: headline metric key} for every task whose config names one (`metric:`): the one rule
        behind `*/avg`, table.md, the report, W&B and the sweep objective."""
        return {key: task.metric for key, task in self.tasks.items() if task.metric is not None}

    def score_keys(self) -> dict[str, list[str]]:
        """{task: metric keys kept per document}: each task's headline metric."""
        return {task: [metric] for task, metric in self.headline().items()}
