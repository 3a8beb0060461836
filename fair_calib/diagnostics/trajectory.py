"""Rollouts with commit traces, and the FP teacher's trajectory cached on disk.

The teacher trajectory (states S_t, commit sets C_t, final tokens) is the same for every quantizer of
a sweep, so it is cached under a hash of (teacher weights, prompt ids, sampler settings, seed,
generation length, batch size) and computed once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fair_calib.decoding.base import Sampler, left_pad
from fair_calib.decoding.trace import SCORES, CommitTrace
from fair_calib.models.dllm import DiffusionLM
from fair_calib.utils.cache import DiskCache
from fair_calib.utils.io import stable_hash, state_dict_hash

log = logging.getLogger("fair_calib.diagnostics")

TRAJECTORY_FORMAT = 1  # bump when the stored layout or the rollout changes meaning


@dataclass
class Trajectory:
    """A model's rollout over a prompt set: one `CommitTrace` per prompt batch, in prompt order."""

    traces: list[CommitTrace]
    key: str = ""
    cache_hit: bool = False
    path: Path | None = None

    @property
    def num_prompts(self) -> int:
        return sum(t.batch_size for t in self.traces)

    def tokens(self) -> list[Tensor]:
        return [t.tokens for t in self.traces]


def encode_prompts(model: DiffusionLM, prompts: list[str]) -> list[list[int]]:
    """Prompt strings -> token ids with the model's tokenizer (no special tokens, as `generate_texts`)."""
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer attached; cannot encode diagnostic prompts")
    return [list(model.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]


def resolve_gen_length(sampler: Sampler, gen_length: int | None) -> int:
    return int(gen_length or sampler.gen_length)


@torch.no_grad()
def rollout(model: DiffusionLM, prompt_ids: list[list[int]], sampler: Sampler, *, seed: int = 0,
            gen_length: int | None = None, batch_size: int = 8, desc: str = "rollout",
            before_batch: Callable[[], None] | None = None) -> Trajectory:
    """Decode every prompt with `sampler`, recording traces; batch i uses a generator seeded with seed + i."""
    g = resolve_gen_length(sampler, gen_length)
    device = model.device
    traces = []
    starts = range(0, len(prompt_ids), batch_size)
    for i, s in enumerate(tqdm(starts, desc=desc, leave=False)):
        ids, mask = left_pad(prompt_ids[s:s + batch_size], model.config.pad_id)
        gen = torch.Generator(device=device).manual_seed(seed + i)
        if before_batch is not None:
            before_batch()
        out = sampler.generate(model, ids.to(device), mask.to(device), record_trace=True, generator=gen, gen_length=g)
        traces.append(out.trace)
    return Trajectory(traces)


def sampler_settings(sampler: Sampler) -> dict[str, Any]:
    """The sampler's class and fields: everything that changes which tokens it commits."""
    fields = dataclasses.asdict(sampler) if dataclasses.is_dataclass(sampler) else dict(vars(sampler))
    return {"class": type(sampler).__name__, **fields}


def trajectory_key(model: DiffusionLM, prompt_ids: list[list[int]], sampler: Sampler, seed: int, gen_length: int,
                   batch_size: int, weights_hash: str | None = None) -> str:
    """Hash of (weights, prompt ids, sampler settings, seed, gen length, batch size): the cache key
    (`weights_hash`: the caller's `state_dict_hash(model)`, computed once per run)."""
    return stable_hash({"format": TRAJECTORY_FORMAT, "weights": weights_hash or state_dict_hash(model),
                        "prompts": prompt_ids,
                        "sampler": sampler_settings(sampler), "seed": seed, "gen_length": gen_length,
                        "batch_size": batch_size})


def trace_to_dict(trace: CommitTrace) -> dict[str, Any]:
    """Plain tensors (steps stacked on dim 0) for `torch.save`."""
    return {"prompt": trace.prompt, "prompt_mask": trace.prompt_mask, "mask_id": int(trace.mask_id),
            "committed": trace.stacked("committed"), "confidence": trace.stacked("confidence"),
            "top1": trace.stacked("top1"), "scores": {k: trace.stacked(k) for k in SCORES}, "tokens": trace.tokens}


def trace_from_dict(d: dict[str, Any]) -> CommitTrace:
    return CommitTrace(d["prompt"], d["prompt_mask"], int(d["mask_id"]), committed=list(d["committed"].unbind(0)),
                       confidence=list(d["confidence"].unbind(0)), top1=list(d["top1"].unbind(0)),
                       scores={k: list(v.unbind(0)) for k, v in d["scores"].items()}, tokens=d["tokens"])


def teacher_trajectory(fp_model: DiffusionLM, prompt_ids: list[list[int]], sampler: Sampler, *, seed: int = 0,
                       gen_length: int | None = None, batch_size: int = 8, cache_dir: str | Path | None = None,
                       force: bool = False, weights_hash: str | None = None) -> Trajectory:
    """The FP teacher's rollout on the prompts, loaded from `cache_dir` when the same one was computed before."""
    g = resolve_gen_length(sampler, gen_length)
    key = trajectory_key(fp_model, prompt_ids, sampler, seed, g, batch_size, weights_hash)
    cache = DiskCache(None if cache_dir is None else Path(cache_dir) / "teacher_trajectory", "teacher trajectory",
                      suffix=".pt", force=force, log=log)

    def load(path: Path) -> list[CommitTrace]:
        return [trace_from_dict(d) for d in torch.load(path, map_location="cpu", weights_only=True)["traces"]]

    def compute() -> list[CommitTrace]:
        log.info("teacher trajectory: decoding %d prompts", len(prompt_ids))
        return rollout(fp_model, prompt_ids, sampler, seed=seed, gen_length=g, batch_size=batch_size,
                       desc="teacher").traces

    def save(traces: list[CommitTrace], tmp: Path) -> None:
        torch.save({"format": TRAJECTORY_FORMAT, "traces": [trace_to_dict(t) for t in traces]}, tmp)

    traces, hit = cache.get(key, compute, load, save)
    return Trajectory(traces, key, hit, cache.path(key))
