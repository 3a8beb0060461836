"""`run_diagnostics`: every frontier diagnostic of DESIGN section 6 for one (FP teacher, quantized model) pair.

Passes, each only when a requested metric needs it:
  1. teacher rollout with traces (cached on disk, shared by a sweep)       -> states S_t, C_t, tokens
  2. teacher-forced pass: FP and quantized logits on every S_t             -> flips, selection, prob MSE, KL
  3. quantized rollout with traces, the FP model riding along on its S^q_t -> lag, post-commit mismatch,
                                                                              prob MSE on own states
     (with LLaDA's CFG the own-state MSE is a separate pass after the rollout)
  4. full teacher sequences through both models                            -> last-block hidden MSE
Writes per-step curves and lag histograms (CSV), scalars (JSON) and PNG plots into `out_dir`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fair_calib import stats
from fair_calib.decoding.base import Sampler
from fair_calib.decoding.trace import CommitTrace
from fair_calib.diagnostics.flips import frontier_flips, selection_disagreement
from fair_calib.diagnostics.frontier_kl import frontier_kl
from fair_calib.diagnostics.hidden_mse import (
    PositionWeight,
    last_block_outputs,
    per_token_hidden_error,
    token_weights,
    weighted_mean,
)
from fair_calib.diagnostics.lag import concat, lag_histogram, lag_summary, trace_lags
from fair_calib.diagnostics.mismatch import PostCommit, teacher_token_mismatch, trace_post_commit
from fair_calib.diagnostics.plots import plot_lag_histograms, plot_step_curves
from fair_calib.diagnostics.policy import policy_logits, select_commits
from fair_calib.diagnostics.prob_mse import prob_mse
from fair_calib.diagnostics.trajectory import Trajectory, encode_prompts, rollout, teacher_trajectory
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError, build
from fair_calib.utils.io import write_json_atomic

log = logging.getLogger("fair_calib.diagnostics")

METRICS = ("flip_rate", "selection_disagreement", "stabilization_lag", "post_commit_mismatch", "prob_mse",
           "frontier_kl", "hidden_mse")
TEACHER_FORCED = {"flip_rate", "selection_disagreement", "prob_mse", "frontier_kl"}
NEEDS_Q_ROLLOUT = {"stabilization_lag", "post_commit_mismatch", "prob_mse"}


class StepCurve:
    """Per-step ratio sum_t num / sum_t den pooled over rows and batches, and its overall pooled value.

    `add_rows` also keeps each prompt's totals, so the overall value gets a CI over prompts (`interval`)."""

    def __init__(self) -> None:
        self.num: list[float] = []
        self.den: list[float] = []
        self.prompt_num: dict[int, float] = {}
        self.prompt_den: dict[int, float] = {}

    def add(self, t: int, num: float, den: float) -> None:
        while len(self.num) <= t:
            self.num.append(0.0)
            self.den.append(0.0)
        self.num[t] += float(num)
        self.den[t] += float(den)

    def add_rows(self, t: int, first_prompt: int, num: Tensor, den: Tensor) -> None:
        """Per-row (B,) numerators and denominators of step t for prompts first_prompt .. first_prompt + B - 1."""
        num_l, den_l = num.double().cpu().tolist(), den.double().cpu().tolist()
        self.add(t, sum(num_l), sum(den_l))
        for i, (n, d) in enumerate(zip(num_l, den_l)):
            self.prompt_num[first_prompt + i] = self.prompt_num.get(first_prompt + i, 0.0) + n
            self.prompt_den[first_prompt + i] = self.prompt_den.get(first_prompt + i, 0.0) + d

    def interval(self, confidence: float = 0.95) -> tuple[float, float] | None:
        """Bootstrap CI over prompts of the overall ratio; None without per-prompt totals."""
        keys = sorted(self.prompt_num)
        if not keys or not sum(self.prompt_den.values()):
            return None
        return stats.bootstrap_ratio_ci([self.prompt_num[k] for k in keys], [self.prompt_den[k] for k in keys],
                                        confidence=confidence)

    def curve(self) -> list[float]:
        return [n / d if d else math.nan for n, d in zip(self.num, self.den)]

    def overall(self) -> float:
        den = sum(self.den)
        return sum(self.num) / den if den else math.nan


class DiagnosticsResult(dict):
    """The flat scalars (`diag/...`) as the dict itself, plus `tables` (name -> rows) and `files` (name -> path)."""

    def __init__(self, scalars: dict[str, float], tables: dict[str, list[dict[str, Any]]],
                 files: dict[str, Path]) -> None:
        super().__init__(scalars)
        self.tables = tables
        self.files = files

    def log_to(self, logger: Any, scalars: bool = False) -> None:
        """Send tables and plots (and the scalars when asked) to a `RunLogger`."""
        if scalars:
            logger.log_metrics(dict(self))
        for name, rows in self.tables.items():
            if rows:
                columns = list(dict.fromkeys(k for r in rows for k in r))
                logger.log_table(f"diagnostics/{name}", columns, [[r.get(c) for c in columns] for r in rows])
        for name, path in self.files.items():
            if path.suffix == ".png":
                logger.log_image(f"diagnostics/{name}", path)


def _validate_metrics(metrics: Iterable[str]) -> list[str]:
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"diagnostics.metrics: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(METRICS)}")
    return metrics


def _answer_attention(trace: CommitTrace) -> Tensor:
    g = trace.gen_length
    return torch.cat([trace.prompt_mask, torch.ones(trace.batch_size, g, dtype=trace.prompt_mask.dtype)], dim=1)


def _state_logits(fp_model: DiffusionLM, q_model: DiffusionLM, sampler: Sampler, trace: CommitTrace,
                  need_fp: bool, desc: str) -> Iterator[tuple[int, Tensor, Tensor | None, Tensor]]:
    """For every state S_t of a rollout: (t, quantized policy logits, FP policy logits or None, masked-before
    mask), all on the quantized model's device."""
    p, dev = trace.prompt.shape[1], q_model.device
    attn = _answer_attention(trace).to(dev)
    states = trace.states(with_prompt=True)
    masked_before = trace.masked_before()
    for t in tqdm(range(trace.num_steps), desc=desc, leave=False):
        x = states[t].to(dev)
        lq = policy_logits(sampler, q_model, x, attn, p)
        lf = policy_logits(sampler, fp_model, x.to(fp_model.device), attn.to(fp_model.device), p).to(dev) \
            if need_fp else None
        yield t, lq, lf, masked_before[t].to(dev)


@torch.no_grad()
def teacher_forced_pass(fp_model: DiffusionLM, q_model: DiffusionLM, sampler: Sampler, traces: list[CommitTrace],
                        metrics: set[str]) -> dict[str, StepCurve]:
    """Feed every teacher state S_t to the quantized (and FP) model and pool the per-step metrics."""
    curves = {m: StepCurve() for m in ("flip_rate", "selection_disagreement", "prob_mse_teacher", "frontier_kl")}
    need_fp = bool(metrics & {"prob_mse", "frontier_kl"})
    first = 0  # index of the trace's first prompt: per-prompt totals give the CIs over prompts
    for trace in traces:
        for t, lq, lf, masked in _state_logits(fp_model, q_model, sampler, trace, need_fp, "teacher states"):
            committed, tokens = trace.committed[t].to(lq.device), trace.tokens.to(lq.device)
            n_commit = committed.sum(-1)
            if "flip_rate" in metrics:
                curves["flip_rate"].add_rows(t, first, frontier_flips(committed, tokens, lq).sum(-1), n_commit)
            if "selection_disagreement" in metrics:
                chosen = select_commits(sampler, lq, masked, committed.sum(-1), committed)
                value, valid = selection_disagreement(committed, chosen)
                curves["selection_disagreement"].add_rows(t, first, value, valid)
            if "prob_mse" in metrics:
                curves["prob_mse_teacher"].add_rows(t, first, row_sums(prob_mse(lf, lq, masked), masked),
                                                    masked.sum(-1))
            if "frontier_kl" in metrics:
                curves["frontier_kl"].add_rows(t, first, row_sums(frontier_kl(lf, lq, committed), committed), n_commit)
        first += trace.batch_size
    return curves


def row_sums(values: Tensor, positions: Tensor) -> Tensor:
    """(B,) per-row sums of per-position values taken at the (B, G) bool `positions` (row-major order)."""
    rows = positions.nonzero()[:, 0]
    return torch.zeros(positions.shape[0], dtype=torch.float64, device=values.device).index_add_(
        0, rows.to(values.device), values.double())


class OwnStateProbe:
    """Stands in for the quantized model during its own rollout: returns its logits unchanged and, on the same
    input S^q_t, runs the FP model too and pools the probability MSE on masked positions for step t.

    Saves re-running the quantized model over its own states; needs one forward per step (no CFG).
    """

    def __init__(self, q_model: DiffusionLM, fp_model: DiffusionLM) -> None:
        self._q, self._fp = q_model, fp_model
        self.curve = StepCurve()
        self.step = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._q, name)

    def reset(self) -> None:
        """Called before each batch's rollout: step numbering restarts."""
        self.step = 0

    @torch.no_grad()
    def __call__(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        lq = self._q(ids, attention_mask)
        fp_dev = self._fp.device
        lf = self._fp(ids.to(fp_dev), None if attention_mask is None else attention_mask.to(fp_dev)).to(lq.device)
        masked = ids == self._q.mask_id
        lq_s, lf_s = lq.clone(), lf
        lq_s[..., self._q.mask_id] = -torch.inf
        lf_s[..., self._q.mask_id] = -torch.inf
        self.curve.add(self.step, float(prob_mse(lf_s, lq_s, masked).sum()), int(masked.sum()))
        self.step += 1
        return lq


@torch.no_grad()
def own_state_prob_mse(fp_model: DiffusionLM, q_model: DiffusionLM, sampler: Sampler,
                       traces: list[CommitTrace]) -> StepCurve:
    """Probability MSE on masked positions along the quantized model's own states S^q_t."""
    curve = StepCurve()
    for trace in traces:
        for t, lq, lf, masked in _state_logits(fp_model, q_model, sampler, trace, True, "own states"):
            curve.add(t, float(prob_mse(lf, lq, masked).sum()), int(masked.sum()))
    return curve


@torch.no_grad()
def hidden_state_errors(fp_model: DiffusionLM, q_model: DiffusionLM, traces: list[CommitTrace],
                        position_weight: PositionWeight | None) -> dict[str, float]:
    """Last-block MSE on the teacher's final sequences, weighted by `position_weight` and unweighted."""
    sums = {"weighted": [0.0, 0.0], "unweighted": [0.0, 0.0]}
    for trace in traces:
        ids = torch.cat([trace.prompt, trace.tokens], dim=1)
        attn = _answer_attention(trace)
        err = per_token_hidden_error(last_block_outputs(fp_model, ids, attn), last_block_outputs(q_model, ids, attn))
        for name, pw in (("weighted", position_weight), ("unweighted", None)):
            num, den = weighted_mean(err, token_weights(trace.prompt_mask, trace.gen_length, pw))
            sums[name][0] += num
            sums[name][1] += den
    return {k: n / d if d else math.nan for k, (n, d) in sums.items()}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _resolve_sampler(sampler: Sampler, decoding: Sampler | Mapping[str, Any] | None) -> Sampler:
    if decoding is None:
        return sampler
    if isinstance(decoding, Sampler):
        return decoding
    return build("decoding", decoding)


def run_diagnostics(fp_model: DiffusionLM, q_model: DiffusionLM, prompts: list[str], sampler: Sampler,
                    out_dir: str | Path | None, metrics: Iterable[str] = METRICS, n_prompts: int = 32, seed: int = 0,
                    cache_dir: str | Path | None = None, position_weight: PositionWeight | None = None, *,
                    decoding: Sampler | Mapping[str, Any] | None = None, gen_length: int | None = None,
                    batch_size: int = 8, force: bool = False, weights_hash: str | None = None) -> DiagnosticsResult:
    """All requested frontier diagnostics of `q_model` against the FP teacher `fp_model` on `prompts[:n_prompts]`.

    `decoding` (a sampler or a decoding config) overrides the run's `sampler` for the diagnostics; `gen_length`
    overrides the sampler's. Returns flat `diag/...` scalars, with `.tables` and `.files` attached.
    Use a greedy policy (temperature 0, alg_temp 0): with sampling, even the FP model "flips" against itself.
    """
    metrics_set = set(_validate_metrics(metrics))
    sampler = _resolve_sampler(sampler, decoding)
    if n_prompts <= 0 or not prompts:
        raise ConfigError(f"diagnostics need at least one prompt (n_prompts={n_prompts}, {len(prompts)} given)")
    prompt_ids = encode_prompts(fp_model, list(prompts)[:n_prompts])
    fp_model.eval()
    q_model.eval()
    scalars: dict[str, float] = {"diag/n_prompts": len(prompt_ids)}
    tables: dict[str, list[dict[str, Any]]] = {}

    teacher = teacher_trajectory(fp_model, prompt_ids, sampler, seed=seed, gen_length=gen_length,
                                 batch_size=batch_size, cache_dir=cache_dir, force=force, weights_hash=weights_hash)
    scalars["diag/teacher_cache_hit"] = float(teacher.cache_hit)
    own: Trajectory | None = None
    own_curve: StepCurve | None = None
    if metrics_set & NEEDS_Q_ROLLOUT:
        probe = OwnStateProbe(q_model, fp_model) if "prob_mse" in metrics_set and not sampler.uses_guidance else None
        own = rollout(probe or q_model, prompt_ids, sampler, seed=seed, gen_length=gen_length, batch_size=batch_size,
                      desc="quantized", before_batch=probe.reset if probe is not None else None)
        if probe is not None:
            own_curve = probe.curve
        elif "prob_mse" in metrics_set:
            own_curve = own_state_prob_mse(fp_model, q_model, sampler, own.traces)

    step_columns: dict[str, list[float]] = {}
    if metrics_set & TEACHER_FORCED:
        curves = teacher_forced_pass(fp_model, q_model, sampler, teacher.traces, metrics_set)
        if "flip_rate" in metrics_set:
            fc = curves["flip_rate"]
            scalars.update({"diag/flip_rate": fc.overall(), "diag/flips": sum(fc.num),
                            "diag/frontier_tokens": sum(fc.den)})
            scalars.update(_interval_scalars("flip_rate", fc.interval()))
            step_columns.update({"frontier_size": fc.den, "flips": fc.num, "flip_rate": fc.curve()})
        for name, key in (("selection_disagreement", "selection_disagreement"), ("frontier_kl", "frontier_kl"),
                          ("prob_mse", "prob_mse_teacher")):
            if name in metrics_set:
                scalars[f"diag/{key}"] = curves[key].overall()
                scalars.update(_interval_scalars(key, curves[key].interval()))
                step_columns[key] = curves[key].curve()
    if own_curve is not None:
        curve = own_curve
        scalars["diag/prob_mse_own"] = curve.overall()
        teacher_mse = scalars["diag/prob_mse_teacher"]
        scalars["diag/prob_mse_amplification"] = scalars["diag/prob_mse_own"] / teacher_mse if teacher_mse else math.nan
        step_columns["prob_mse_own"] = curve.curve()
    if step_columns:
        n_steps = max(len(v) for v in step_columns.values())
        tables["per_step"] = [{"step": t, **{k: v[t] if t < len(v) else math.nan for k, v in step_columns.items()}}
                              for t in range(n_steps)]  # every row has every column (NaN past a curve's end)

    if "stabilization_lag" in metrics_set and own is not None:
        lags = {"fp": concat([trace_lags(t) for t in teacher.traces]), "q": concat([trace_lags(t) for t in own.traces])}
        for name, v in lags.items():
            s = lag_summary(v)
            scalars.update({f"diag/lag_mean_{name}": s["mean"], f"diag/lag_p90_{name}": s["p90"],
                            f"diag/lag_pos_share_{name}": s["share_positive"]})
        tables["lag_histogram"] = lag_histogram(lags)

    if "post_commit_mismatch" in metrics_set and own is not None:
        for suffix, traj in (("", own), ("_fp", teacher)):
            pc = PostCommit.cat([trace_post_commit(t) for t in traj.traces])
            s = pc.summary()
            scalars.update({f"diag/mean_disagree{suffix}": s["mean_disagree"],
                            f"diag/never_agree{suffix}": s["never_agree"],
                            f"diag/post_commit_excluded{suffix}": s["excluded_last_step"]})
            if pc.rows.numel():  # mean over positions = ratio of per-prompt sums to per-prompt counts
                num, den = pc.per_prompt(pc.disagree_fraction), pc.per_prompt(torch.ones_like(pc.disagree_fraction))
                scalars.update(_interval_scalars(f"mean_disagree{suffix}", stats.bootstrap_ratio_ci(num, den)))
            log.info("post-commit mismatch (%s rollout): %d positions committed at the last step have no "
                     "post-commit steps and are excluded (%d kept)", "FP" if suffix else "quantized",
                     s["excluded_last_step"], s["n"])
        diff = [teacher_token_mismatch(q, f.tokens) for q, f in zip(own.traces, teacher.traces)]
        total = sum(n for _, n in diff)
        scalars["diag/teacher_token_mismatch"] = sum(d for d, _ in diff) / total if total else math.nan

    if "hidden_mse" in metrics_set:
        h = hidden_state_errors(fp_model, q_model, teacher.traces, position_weight)
        scalars.update({"diag/hidden_mse_weighted": h["weighted"], "diag/hidden_mse_unweighted": h["unweighted"]})

    files = _write_outputs(Path(out_dir), scalars, tables) if out_dir is not None else {}
    log.info("diagnostics: %s", ", ".join(f"{k.removeprefix('diag/')}={v:.4g}" for k, v in scalars.items()))
    return DiagnosticsResult(scalars, tables, files)


def _interval_scalars(key: str, interval: tuple[float, float] | None) -> dict[str, float]:
    """`diag/<key>_ci_low`, `_ci_high`: the 95% bootstrap CI over prompts (nothing when there is none)."""
    if interval is None:
        return {}
    return {f"diag/{key}_ci_low": interval[0], f"diag/{key}_ci_high": interval[1]}


def _write_outputs(out_dir: Path, scalars: dict[str, float],
                   tables: dict[str, list[dict[str, Any]]]) -> dict[str, Path]:
    files = {"scalars": write_json_atomic(out_dir / "scalars.json", scalars)}
    for name, rows in tables.items():
        if rows:
            files[name] = _write_csv(out_dir / f"{name}.csv", rows)
    rows = tables.get("per_step", [])
    if rows and "flip_rate" in rows[0]:
        cols = {c: label for c, label in (("flip_rate", "flip rate"), ("selection_disagreement", "1 - Jaccard(C, C^q)"))
                if c in rows[0]}
        files["flip_rate_plot"] = plot_step_curves(rows, cols, out_dir / "flip_rate.png",
                                                   "Teacher-forced frontier flips", "rate")
    if rows and ("prob_mse_teacher" in rows[0] or "prob_mse_own" in rows[0]):
        cols = {c: label for c, label in (("prob_mse_teacher", "teacher states"), ("prob_mse_own", "own states"))
                if any(c in r for r in rows)}
        files["prob_mse_plot"] = plot_step_curves(rows, cols, out_dir / "prob_mse.png",
                                                  "Probability MSE on masked positions", "MSE", log_y=True)
    if tables.get("lag_histogram"):
        files["lag_histogram_plot"] = plot_lag_histograms(tables["lag_histogram"], {"fp": "FP", "q": "quantized"},
                                                          out_dir / "lag_histogram.png")
    return files
