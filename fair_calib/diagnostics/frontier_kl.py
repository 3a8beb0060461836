"""Frontier KL(p_FP || p_q) at the teacher's frontier positions (DESIGN section 6).

The paper bounds the output KL of decoding by a sum over steps of the errors at committed positions;
this measures that quantity directly: KL_i = sum_v p_FP(v) (log p_FP(v) - log p_q(v)) at i in C_t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """(...,) KL(softmax(p) || softmax(q)) over the last dim; terms with p_v = 0 (e.g. the suppressed mask id) are 0."""
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


def frontier_kl(fp_logits: Tensor, q_logits: Tensor, committed: Tensor) -> Tensor:
    """(N,) KL(p_FP || p_q) at the frontier positions (`committed` (B, G) bool) of a teacher state."""
    return kl_divergence(fp_logits[committed], q_logits[committed])
