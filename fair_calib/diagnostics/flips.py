"""Teacher-forced frontier flips and selection disagreement (DESIGN section 6).

Both feed the teacher's state S_t to the quantized model. A *flip* is a position of the teacher's
frontier C_t where the quantized model's top-1 differs from the token the teacher committed there.
*Selection disagreement* compares the sets themselves: 1 - |C_t ∩ C^q_t| / |C_t ∪ C^q_t|, where C^q_t
is what the quantized model's policy would commit from S_t (same count, see `policy.select_commits`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def frontier_flips(committed: Tensor, teacher_tokens: Tensor, q_logits: Tensor) -> Tensor:
    """(B, G) bool: i in C_t and argmax_v p_q(v | S_t)_i != y_i (the teacher's committed token)."""
    return committed & (q_logits.argmax(-1) != teacher_tokens)


def selection_disagreement(teacher_commit: Tensor, q_commit: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: (1 - Jaccard(C_t, C^q_t), valid); rows where C_t is empty are not valid (and give 0)."""
    inter = (teacher_commit & q_commit).sum(-1).double()
    union = (teacher_commit | q_commit).sum(-1).double()
    valid = teacher_commit.any(-1)
    value = torch.where(union > 0, 1 - inter / union.clamp_min(1), torch.zeros_like(union))
    return value * valid, valid
