"""Step-wise probability MSE on masked positions (DESIGN section 6).

At step t, over the positions still masked in the state, MSE_i = (1/V) sum_v (p_q(v)_i - p_FP(v)_i)^2 with
p = softmax of the policy logits. Measured on the teacher's states (pure per-step error) and on the
quantized model's own states (error plus the effect of its own earlier false commits: amplification).
"""

from __future__ import annotations

import torch
from torch import Tensor


def prob_mse(fp_logits: Tensor, q_logits: Tensor, positions: Tensor) -> Tensor:
    """(N,) per-position mean over the vocabulary of (p_q - p_FP)^2, at the (B, G) bool `positions`."""
    p_fp = torch.softmax(fp_logits[positions].float(), dim=-1)
    p_q = torch.softmax(q_logits[positions].float(), dim=-1)
    return (p_q - p_fp).pow(2).mean(-1)
