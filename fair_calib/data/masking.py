"""Masked calibration states: a teacher-forced `CalibrationSet` turned into the partly masked inputs a dLLM sees.

Standard PTQ calibrates on fully visible sequences; at inference a dLLM sees canvases in which part of the
answer is still the mask token. `data.masking` picks how the calibration rows are masked (DESIGN section 10).
The prompt is never masked, padding (attention 0) is never masked, and a masked position keeps its
`answer_offset`, so the per-token weights of the weighting apply to masked and visible positions alike.

    none   the teacher-forced rows unchanged (FAIR-Calib's own off-policy calibration, DESIGN section 3).

    mcs    Masked Calibration Simulation (Quant-dLLM, Zhang et al., arXiv 2510.03274, the MCS component):
           calibrate on the states of the masked-diffusion forward process. Every row n and copy c draws
           its own diffusion time and masks each answer token independently with that probability:

               t_{n,c} ~ U(eps, 1)                       (as LLaDA's forward process: eps + (1 - eps) u, u ~ U(0, 1))
               m_{n,c,i} ~ Bernoulli(t_{n,c})            for every answer position i (answer_offset >= 0, attended)

           so E[masked fraction] = E[t] = (1 + eps) / 2. `data.mask_copies` maskings per row (rows and prompts
           repeated, copy-major: rows [0, N) are the first masking of every row), `data.mask_eps` = eps (1e-3,
           LLaDA's eps; the Quant-dLLM text itself could not be consulted here, see below).

    tmas   Temporal-Mask Adaptive Sampling (DLLMQuant, Xu & Yang, arXiv 2508.14090, the TMAS component):
           calibrate on states of the FP teacher's own decoding trajectories, drawn across time steps so that
           every mask ratio of the decoding process is represented. The teacher decodes each row's prompt
           with the run's sampler (`decoding=`) fitted to that row's calibration answer window G_n = attended
           row length - prompt length (`Sampler.fitted`, the evaluation's rule: tokens per step kept; LLaDA's
           canvas rounded up to a multiple of its block when G_n > block_length). Its `CommitTrace`
           gives the canvas S_t (committed tokens, mask id elsewhere) the model saw when step t started. The
           K = N * mask_copies states take their steps by stratified sampling of the normalized time
           u = t / T over the whole set:

               u_k = (pi_k + v_k) / K,   pi = a seeded permutation of 0..K-1,   v_k ~ U(0, 1)
               t_k = floor(u_k * T_n)    (T_n = number of steps of row n's rollout; state k is row k mod N)

           so each of the K equal slices of [0, 1) holds exactly one state: early (mask ratio near 1), middle
           and late (near 0) states are all present whatever the set size, and a row's copies take different
           steps. Row k = prompt of row n + S_{t_k} (length P_n + G_n, the teacher-forced row's length unless
           rounded; right-padded with attention 0 to the longest), `masked` = S_{t_k} is the mask id,
           `answer_offset` = -1 on the prompt and the padding, 0..G_n-1 on the canvas (the generation positions
           the prior covers). Rollouts come from the teacher
           trajectory cache (`fair_calib.diagnostics.trajectory.teacher_trajectory`, keyed by weights,
           prompt ids, sampler, seed, length, batch size), so a repeated run does not decode again.

Sources: the rule names and their summaries (MCS: each answer token masked with probability t, t ~ U(eps, 1);
TMAS: states across time steps and mask ratios of the decoding process) are those of DESIGN section 10 and of
the two papers' abstracts. The method sections of the papers (the exact equations) were not retrievable from
the reference store when this module was written; the stratified step rule of `tmas` is therefore this
project's reading of "sampling across time steps and mask ratios", not a transcription of a DLLMQuant equation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fair_calib.data.calibration import CalibrationSet
from fair_calib.registry import ConfigError

log = logging.getLogger(__name__)

MASKINGS = ("none", "mcs", "tmas")
MCS_EPS = 1e-3  # LLaDA's forward process: p_mask = eps + (1 - eps) u
SAMPLER_FAMILIES = ("llada", "dream")  # model families this project has a sampler for (conf/decoding)


@dataclass(frozen=True)
class MaskingSpec:
    """The `data.masking*` keys of a run, checked at construction (one-line ConfigError naming the fix)."""

    masking: str = "none"
    mask_copies: int = 1
    mask_eps: float = MCS_EPS
    tmas_batch_size: int = 8  # teacher rollouts per batch (part of the trajectory cache key)
    seed: int = 0  # the run's calibration seed (data.seed = ${seed})

    def __post_init__(self) -> None:
        if self.masking not in MASKINGS:
            raise ConfigError(f"data.masking={self.masking!r} unknown; valid: {', '.join(MASKINGS)}")
        for key, value in (("mask_copies", self.mask_copies), ("tmas_batch_size", self.tmas_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key}={value!r}: must be an integer >= 1, e.g. data.{key}=1")
        eps = self.mask_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
            raise ConfigError(f"data.mask_eps={eps!r}: must be a number in (0, 1), the smallest masking time "
                              f"(e.g. data.mask_eps={MCS_EPS})")

    @property
    def active(self) -> bool:
        return self.masking != "none"

    def check_sampler(self, model_spec: Any, sampler: Any) -> None:
        """tmas decodes with the teacher: the model's family needs a sampler, and `decoding=` must be one."""
        if self.masking != "tmas":
            return
        from fair_calib.decoding.base import Sampler

        family = str(getattr(model_spec, "model_type", "") or "").lower()
        label = getattr(model_spec, "label", family)
        if family not in SAMPLER_FAMILIES:
            raise ConfigError(f"data.masking=tmas decodes the calibration prompts with the teacher, but the model "
                              f"({label}, model_type {family or '?'}) has no sampler here (samplers exist for "
                              f"{', '.join(SAMPLER_FAMILIES)}); use data.masking=mcs or none")
        if not isinstance(sampler, Sampler):
            raise ConfigError(f"data.masking=tmas decodes with the run's sampler, but decoding="
                              f"{type(sampler).__name__} is not a sampler; pick decoding=llada or decoding=dream, "
                              "or data.masking=mcs")

    def apply(self, calib: CalibrationSet, model: Any = None, sampler: Any = None, *,
              cache_dir: str | Path | None = None, force: bool = False,
              weights_hash: str | None = None) -> CalibrationSet:
        """The masked calibration set (`calib` itself for masking=none); tmas needs the FP `model` and `sampler`."""
        if self.masking == "none":
            return calib
        if self.masking == "mcs":
            return mcs_states(calib, mask_id_of(model), self.mask_copies, self.mask_eps, self.seed)
        return tmas_states(calib, model, sampler, self.mask_copies, self.seed, batch_size=self.tmas_batch_size,
                           cache_dir=cache_dir, force=force, weights_hash=weights_hash)


MASKING_KEYS = tuple(f.name for f in fields(MaskingSpec) if f.name != "seed")
# keys that change nothing under a given masking (left out of the run hash, so masking=none runs keep their hash)
INERT_KEYS = {"none": MASKING_KEYS, "mcs": ("tmas_batch_size",), "tmas": ("mask_eps",)}


def masking_spec(data: Mapping[str, Any]) -> MaskingSpec:
    """The MaskingSpec of a resolved `data` config (missing keys take their defaults)."""
    return MaskingSpec(**{k: data[k] for k in MASKING_KEYS if k in data}, seed=data.get("seed", 0))


def split_masking_keys(builder: str, keys: Mapping[str, Any]) -> MaskingSpec:
    """A data builder's extra keyword arguments: the masking keys (checked), anything else refused by name."""
    unknown = sorted(set(keys) - set(MASKING_KEYS))
    if unknown:
        raise ConfigError(f"data={builder}: unknown key(s) {', '.join(unknown)}; the masking keys are "
                          f"{', '.join(MASKING_KEYS)}")
    return MaskingSpec(**keys)


def hashed_data_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` without the masking keys that cannot change the run's numbers (for `pipeline.run_key`)."""
    drop = INERT_KEYS.get(str(data.get("masking", "none")), ())
    return {k: v for k, v in data.items() if k not in drop}


def mask_id_of(model: Any) -> int:
    mask_id = getattr(model, "mask_id", None)
    if mask_id is None:
        raise ConfigError("data.masking needs the model's mask token id (model.config.mask_id)")
    return int(mask_id)


# ---- mcs ------------------------------------------------------------------------------------------------------
def answer_positions(calib: CalibrationSet) -> Tensor:
    """(N, L) bool: the positions a masking may replace (answer tokens that are attended)."""
    return (calib.answer_offset >= 0) & (calib.attention_mask != 0)


def draw_mcs(answer: Tensor, copies: int, eps: float, seed: int) -> tuple[Tensor, Tensor]:
    """MCS draws for N rows: (t (copies * N,) float64, masked (copies * N, L) bool), copy-major.

    t = eps + (1 - eps) u with u ~ U(0, 1); each answer position masked iff its uniform draw < t.
    """
    gen = torch.Generator().manual_seed(int(seed))
    rows = answer.repeat(copies, 1)
    t = eps + (1.0 - eps) * torch.rand(rows.shape[0], dtype=torch.float64, generator=gen)
    u = torch.rand(rows.shape, dtype=torch.float64, generator=gen)
    return t, (u < t[:, None]) & rows


def mcs_states(calib: CalibrationSet, mask_id: int, copies: int = 1, eps: float = MCS_EPS,
               seed: int = 0) -> CalibrationSet:
    """`copies` MCS maskings of every row (copy-major), ids replaced by `mask_id` where masked."""
    _, masked = draw_mcs(answer_positions(calib), copies, eps, seed)
    ids = calib.input_ids.repeat(copies, 1)
    ids = torch.where(masked, torch.full_like(ids, int(mask_id)), ids)
    return CalibrationSet(ids, calib.attention_mask.repeat(copies, 1), calib.answer_offset.repeat(copies, 1),
                          list(calib.prompts) * copies, masked)


# ---- tmas -----------------------------------------------------------------------------------------------------
def stratified_steps(num_steps: Tensor, seed: int) -> Tensor:
    """(K,) step per state: t_k = floor(u_k T_k), u_k = (pi_k + v_k) / K (one state in each K-th of [0, 1))."""
    k = int(num_steps.numel())
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(k, generator=gen).double()
    v = torch.rand(k, dtype=torch.float64, generator=gen)
    u = (perm + v) / k
    steps = torch.floor(u * num_steps.double()).long()
    return torch.minimum(steps, num_steps.long() - 1)  # u < 1, but keep float rounding inside the trajectory


def answer_windows(calib: CalibrationSet, prompt_lengths: list[int]) -> list[int]:
    """G_n per row: the attended row length minus the prompt length (the calibration answer window), at least 1."""
    lengths = calib.attention_mask.ne(0).sum(1).tolist()
    return [max(1, int(n) - p) for n, p in zip(lengths, prompt_lengths)]


def teacher_canvases(model: Any, prompt_ids: list[list[int]], windows: list[int], sampler: Any, seed: int, *,
                     batch_size: int = 8, cache_dir: str | Path | None = None, force: bool = False,
                     weights_hash: str | None = None) -> list[Tensor]:
    """Per row, the (T, G) canvases S_0..S_{T-1} of the teacher's rollout with the sampler fitted to its window.

    Rows with the same fitted length decode together (one cached trajectory per length, in row order).
    """
    from fair_calib.diagnostics.trajectory import teacher_trajectory

    groups: dict[int, tuple[Any, list[int]]] = {}
    for row, window in enumerate(windows):
        fitted, g = sampler.fitted(window)
        groups.setdefault(g, (fitted, []))[1].append(row)
    canvases: list[Tensor | None] = [None] * len(windows)
    for g, (fitted, rows) in groups.items():
        traj = teacher_trajectory(model, [prompt_ids[r] for r in rows], fitted, seed=int(seed), gen_length=g,
                                  batch_size=int(batch_size), cache_dir=cache_dir, force=force,
                                  weights_hash=weights_hash)
        states = [s for trace in traj.traces for s in trace.states().unbind(1)]  # (T, G) per row
        for r, state in zip(rows, states):
            canvases[r] = state
    return canvases  # type: ignore[return-value]


def tmas_states(calib: CalibrationSet, model: Any, sampler: Any, copies: int = 1, seed: int = 0, *,
                batch_size: int = 8, cache_dir: str | Path | None = None, force: bool = False,
                weights_hash: str | None = None) -> CalibrationSet:
    """N * copies states of the teacher's own trajectories on the calibration prompts (module docstring)."""
    from fair_calib.diagnostics.trajectory import encode_prompts

    if model is None or sampler is None:
        raise ConfigError("data.masking=tmas needs the FP model and the run's sampler (decoding=)")
    mask_id = mask_id_of(model)
    prompt_ids = encode_prompts(model, list(calib.prompts))
    canvases = teacher_canvases(model, prompt_ids, answer_windows(calib, [len(p) for p in prompt_ids]), sampler,
                                seed, batch_size=batch_size, cache_dir=cache_dir, force=force,
                                weights_hash=weights_hash)
    n = len(calib)
    num_steps = torch.tensor([canvases[k % n].shape[0] for k in range(n * copies)])
    if bool((num_steps == 0).any()):
        raise ConfigError("data.masking=tmas: a teacher rollout recorded no decoding step; check decoding.steps")
    steps = stratified_steps(num_steps, seed)
    width = max(len(p) + c.shape[1] for p, c in zip(prompt_ids, canvases))
    shape = (n * copies, width)
    ids = torch.full(shape, int(model.config.pad_id), dtype=torch.long)
    attn = torch.zeros(shape, dtype=torch.long)
    offset = torch.full(shape, -1, dtype=torch.long)
    masked = torch.zeros(shape, dtype=torch.bool)
    for k in range(n * copies):
        p, state = prompt_ids[k % n], canvases[k % n][int(steps[k])]
        end = len(p) + state.numel()
        ids[k, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[k, len(p): end] = state
        attn[k, :end] = 1
        offset[k, len(p): end] = torch.arange(state.numel())
        masked[k, len(p): end] = state == mask_id
    out = CalibrationSet(ids, attn, offset, list(calib.prompts) * copies, masked)
    ratio = mask_ratio(out)
    log.info("tmas: %d states from %d teacher rollouts, mask ratio min %.2f / mean %.2f / max %.2f", len(out), n,
             float(ratio.min()), float(ratio.mean()), float(ratio.max()))
    return out


def mask_ratio(calib: CalibrationSet) -> Tensor:
    """(N,) float: share of each row's answer positions that are the mask token (0 for teacher-forced rows)."""
    answer = answer_positions(calib)
    return (calib.mask_status() & answer).sum(1).double() / answer.sum(1).clamp(min=1).double()


__all__ = ["INERT_KEYS", "MASKINGS", "MASKING_KEYS", "MCS_EPS", "MaskingSpec", "answer_positions", "answer_windows",
           "draw_mcs", "hashed_data_config", "mask_ratio", "masking_spec", "mcs_states", "split_masking_keys",
           "stratified_steps", "teacher_canvases", "tmas_states"]
