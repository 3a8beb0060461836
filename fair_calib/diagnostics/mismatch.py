"""Post-commit mismatch on a model's own rollout (DESIGN section 6).

After position i is committed at step c with token y_i, compare the model's top-1 at i at every later
step t in (c, T) with y_i. mean-disagree = mean over positions of the fraction of those steps that
disagree; never-agree = share of positions whose top-1 disagrees at every post-commit step. Positions
committed at the last step have no post-commit steps and are excluded (their count is reported).
Also: the share of committed tokens that differ from the teacher's final token on the same prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fair_calib.decoding.trace import CommitTrace


@dataclass
class PostCommit:
    """Per-position post-commit disagreement of the positions committed before the last step."""

    disagree_fraction: Tensor  # (N,) float
    never_agree: Tensor  # (N,) bool
    excluded: int  # committed at the last step: no post-commit steps
    rows: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # (N,) prompt of each position
    n_prompts: int = 0

    @staticmethod
    def cat(parts: list[PostCommit]) -> PostCommit:
        """The positions of several rollouts; prompt indices continue across them (batch after batch)."""
        if not parts:
            return PostCommit(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), 0)
        offsets, total = [], 0
        for p in parts:
            offsets.append(total)
            total += p.n_prompts
        return PostCommit(torch.cat([p.disagree_fraction for p in parts]), torch.cat([p.never_agree for p in parts]),
                          sum(p.excluded for p in parts), torch.cat([p.rows + o for p, o in zip(parts, offsets)]),
                          total)

    def per_prompt(self, values: Tensor) -> list[float]:
        """(n_prompts,) sums of per-position `values` by prompt (prompts without kept positions give 0)."""
        out = torch.zeros(self.n_prompts, dtype=torch.float64).index_add_(0, self.rows, values.double())
        return out.tolist()

    def summary(self) -> dict[str, float]:
        n = self.disagree_fraction.numel()
        total = n + self.excluded
        return {
            "mean_disagree": float(self.disagree_fraction.mean()) if n else math.nan,
            "never_agree": float(self.never_agree.double().mean()) if n else math.nan,
            "n": n,
            "excluded_last_step": self.excluded,
            "excluded_share": self.excluded / total if total else math.nan,
        }


def post_commit_mismatch(top1: Tensor, tokens: Tensor, commit_step: Tensor) -> PostCommit:
    """(T, B, G) top-1, (B, G) committed tokens, (B, G) commit steps -> per-position disagreement after commit.

    frac_i = |{t > c_i : top1_t,i != y_i}| / (T - 1 - c_i);  never_i = frac_i == 1.
    """
    num_steps = top1.shape[0]
    steps = torch.arange(num_steps)[:, None, None]
    after = steps > commit_step[None]
    n_after = (num_steps - 1 - commit_step).clamp_min(0)
    disagree = ((top1 != tokens[None]) & after).sum(0)
    committed = commit_step >= 0
    keep = committed & (n_after > 0)
    frac = disagree[keep].double() / n_after[keep].double()
    rows = torch.arange(commit_step.shape[0])[:, None].expand_as(keep)[keep]
    return PostCommit(frac, disagree[keep] == n_after[keep], int((committed & (n_after == 0)).sum()), rows,
                      commit_step.shape[0])


def trace_post_commit(trace: CommitTrace) -> PostCommit:
    return post_commit_mismatch(trace.stacked("top1"), trace.tokens, trace.commit_step())


def teacher_token_mismatch(trace: CommitTrace, teacher_tokens: Tensor) -> tuple[int, int]:
    """(number of committed tokens differing from the teacher's final tokens, number of committed tokens)."""
    committed = trace.commit_step() >= 0
    return int((committed & (trace.tokens != teacher_tokens)).sum()), int(committed.sum())
