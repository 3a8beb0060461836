"""One step of the inference policy from a given state: the logits it acts on and the set C^q_t it would commit.

The diagnostics ask "which positions would the quantized model commit from the teacher's state S_t?".
The rules are the sampler's own (`Sampler.step_logits`, `rank_confidence`, `eligible`, `model_independent`:
LLaDA low-confidence / random / Fast-dLLM, Dream maskgit_plus / topk_margin / entropy / origin), applied for a
single step with the commit count fixed to the teacher's |C_t| so that |C^q_t| = |C_t| and only *which*
positions are chosen can differ.

Sampling is replaced by its greedy counterpart (top-1 token, top-k positions): with temperature 0 and
alg_temp 0 this is exactly the sampler's rule. Model-independent policies (LLaDA `random`, Dream
`origin`) pick the same set for any model given the same random draws, so C^q_t = C_t there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fair_calib.decoding.base import Sampler
from fair_calib.models.dllm import DiffusionLM


def policy_logits(sampler: Sampler, model: DiffusionLM, x: Tensor, attn: Tensor, prompt_len: int) -> Tensor:
    """(B, G, V) answer-position logits the sampler acts on in state x (its guidance and mask rule)."""
    return sampler.step_logits(model, x, attn, prompt_len)[:, prompt_len:]


def select_commits(sampler: Sampler, logits: Tensor, masked: Tensor, k: Tensor,
                   teacher_commit: Tensor | None = None) -> Tensor:
    """(B, G) bool set C^q_t: the k[b] eligible positions of row b with the highest policy confidence.

    For model-independent (random) policies the set equals the teacher's `teacher_commit` when given.
    """
    if sampler.model_independent and teacher_commit is not None:
        return teacher_commit.clone()
    eligible = sampler.eligible(masked)
    conf = sampler.rank_confidence(logits).masked_fill(~eligible, -torch.inf)
    chosen = torch.zeros_like(masked)
    for b in range(masked.shape[0]):
        kb = int(k[b])
        if kb > 0:
            chosen[b, conf[b].topk(kb).indices] = True
    return chosen & eligible
