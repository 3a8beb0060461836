"""One step of the inference policy from a given state: the logits it acts on and the set C^q_t it would commit.

The diagnostics ask "which positions would the quantized model commit from the teacher's state S_t?".
This reproduces the selection rules of `fair_calib.decoding` (LLaDA low-confidence / random / Fast-dLLM,
Dream maskgit_plus / topk_margin / entropy / origin) for a single step, with the commit count fixed to
the teacher's |C_t| so that |C^q_t| = |C_t| and only *which* positions are chosen can differ.

Sampling is replaced by its greedy counterpart (top-1 token, top-k positions): with temperature 0 and
alg_temp 0 this is exactly the sampler's rule. Model-independent policies (LLaDA `random`, Dream
`origin`) pick the same set for any model given the same random draws, so C^q_t = C_t there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fair_calib.decoding.base import Sampler, forward_logits
from fair_calib.decoding.dream import DreamSampler, filter_logits
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.dllm import DiffusionLM


def uses_guidance(sampler: Sampler) -> bool:
    """True when a step runs the model on a doubled (conditional + unconditional) batch: LLaDA with cfg_scale > 0."""
    return isinstance(sampler, LLaDASampler) and sampler.cfg_scale > 0


def policy_logits(sampler: Sampler, model: DiffusionLM, x: Tensor, attn: Tensor, prompt_len: int) -> Tensor:
    """(B, G, V) answer-position logits the sampler acts on in state x: mask id at -inf, LLaDA's CFG when on.

    Classifier-free guidance (LLaDA): logits = un + (cfg + 1) * (cond - un), `un` with the prompt masked.
    """
    if uses_guidance(sampler):
        un = x.clone()
        un[:, :prompt_len] = model.mask_id
        cond, uncond = forward_logits(model, torch.cat([x, un]), torch.cat([attn, attn]), suppress_mask=False).chunk(2)
        logits = uncond + (sampler.cfg_scale + 1) * (cond - uncond)
        logits[..., model.mask_id] = -torch.inf
    else:
        logits = forward_logits(model, x, attn)
    return logits[:, prompt_len:]


def is_model_independent(sampler: Sampler) -> bool:
    """True when the policy ranks positions by random draws only (LLaDA `random`, Dream `origin`)."""
    if isinstance(sampler, LLaDASampler):
        return sampler.remasking == "random"
    if isinstance(sampler, DreamSampler):
        return sampler.alg == "origin"
    return False


def policy_confidence(sampler: Sampler, logits: Tensor) -> Tensor:
    """(B, G) score the policy ranks masked positions by (greedy token), as in the sampler.

    LLaDA low_confidence: max_v softmax(logits)_v in float64. Dream: on softmax(filter(logits / temperature)),
    maskgit_plus = top-1 probability, topk_margin = top1 - top2, entropy = sum_v p_v log(p_v + 1e-10).
    """
    if isinstance(sampler, DreamSampler):
        if sampler.temperature > 0:
            logits = logits / sampler.temperature
        probs = torch.softmax(filter_logits(logits, sampler.top_p, sampler.top_k).float(), dim=-1)
        if sampler.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            return top2[..., 0] - top2[..., 1]
        if sampler.alg == "entropy":
            return (probs * torch.log(probs + 1e-10)).sum(-1)
        return probs.max(-1).values
    return torch.softmax(logits.double(), dim=-1).max(-1).values


def eligible_positions(sampler: Sampler, masked: Tensor) -> Tensor:
    """(B, G) positions the policy may commit: masked ones, and for LLaDA only inside the current block.

    LLaDA's current block is the one holding the row's first masked position (blocks complete in order).
    """
    if not isinstance(sampler, LLaDASampler):
        return masked
    g = masked.shape[1]
    pos = torch.arange(g, device=masked.device)
    first = torch.where(masked, pos, torch.full_like(pos, g)).min(-1).values
    block_end = (first // sampler.block_length + 1) * sampler.block_length
    return masked & (pos[None, :] < block_end[:, None])


def select_commits(sampler: Sampler, logits: Tensor, masked: Tensor, k: Tensor,
                   teacher_commit: Tensor | None = None) -> Tensor:
    """(B, G) bool set C^q_t: the k[b] eligible positions of row b with the highest policy confidence.

    For model-independent (random) policies the set equals the teacher's `teacher_commit` when given.
    """
    if is_model_independent(sampler) and teacher_commit is not None:
        return teacher_commit.clone()
    eligible = eligible_positions(sampler, masked)
    conf = policy_confidence(sampler, logits).masked_fill(~eligible, -torch.inf)
    chosen = torch.zeros_like(masked)
    for b in range(masked.shape[0]):
        kb = int(k[b])
        if kb > 0:
            chosen[b, conf[b].topk(kb).indices] = True
    return chosen & eligible
