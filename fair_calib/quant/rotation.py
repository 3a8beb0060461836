"""Model-level rotation mechanics of QuaRot (DESIGN 4.5): norm fusion, residual-stream rotation, exact Hadamards.

Row-vector convention: a linear is ``y = x W^T + b``. For an orthogonal ``M`` applied to a linear's *input*
(``x -> x M``) the linear absorbs it as ``W -> W M``; applied to its *output* (``y -> y M``) as ``W -> M^T W``,
``b -> b M``. Every merge runs in float64 on the weight's device and is cast back to the weight's dtype.

Offline (merged into weights, no runtime cost):
  * RMSNorm weights ``g`` folded into the following linears (``W -> W diag(g)``), norms set to 1;
  * residual rotation ``Q`` (random Hadamard, d_model): embeddings ``E Q``, q/k/v/gate/up ``W Q``, o/down
    ``Q^T W`` (bias ``b Q``), LM head ``W Q``. Valid because ``RMSNorm(x Q) = RMSNorm(x) Q`` once ``g = 1``;
  * v_proj output rotated per head by ``H_hd`` (``W_v[h] -> H_hd^T W_v[h]``, ``b_v[h] -> b_v[h] H_hd``);
  * o_proj input absorbs ``M_o = (I_heads (x) H_hd) T`` where ``T`` is the online op below;
  * down_proj input absorbs ``H_ff`` (``W_down -> W_down H_ff``).
Online (modules in the block taps):
  * ``attn_ctx``: ``T`` = Hadamard across heads ``H_heads (x) I_hd`` (QuaRot; with the offline per-head part the
    o_proj input sees the full ``H_heads (x) H_hd``), or a full ``H_{d}`` over the context when ``n_heads`` has no
    Hadamard matrix (e.g. 6 heads);
  * ``mlp_mid``: ``H_ff`` over the intermediate size (K-factor construction when not a power of two);
  * ``q_rope`` / ``k_rope`` (only with KV quantization): ``H_hd`` on Q and K after RoPE,
    ``(Q H)(K H)^T = Q K^T``, so K is quantized in the rotated basis.
All ``H`` here are normalized (orthogonal): ``x -> apply_hadamard(x) = x H_n / sqrt(n)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fair_calib.models.block import NORM_BEFORE, DLLMBlock, tap_readers
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.hadamard import apply_hadamard, hadamard_factor, hadamard_matrix, random_hadamard

NORM_TARGETS = {norm: tap_readers(tap) for tap, norm in NORM_BEFORE.items()}  # attn_norm -> q, k, v; mlp_norm -> ...
INPUT_ROLES = tuple(r for roles in NORM_TARGETS.values() for r in roles)  # read the (rotated) residual stream
OUTPUT_ROLES = ("o", "down")
O_MODES = ("auto", "heads", "full")


# ---- online modules -----------------------------------------------------------------------------------------------
def _k_buffer(n: int) -> Tensor | None:
    """Unnormalized H_K of ``n = K * 2^m`` (the factor ``apply_hadamard`` uses), or None for powers of two."""
    k, _ = hadamard_factor(n)
    return hadamard_matrix(k, dtype=torch.float32) if k > 1 else None


def _hadamard_lastdim(x: Tensor, k_matrix: Tensor | None) -> Tensor:
    """x H_n / sqrt(n) over the last dim; half-precision inputs are transformed in fp32 and cast back."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return apply_hadamard(x.float(), k_matrix).to(x.dtype)
    return apply_hadamard(x, k_matrix)


class OnlineHadamard(nn.Module):
    """x -> x H_n / sqrt(n) over the last dimension (fast Walsh-Hadamard, K-factor matmul when n != 2^m)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        k = _k_buffer(n)
        self.register_buffer("k_matrix", k, persistent=False)

    def extra_repr(self) -> str:
        return f"n={self.n} (K, 2^m)={hadamard_factor(self.n)}"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard(n={self.n}) got last dimension {x.shape[-1]}")
        return _hadamard_lastdim(x, self.k_matrix)


class CrossHeadHadamard(nn.Module):
    """QuaRot's online partial Hadamard before o_proj: x (..., heads*hd) -> x (H_heads/sqrt(heads) (x) I_hd)."""

    def __init__(self, n_heads: int, head_dim: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.register_buffer("k_matrix", _k_buffer(n_heads), persistent=False)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads} head_dim={self.head_dim}"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = x.reshape(*lead, self.n_heads, self.head_dim).transpose(-1, -2)  # (..., hd, heads)
        y = _hadamard_lastdim(y, self.k_matrix)
        return y.transpose(-1, -2).reshape(*lead, self.n_heads * self.head_dim)


def per_head_hadamard(x: Tensor, head_dim: int) -> Tensor:
    """x (..., heads*hd) -> each head's slice times H_hd / sqrt(hd) (the offline V/O part)."""
    lead = x.shape[:-1]
    return apply_hadamard(x.reshape(*lead, -1, head_dim)).reshape(x.shape)


def has_hadamard(n: int) -> bool:
    """True if a Hadamard matrix of order n can be built here (K * 2^m with a known H_K)."""
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


def resolve_o_mode(mode: str, n_heads: int) -> str:
    """'auto' -> 'heads' when H_{n_heads} exists (QuaRot), else 'full' (a full H_d online before o_proj)."""
    if mode not in O_MODES:
        raise ValueError(f"o_hadamard {mode!r} unknown; valid: {', '.join(O_MODES)}")
    if mode == "auto":
        return "heads" if has_hadamard(n_heads) else "full"
    if mode == "heads" and not has_hadamard(n_heads):
        raise ValueError(f"o_hadamard=heads needs a Hadamard matrix of order n_heads={n_heads}; use auto or full")
    return mode


def o_online_module(mode: str, n_heads: int, head_dim: int) -> nn.Module:
    """The online op T before o_proj for a resolved mode ('heads' or 'full')."""
    return CrossHeadHadamard(n_heads, head_dim) if mode == "heads" else OnlineHadamard(n_heads * head_dim)


# ---- offline merges -----------------------------------------------------------------------------------------------
def _set(param: Tensor, value64: Tensor) -> None:
    param.data = value64.to(device=param.device, dtype=param.dtype)


def _fuse_norm(norm: nn.Module, linears: list[nn.Module]) -> None:
    """W -> W diag(g) for every linear reading RMSNorm(x) * g, then g = 1."""
    g = norm.weight.double()
    for lin in linears:
        _set(lin.weight, lin.weight.double() * g.to(lin.weight.device)[None, :])
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def untie_embeddings(model: DiffusionLM) -> None:
    """Give the LM head its own weight if it shares the embedding matrix (both are rotated, on different sides)."""
    head, emb = model.output_layer, model.embed_tokens
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())


@torch.no_grad()
def _right_multiply_rows(param: Tensor, q: Tensor, rows_per_chunk: int = 8192) -> None:
    """param -> param Q in float64, a chunk of rows at a time (a 126k x 4096 vocabulary never exists in float64)."""
    qd = q.double().to(param.device)
    for start in range(0, param.shape[0], rows_per_chunk):
        chunk = param.data[start: start + rows_per_chunk]
        chunk.copy_((chunk.double() @ qd).to(param.dtype))


@torch.no_grad()
def rotate_embeddings_and_head(model: DiffusionLM, q: Tensor) -> None:
    """E -> E Q (the residual stream starts rotated); final norm fused into the head, then head W -> W Q."""
    _right_multiply_rows(model.embed_tokens.weight, q)
    _fuse_norm(model.final_norm, [model.output_layer])
    _right_multiply_rows(model.output_layer.weight, q)


@torch.no_grad()
def fuse_block_norms(block: DLLMBlock) -> None:
    """attn_norm -> q/k/v and mlp_norm -> gate/up (norm weights become 1)."""
    for norm_role, targets in NORM_TARGETS.items():
        _fuse_norm(block.role(norm_role), [block.role(r) for r in targets])


@torch.no_grad()
def rotate_block_residual(block: DLLMBlock, q: Tensor) -> None:
    """Readers of the residual W -> W Q (q/k/v/gate/up); writers W -> Q^T W, b -> b Q (o/down)."""
    for role in INPUT_ROLES:
        w = block.role(role).weight
        _set(w, w.double() @ q.double().to(w.device))
    for role in OUTPUT_ROLES:
        lin = block.role(role)
        qd = q.double().to(lin.weight.device)
        _set(lin.weight, qd.T @ lin.weight.double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ qd)


@torch.no_grad()
def rotate_block_values(block: DLLMBlock, head_dim: int) -> None:
    """V output per head by H_hd (exact): W_v[h] -> H_hd^T W_v[h], b_v[h] -> b_v[h] H_hd (GQA: per KV head)."""
    v = block.role("v")
    w = v.weight.double()  # (kv*hd, d)
    wt = w.reshape(-1, head_dim, w.shape[1]).transpose(1, 2)  # (kv, d, hd): the rows are W_v[h]^T
    _set(v.weight, apply_hadamard(wt).transpose(1, 2).reshape(w.shape))  # (W^T H)^T = H^T W
    if v.bias is not None:
        _set(v.bias, per_head_hadamard(v.bias.double(), head_dim))


@torch.no_grad()
def absorb_block_o_input(block: DLLMBlock, online: nn.Module, head_dim: int) -> None:
    """o_proj input is ctx M_o, M_o = (I (x) H_hd) T: W_o -> W_o M_o (the same row ops applied to W_o's rows)."""
    o = block.role("o")
    w = per_head_hadamard(o.weight.double(), head_dim)
    _set(o.weight, online.double().to(w.device)(w))


@torch.no_grad()
def absorb_block_down_input(block: DLLMBlock) -> None:
    """down_proj input is mid H_ff: W_down -> W_down H_ff (offline half of the online Hadamard)."""
    w = block.role("down").weight
    _set(w, apply_hadamard(w.double()))


def install_online_hadamards(block: DLLMBlock, cfg: DLLMConfig, o_mode: str, rotate_qk: bool) -> None:
    """Put the online Hadamards into the block taps (attn_ctx, mlp_mid; q_rope/k_rope when rotate_qk)."""
    block.taps["attn_ctx"] = o_online_module(o_mode, cfg.n_heads, cfg.head_dim)
    block.taps["mlp_mid"] = OnlineHadamard(cfg.intermediate_size)
    if rotate_qk:
        block.taps["q_rope"] = OnlineHadamard(cfg.head_dim)
        block.taps["k_rope"] = OnlineHadamard(cfg.head_dim)


def check_rotatable(cfg: DLLMConfig, o_mode: str) -> str:
    """Validate that every Hadamard size exists before touching weights; returns the resolved o_proj mode."""
    for what, n in (("d_model", cfg.d_model), ("head_dim", cfg.head_dim), ("intermediate_size", cfg.intermediate_size)):
        if not has_hadamard(n):
            raise ValueError(f"QuaRot needs a Hadamard matrix of order {what}={n}; no construction is known for it")
    return resolve_o_mode(o_mode, cfg.n_heads)


def rotate_model(model: DiffusionLM, seed: int = 0, o_mode: str = "auto", rotate_qk: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """The full QuaRot rotation of an FP model, in place and function-preserving; returns what was done."""
    cfg = model.config
    o_mode = check_rotatable(cfg, o_mode)
    q = random_hadamard(cfg.d_model, seed)
    untie_embeddings(model)
    rotate_embeddings_and_head(model, q)
    online_o = o_online_module(o_mode, cfg.n_heads, cfg.head_dim)
    for block in tqdm(model.blocks, desc="quarot rotate", disable=not progress, leave=False):
        fuse_block_norms(block)
        rotate_block_residual(block, q)
        rotate_block_values(block, cfg.head_dim)
        absorb_block_o_input(block, online_o, cfg.head_dim)
        absorb_block_down_input(block)
        install_online_hadamards(block, cfg, o_mode, rotate_qk)
    # the residual stream is now x @ q; diagnostics that compare hidden states with the FP model map back
    model.residual_basis = q.detach().float().cpu()
    return {"rotation_seed": seed, "o_hadamard": o_mode, "qk_hadamard": rotate_qk,
            "hadamard_factors": {"d_model": list(hadamard_factor(cfg.d_model)),
                                 "intermediate": list(hadamard_factor(cfg.intermediate_size)),
                                 "head_dim": list(hadamard_factor(cfg.head_dim))}}
