"""Last-block hidden-state MSE, unweighted and position-weighted (the FAIR-Calib surrogate, DESIGN section 3).

On the teacher's final sequences (prompt + teacher answer, unmasked), with e_i = (1/d) ||h^q_i - h^FP_i||^2
the per-token error of the last block's output: weighted MSE = sum_i w_i e_i / sum_i w_i over real tokens,
w_i = position_weight(answer offset of i); unweighted = the same with w_i = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fair_calib.models.dllm import DiffusionLM

PositionWeight = Callable[[Tensor], Tensor]


def answer_offsets(prompt_mask: Tensor, gen_length: int) -> Tensor:
    """(B, P + G) offset from the answer start: 0..G-1 on the answer, -1 on prompt tokens and padding."""
    b, p = prompt_mask.shape
    prompt_part = torch.full((b, p), -1, dtype=torch.long)
    answer_part = torch.arange(gen_length, dtype=torch.long).expand(b, gen_length)
    return torch.cat([prompt_part, answer_part], dim=1)


def per_token_hidden_error(h_fp: Tensor, h_q: Tensor) -> Tensor:
    """(B, L) e_i = mean_d (h^q_i - h^FP_i)^2, in float32."""
    return (h_q.float() - h_fp.float()).pow(2).mean(-1)


def weighted_mean(errors: Tensor, weights: Tensor) -> tuple[float, float]:
    """(sum_i w_i e_i, sum_i w_i): kept separate so batches can be pooled."""
    w = weights.to(errors.dtype)
    return float((w * errors).sum()), float(w.sum())


@torch.no_grad()
def last_block_outputs(model: DiffusionLM, ids: Tensor, attn: Tensor) -> Tensor:
    """Output of the last block (before the final norm) for a full, unmasked sequence, in the FP basis: a model
    whose residual stream was rotated (QuaRot: x -> x Q, recorded as `model.residual_basis`) is mapped back."""
    ids, attn = ids.to(model.device), attn.to(model.device)
    h = model.hidden_states(ids, None if bool(attn.all()) else attn).cpu()
    basis = getattr(model, "residual_basis", None)
    if basis is not None:
        h = (h.double() @ basis.double().T).to(h.dtype)
    return h


def token_weights(prompt_mask: Tensor, gen_length: int, position_weight: PositionWeight | None) -> Tensor:
    """(B, P + G) weights: position_weight(answer offsets) (uniform when None), zero on padding."""
    attn = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], gen_length, dtype=prompt_mask.dtype)], dim=1)
    if position_weight is None:
        w = torch.ones(attn.shape)
    else:
        w = torch.as_tensor(position_weight(answer_offsets(prompt_mask, gen_length))).float().cpu()
        if w.shape != attn.shape:
            raise ValueError(f"position_weight returned shape {tuple(w.shape)}, expected {tuple(attn.shape)}")
    return w * attn.float()
