"""The one contract between the pipeline and a benchmark (`benchmark=tiny`, `benchmark=lm_eval` and its presets).

    evaluate(model, sampler, seed, label)  {task: {metric: value}}; the per-document records of that call are
                                           in `last_samples` ({task: [record, ...]}) for samples/ and the CIs
    headline()                             {task: metric}: each task's headline metric, defined once
    score_keys()                           {task: [metric, ...]}: the per-document scores the CIs resample
    task_names()                           the lm-eval task names, in table order
    validate_sampler(sampler)              refuse a decoding config no task can use (before weights load)
    diagnostic_prompts(n)                  n prompts of the diagnostic task, for the frontier diagnostics
    diagnostic_sampler(sampler)            the sampler fitted to the diagnostic task's answer length
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from fair_calib.decoding.base import Sampler
from fair_calib.errors import ConfigError
from fair_calib.models.dllm import DiffusionLM


class Benchmark(ABC):
    """Base of the benchmarks the pipeline evaluates with; see the module docstring for the contract."""

    last_samples: dict[str, list[dict[str, Any]]]

    @abstractmethod
    def evaluate(self, model: DiffusionLM, sampler: Sampler, seed: int = 0, limit: int | None = None,
                 label: str = "") -> dict[str, dict[str, float]]:
        ...

    @abstractmethod
    def headline(self) -> dict[str, str]:
        ...

    @abstractmethod
    def score_keys(self) -> dict[str, list[str]]:
        ...

    @abstractmethod
    def task_names(self) -> list[str]:
        ...

    @abstractmethod
    def validate_sampler(self, sampler: Sampler) -> None:
        """Refuse (ConfigError) a decoding config that no task of the benchmark can use."""

    def diagnostic_prompts(self, n: int) -> list[str]:
        raise ConfigError(f"benchmark {type(self).__name__} provides no prompts for the diagnostics; "
                          "set diagnostics.enabled=false")

    def diagnostic_sampler(self, sampler: Sampler) -> Sampler:
        return sampler
