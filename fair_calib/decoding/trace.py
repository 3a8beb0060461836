"""`CommitTrace`: the per-step record of a batched dLLM rollout, read by Stage I probing and the diagnostics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SCORES = ("prob", "neg_entropy", "margin")


def sharpness_scores(logits: Tensor) -> dict[str, Tensor]:
    """Teacher sharpness at every position from (…, V) logits: top-1 prob, negative entropy, top1-top2 margin."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    top2 = p.topk(2, dim=-1).values
    return {
        "prob": top2[..., 0],
        "neg_entropy": -torch.special.entr(p).sum(-1),  # 0 * log 0 = 0 at masked-out (-inf) logits
        "margin": top2[..., 0] - top2[..., 1],
    }


@dataclass
class CommitTrace:
    """What happened at each step t of a rollout over the G answer positions of B rows.

    committed[t]  (B, G) bool   positions committed at step t (the write frontier)
    confidence[t] (B, G) float  the confidence the policy ranked by (-inf where not eligible)
    top1[t]       (B, G) long   the model's top-1 token at every answer position at step t
    scores[k][t]  (B, G) float  teacher sharpness (prob / neg_entropy / margin) at step t
    tokens        (B, G) long   the final answer tokens
    prompt        (B, P) long   the (left-padded) prompts, `prompt_mask` marks real tokens
    """

    prompt: Tensor
    prompt_mask: Tensor
    mask_id: int
    committed: list[Tensor] = field(default_factory=list)
    confidence: list[Tensor] = field(default_factory=list)
    top1: list[Tensor] = field(default_factory=list)
    scores: dict[str, list[Tensor]] = field(default_factory=lambda: {k: [] for k in SCORES})
    tokens: Tensor | None = None

    def record(self, committed: Tensor, confidence: Tensor, logits: Tensor) -> None:
        """Store one step; `logits` are the (guided) answer-position logits the step acted on."""
        self.committed.append(committed.cpu())
        self.confidence.append(confidence.float().cpu())
        self.top1.append(logits.argmax(-1).cpu())
        for k, v in sharpness_scores(logits).items():
            self.scores[k].append(v.cpu())

    # ---- derived views ----------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.committed)

    @property
    def batch_size(self) -> int:
        return self.prompt.shape[0]

    @property
    def gen_length(self) -> int:
        return self.committed[0].shape[1] if self.committed else 0

    def stacked(self, name: str) -> Tensor:
        """(T, B, G) stack of `committed`, `confidence` or `top1`, or of a score name."""
        seq = self.scores[name] if name in self.scores else getattr(self, name)
        return torch.stack(seq)

    def commit_step(self) -> Tensor:
        """(B, G) step at which each position was committed (-1 if never)."""
        c = self.stacked("committed")
        step = torch.full(c.shape[1:], -1, dtype=torch.long)
        for t in range(c.shape[0] - 1, -1, -1):
            step[c[t]] = t
        return step

    def masked_before(self) -> Tensor:
        """(T, B, G) True where the position is still masked when step t starts."""
        cs = self.commit_step()
        t = torch.arange(self.num_steps)[:, None, None]
        return (cs[None] >= t) | (cs[None] < 0)

    def states(self, with_prompt: bool = False) -> Tensor:
        """(T, B, G) every answer state S_t the model saw (committed tokens, the mask id elsewhere); with the prompt
        in front, (T, B, P + G)."""
        masked = self.masked_before()
        answer = torch.where(masked, torch.full_like(masked, self.mask_id, dtype=torch.long), self.tokens[None])
        if not with_prompt:
            return answer
        return torch.cat([self.prompt[None].expand(answer.shape[0], -1, -1), answer], dim=2)

    def state(self, t: int) -> Tensor:
        """Answer part of the sequence S_t (B, G) the model saw at step t: committed tokens or the mask id."""
        return self.states()[t]

    def full_state(self, t: int) -> Tensor:
        """Prompt + answer state (B, P + G) at step t."""
        return torch.cat([self.prompt, self.state(t)], dim=1)
