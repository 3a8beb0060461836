"""FAIR-Calib Stage I (DESIGN section 3): probe the full-precision teacher and accumulate the position prior.

The teacher decodes calibration prompts (cycled to `n_probe` rollouts) under a commit policy
(default: LLaDA sampler with uniformly random commits, one block over the whole answer, so the
prior does not depend on an inference policy). From each rollout's `CommitTrace`, over every step
t and answer position i < K:

    F_i += lambda0(t) * 1{i committed at step t}
    R_i += lambda1 * c_{t,i} * 1{i still masked when step t starts}

lambda0 with u = t / (T - 1) (u = 0 when T = 1), T = the rollout's number of steps:
    early: 1 + gamma * (1 - u)     flat: 1     late: 1 + gamma * u
c_{t,i} is the teacher's sharpness (`prob` | `neg_entropy` | `margin`) min-max normalized per row
and step over that row's still-masked answer positions: (s - min) / (max - min), and 1 for every
masked position when max = min (in particular a row with a single masked position).

The result is cached as JSON under a hash of (model weights and config, probe settings, prompts
and their token ids); a second call with the same key loads it without probing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fair_calib.decoding.base import DecodingConfigError, left_pad
from fair_calib.decoding.trace import SCORES, CommitTrace
from fair_calib.models.dllm import DiffusionLM
from fair_calib.prior.position_prior import FORMAT_VERSION, PositionPrior
from fair_calib.registry import ConfigError, build, register
from fair_calib.utils.cache import DiskCache
from fair_calib.utils.io import stable_hash, state_dict_hash

log = logging.getLogger(__name__)

SCHEDULES = ("early", "flat", "late")


# ---- the math (pure functions) ------------------------------------------------------------------
def lambda0(num_steps: int, schedule: str = "early", gamma: float = 1.0) -> Tensor:
    """(T,) float64 time weights: u = t/(T-1); early 1 + gamma(1-u), late 1 + gamma u, flat 1."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"prior.schedule {schedule!r} unknown; valid: {', '.join(SCHEDULES)}")
    t = torch.arange(num_steps, dtype=torch.float64)
    u = t / (num_steps - 1) if num_steps > 1 else torch.zeros_like(t)
    if schedule == "early":
        return 1.0 + gamma * (1.0 - u)
    if schedule == "late":
        return 1.0 + gamma * u
    return torch.ones_like(t)


def normalize_scores(scores: Tensor, masked: Tensor) -> Tensor:
    """Per-row min-max of (..., G) scores over the masked positions -> [0, 1]; 0 where not masked.

    c = (s - min_masked) / (max_masked - min_masked); when max = min (e.g. one masked position) c = 1.
    """
    s = scores.double()
    if not bool(torch.isfinite(s[masked]).all()):
        raise ValueError("non-finite teacher sharpness at a masked position (check the trace's score computation)")
    inf = torch.tensor(torch.inf, dtype=torch.float64)
    lo = torch.where(masked, s, inf).amin(-1, keepdim=True)
    hi = torch.where(masked, s, -inf).amax(-1, keepdim=True)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    c = torch.where(span > 0, (s - lo) / safe, torch.ones_like(s))
    return torch.where(masked, c, torch.zeros_like(c))


def accumulate_trace(trace: CommitTrace, window: int, schedule: str = "early", gamma: float = 1.0,
                     lambda1: float = 1.0, score: str = "prob") -> tuple[Tensor, Tensor]:
    """One batched rollout -> raw (F, R), each (K,) float64, summed over its rows and steps (positions i < K)."""
    if score not in SCORES:
        raise ConfigError(f"prior.score {score!r} unknown; valid: {', '.join(SCORES)}")
    if trace.num_steps == 0:
        z = torch.zeros(window, dtype=torch.float64)
        return z, z.clone()
    if trace.gen_length < window:
        raise ConfigError(f"prior.window {window} exceeds the rollout length {trace.gen_length}; "
                          f"set prior.gen_length >= prior.window")
    committed = trace.stacked("committed")[..., :window].double()  # (T, B, K)
    masked = trace.masked_before()  # (T, B, G)
    lam = lambda0(trace.num_steps, schedule, gamma)[:, None, None]
    frontier = (lam * committed).sum((0, 1))
    c = normalize_scores(trace.stacked(score), masked)[..., :window]  # normalized over all G masked positions
    reliability = lambda1 * c.sum((0, 1))
    return frontier, reliability


# ---- the registered Stage I probes -------------------------------------------------------------
@register("prior", "fair")
class FairPrior:
    """Stage I probe: `estimate(model, prompts)` -> `PositionPrior` (cached on disk when `cache_dir` is set)."""

    def __init__(self, n_probe: int = 128, window: int = 256, schedule: str = "early", gamma: float = 1.0,
                 lambda1: float = 1.0, score: str = "prob", sampler: dict[str, Any] | None = None,
                 gen_length: int | None = None, steps: int | None = None, batch_size: int = 16, seed: int = 0,
                 cache_dir: str | None = None, force: bool = False, progress: bool = True) -> None:
        if n_probe <= 0 or window <= 0 or batch_size <= 0:
            raise ConfigError("prior.n_probe, prior.window and prior.batch_size must be positive")
        if schedule not in SCHEDULES:
            raise ConfigError(f"prior.schedule {schedule!r} unknown; valid: {', '.join(SCHEDULES)}")
        if score not in SCORES:
            raise ConfigError(f"prior.score {score!r} unknown; valid: {', '.join(SCORES)}")
        if lambda1 < 0 or gamma < -1:
            raise ConfigError("prior.lambda1 must be >= 0 and prior.gamma >= -1 (lambda0 must stay non-negative)")
        self.n_probe, self.window, self.schedule, self.gamma = int(n_probe), int(window), schedule, float(gamma)
        self.lambda1, self.score, self.batch_size, self.seed = float(lambda1), score, int(batch_size), int(seed)
        self.sampler_cfg = self._sampler_config(sampler, gen_length, steps)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.force, self.progress = bool(force), bool(progress)

    def _sampler_config(self, sampler: dict[str, Any] | None, gen_length: int | None,
                        steps: int | None) -> dict[str, Any]:
        """The decoding config the probe runs: knobs > the sampler dict > defaults (G = K, steps = G, one block);
        built here, so a bad one fails before any weights load, and stored with every field the sampler has."""
        cfg = dict(sampler) if sampler else {"name": "llada", "remasking": "random"}
        if "name" not in cfg:
            raise ConfigError("prior.sampler needs a 'name' (a decoding key such as llada or dream)")
        g = int(gen_length or cfg.get("gen_length") or self.window)
        if g < self.window:
            raise ConfigError(f"prior.gen_length {g} is shorter than prior.window {self.window}; "
                              f"set prior.gen_length >= prior.window")
        steps = int(steps or cfg.get("steps") or g)
        try:
            lengths = ("gen_length", "steps", "block_length")  # set together below, where they fit each other
            built = build("decoding", {k: v for k, v in cfg.items() if k not in lengths})
            built = built.with_length(g, steps, cfg.get("block_length"))  # a dataclass copy: checked again
        except DecodingConfigError as err:
            raise ConfigError(f"prior.sampler: {err}") from err
        return {"name": cfg["name"], **dataclasses.asdict(built)}

    def settings(self) -> dict[str, Any]:
        """Everything that changes the maps (goes into the cache key and into the saved prior)."""
        return {"n_probe": self.n_probe, "window": self.window, "schedule": self.schedule, "gamma": self.gamma,
                "lambda1": self.lambda1, "score": self.score, "sampler": self.sampler_cfg,
                "batch_size": self.batch_size, "seed": self.seed}

    def cache_key(self, model: DiffusionLM, prompts: list[str], weights_hash: str | None = None) -> str:
        """sha256 of (state-dict bytes, model config, probe settings, prompts and their token ids);
        `weights_hash`: the caller's `state_dict_hash(model)`, so a run reads the weights once for all caches."""
        return stable_hash({
            "format_version": FORMAT_VERSION,
            "model": weights_hash or state_dict_hash(model),
            "config": model.config.to_dict(),
            "settings": self.settings(),
            "prompts": list(prompts),
            "ids": self._encode(model, prompts),
        })

    @staticmethod
    def _encode(model: DiffusionLM, prompts: list[str]) -> list[list[int]]:
        if model.tokenizer is None:
            raise ConfigError("prior=fair needs a model with a tokenizer (attach one as model.tokenizer)")
        return [list(model.tokenizer.encode(p, add_special_tokens=False)) for p in prompts]

    @property
    def cache(self) -> DiskCache:
        return DiskCache(self.cache_dir, "prior", prefix="prior-", force=self.force, log=log)

    def estimate(self, model: DiffusionLM, prompts: list[str], out_dir: str | Path | None = None,
                 weights_hash: str | None = None) -> PositionPrior:
        """Load the prior for (model, settings, prompts) from the cache, or probe the teacher and cache it."""
        if not prompts:
            raise ConfigError("prior=fair needs at least one calibration prompt")
        key = self.cache_key(model, prompts, weights_hash)

        def compute() -> PositionPrior:
            prior = self.probe(model, prompts)
            prior.key = key
            return prior

        prior, _ = self.cache.get(key, compute, PositionPrior.from_json, lambda p, tmp: p.to_json(tmp))
        if out_dir is not None:
            prior.save(out_dir)
        return prior

    def probe(self, model: DiffusionLM, prompts: list[str]) -> PositionPrior:
        """Run `n_probe` teacher rollouts (prompts cycled) in batches and accumulate F and R over their traces."""
        try:
            sampler = build("decoding", self.sampler_cfg)
        except DecodingConfigError as err:
            raise ConfigError(f"prior.sampler: {err}") from err
        encoded = self._encode(model, prompts)
        rollouts = [encoded[j % len(encoded)] for j in range(self.n_probe)]
        frontier = torch.zeros(self.window, dtype=torch.float64)
        reliability = torch.zeros(self.window, dtype=torch.float64)
        n_steps = 0
        device = model.device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), tqdm(total=self.n_probe, desc="Stage I probe", unit="rollout",
                                       disable=not self.progress) as bar:
                for start in range(0, self.n_probe, self.batch_size):
                    batch = rollouts[start:start + self.batch_size]
                    ids, mask = left_pad(batch, model.config.pad_id)
                    out = sampler.generate(model, ids.to(device), mask.to(device), record_trace=True, generator=gen)
                    f, r = accumulate_trace(out.trace, self.window, self.schedule, self.gamma, self.lambda1,
                                            self.score)
                    frontier += f
                    reliability += r
                    n_steps += out.trace.num_steps
                    bar.update(len(batch))
        finally:
            model.train(was_training)
        return PositionPrior(frontier, reliability, n_rollouts=self.n_probe, settings=self.settings(),
                             n_steps=n_steps)


@register("prior", "none")
def no_prior() -> None:
    """No position prior: `build("prior", {"name": "none"})` is None and the weighting must be `uniform`."""
    return None
