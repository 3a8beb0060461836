"""AWQ (Lin et al. 2024; DESIGN 4.7): activation-aware per-channel scales, optional clip search, then RTN.

Per block, for each input group (prev op -> linears, inspected output):
    attn_norm -> q, k, v     output of o (the attention branch)
    v -> o                   output of o      (only when v's outputs match o's inputs: no GQA)
    mlp_norm -> gate, up     output of down (the MLP branch)
    up -> down               output of down
search s = mean_w|x|^r / sqrt(max * min) for r in {0, 1/n_grid, ..., (n_grid-1)/n_grid} (mean_w = token-
weighted mean over calibration tokens), with W -> Q(W * s) / s in the group, and keep the s of lowest

    loss(s) = sum_i w_i mean_d (y_i(s) - y_i)^2 / sum_i w_i          (y = FP output of the inspected op)

The attention group runs the block's forward up to o (attention mixes tokens); the other groups are
token-wise and run on the cached inputs of the FP pass with zero-weight tokens dropped (AWQ installs
no input transforms, so a cached linear input is the op's input). All searches use the FP weights (as
the reference); the scales are then folded into the previous op
(norm weight, or output rows of v / up) and the linears' input columns. Clip search (optional): per
output channel and group, max_val = (1 - k / clip_grid) * max|W| for k < max_shrink * clip_grid,
keeping the one with the lowest token-weighted error of the group's partial products on a strided
token sample (q and k are not clipped, as in the reference). Weights are then quantized (RTN),
activations stay FP by default (W4A16 g128, asymmetric weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fair_calib.models.block import INPUT_TAP, LINEAR_ROLES, tap_readers
from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.engine import BlockContext, Collector, LayerwiseMethod, freeze_linears
from fair_calib.quant.grids import QuantSpec, fake_quant_weight
from fair_calib.quant.smoothquant import fold_linear_scale, fold_norm_scale
from fair_calib.registry import ConfigError, register

CACHED_INPUTS = ("q", "o", "gate", "down")  # one cached input per distinct linear input of the block
CLIP_ROLES = ("v", "o", "gate", "up", "down")
INPUT_OF = {r: tap_readers(INPUT_TAP[r])[0] for r in LINEAR_ROLES}  # the role whose collected input each linear shares


# ---- the math on plain tensors -------------------------------------------------------------------------
def weighted_mean_abs(x: Tensor, w: Tensor) -> Tensor:
    """Per-channel sum_i w_i |x_ij| / sum_i w_i over tokens (x (..., C), w (...)), fp32."""
    x = x.reshape(-1, x.shape[-1]).float()
    w = w.reshape(-1).float().to(x.device)
    return (x.abs() * w[:, None]).sum(0) / w.sum().clamp(min=1e-30)


def candidate_scales(x_mean_abs: Tensor, ratio: float, scale_min: float = 1e-4) -> Tensor:
    """s = clamp(mean|x|^ratio, scale_min) / sqrt(max(s) * min(s))  (AWQ's normalization)."""
    s = x_mean_abs.float().pow(ratio).clamp(min=scale_min)
    return s / (s.max() * s.min()).sqrt()


def search_scale(x_mean_abs: Tensor, loss_fn: Callable[[Tensor], float], n_grid: int = 20,
                 scale_min: float = 1e-4) -> tuple[Tensor, float, list[float]]:
    """Grid search over ratio r = k / n_grid, k < n_grid; returns (best scales, best ratio, losses per ratio)."""
    best_loss, best_ratio, best_s, losses = float("inf"), 0.0, None, []
    for k in range(n_grid):
        ratio = k / n_grid
        s = candidate_scales(x_mean_abs, ratio, scale_min)
        loss = float(loss_fn(s))
        losses.append(loss)
        if loss < best_loss:
            best_loss, best_ratio, best_s = loss, ratio, s
    if best_s is None:  # every loss was NaN: keep the identity scaling
        best_s = torch.ones_like(x_mean_abs, dtype=torch.float32)
    return best_s, best_ratio, losses


def scaled_quant_weight(w: Tensor, s: Tensor, spec: QuantSpec) -> Tensor:
    """Q(W * s) / s: the group's weight as the search evaluates it (s over input columns)."""
    s = s.to(w.device, torch.float32)
    return (fake_quant_weight(w.float() * s[None, :], spec) / s[None, :]).to(w.dtype)


def _keep_weighted(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten to tokens and drop zero-weight tokens (they cannot change any weighted objective)."""
    x2, w2 = x.reshape(-1, x.shape[-1]), w.reshape(-1).to(x.device)
    keep = w2 > 0
    return x2[keep], w2[keep].float()


def awq_token_search(forward: Callable[[Tensor], Tensor], linears: Sequence[nn.Module], x: Tensor, w: Tensor,
                     spec: QuantSpec, n_grid: int = 20, scale_min: float = 1e-4,
                     chunk: int = 4096) -> tuple[Tensor, float, list[float]]:
    """AWQ scale search for a token-wise op `forward` (T, in) -> (T, out) whose `linears` read x (..., in).

    Zero-weight tokens are dropped first, so they cannot change the result; the loss is the token-weighted
    mean over tokens of mean_o (forward_s(x) - forward(x))^2, with the linears' weights set to Q(W s) / s.
    """
    x, w = _keep_weighted(x, w)
    if x.shape[0] == 0:
        raise ConfigError("awq: every calibration token has weight 0; check the token weights")
    dtype = linears[0].weight.dtype
    chunks = [(x[i: i + chunk].to(dtype), w[i: i + chunk]) for i in range(0, x.shape[0], chunk)]
    refs = [forward(xc).float() for xc, _ in chunks]

    def loss_fn(s: Tensor) -> float:
        total = torch.zeros((), dtype=torch.float64)
        with _temporary_weights(linears, s, spec):
            for (xc, wc), ref in zip(chunks, refs):
                total += ((forward(xc).float() - ref).pow(2).mean(-1) * wc).sum().double().cpu()
        return float(total / w.sum().double().cpu())

    return search_scale(weighted_mean_abs(x, w), loss_fn, n_grid, scale_min)


def awq_linear_search(weight: Tensor, bias: Tensor | None, x: Tensor, w: Tensor, spec: QuantSpec, n_grid: int = 20,
                      scale_min: float = 1e-4, chunk: int = 4096) -> tuple[Tensor, float, list[float]]:
    """AWQ scale search of one linear y = x W^T + b on inputs x (..., in) with token weights w (...)."""
    lin = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                                   device=weight.device, dtype=weight.dtype)  # no init: leaves the RNG alone
    lin.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return awq_token_search(lin, [lin], x, w, spec, n_grid, scale_min, chunk)


def mlp_branch(block: nn.Module, h: Tensor) -> Tensor:
    """The block's MLP on its normed input h: down(silu(gate(h)) * up(h)), as in DLLMBlock.forward."""
    r = block.role
    return r("down")(block.taps["mlp_mid"](F.silu(r("gate")(h)) * r("up")(h)))


def awq_clip_search(weight: Tensor, x: Tensor, w: Tensor, spec: QuantSpec, clip_grid: int = 20,
                    max_shrink: float = 0.5, n_tokens: int = 512, oc_batch: int = 256) -> Tensor:
    """Per (output channel, group) clip value max_val (rows, n_groups) minimizing the token-weighted error of the
    group's partial products x_g . Q(clamp(W_g, -max_val, max_val)) on a strided sample of <= ~n_tokens tokens."""
    x, w = _keep_weighted(x, w)
    if x.shape[0] == 0:
        raise ConfigError("awq: every calibration token has weight 0; check the token weights")
    stride = max(1, x.shape[0] // n_tokens)
    x, w = x[::stride].float(), w[::stride]
    rows, cols = weight.shape
    g = spec.group_size if spec.granularity == "group" else cols
    xg = x.to(weight.device).reshape(x.shape[0], cols // g, g)  # (T, G, g)
    wt = w.to(weight.device) / w.sum()
    best_all = []
    for r0 in range(0, rows, oc_batch):
        wb = weight[r0: r0 + oc_batch].float().reshape(-1, cols // g, g)  # (co, G, g)
        org_max = wb.abs().amax(-1, keepdim=True)  # (co, G, 1)
        best, min_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        org_out = torch.einsum("tng,cng->ctn", xg, wb)
        for k in range(int(max_shrink * clip_grid)):
            max_val = org_max * (1 - k / clip_grid)
            cur = torch.clamp(wb, -max_val, max_val)
            q = fake_quant_weight(cur.reshape(wb.shape[0], cols), spec).reshape(wb.shape)
            out = torch.einsum("tng,cng->ctn", xg, q)
            err = ((out - org_out).pow(2) * wt[None, :, None]).sum(1).unsqueeze(-1)  # (co, G, 1)
            better = err < min_err
            min_err[better], best[better] = err[better], max_val[better]
        best_all.append(best.squeeze(-1))
    return torch.cat(best_all, 0)


@torch.no_grad()
def apply_clip(lin: nn.Module, max_val: Tensor) -> None:
    """Clamp each (output channel, group) of the weight to [-max_val, max_val]."""
    rows, cols = lin.weight.shape
    bound = max_val.to(lin.weight.device, torch.float32).repeat_interleave(cols // max_val.shape[1], dim=1)
    lin.weight.data = torch.maximum(torch.minimum(lin.weight.float(), bound), -bound).to(lin.weight.dtype)


@contextmanager
def _temporary_weights(linears: Sequence[nn.Module], s: Tensor, spec: QuantSpec):
    """Swap each linear's weight for Q(W * s) / s inside the block."""
    saved = [lin.weight.data for lin in linears]
    for lin in linears:
        lin.weight.data = scaled_quant_weight(lin.weight.data, s, spec)
    try:
        yield
    finally:
        for lin, data in zip(linears, saved):
            lin.weight.data = data


# ---- the method ------------------------------------------------------------------------------------------
@register("quantizer", "awq")
class AWQ(LayerwiseMethod):
    """AWQ scale search (+ clip search) per block, then RTN weights; W4A16 g128 asymmetric by default."""

    name = "awq"
    default_propagate = "fp"  # the reference feeds the next block with FP outputs
    uses_token_weights = True

    def __init__(self, n_grid: int = 20, scale_min: float = 1e-4, clip: bool = True, clip_grid: int = 20,
                 max_shrink: float = 0.5, clip_tokens: int = 512, clip_oc_batch: int = 256,
                 freeze_weights: bool = True, w_bits: int = 4, a_bits: int = 16, w_granularity: str = "group",
                 group_size: int = 128, w_symmetric: bool = False, **kwargs: Any) -> None:
        super().__init__(w_bits=w_bits, a_bits=a_bits, w_granularity=w_granularity, group_size=group_size,
                         w_symmetric=w_symmetric, **kwargs)
        if int(n_grid) < 1 or int(clip_grid) < 1 or not 0.0 < max_shrink < 1.0 or int(clip_tokens) < 1:
            raise ConfigError(f"quantizer=awq needs n_grid >= 1, clip_grid >= 1, 0 < max_shrink < 1, clip_tokens >= 1; "
                              f"got {n_grid}, {clip_grid}, {max_shrink}, {clip_tokens}")
        self.n_grid, self.scale_min = int(n_grid), float(scale_min)
        self.clip, self.clip_grid, self.max_shrink = bool(clip), int(clip_grid), float(max_shrink)
        self.clip_tokens, self.clip_oc_batch = int(clip_tokens), int(clip_oc_batch)
        self.freeze_weights = bool(freeze_weights)
        self._cache: dict[str, list[Tensor]] = {}

    def prepare_model(self, model: DiffusionLM, calib: Any) -> None:
        super().prepare_model(model, calib)

    def collect(self, block: nn.Module, ctx: BlockContext) -> dict[str, Collector]:
        """Keep the inputs of q (= k, v), o, gate (= up) and down for the whole set, on CPU."""
        self._cache = {role: [] for role in CACHED_INPUTS}
        return {role: (lambda x, w, role=role: self._cache[role].append(x.cpu())) for role in CACHED_INPUTS}

    def _block_search(self, ctx: BlockContext, roles: Sequence[str], inspect: str, x_mean_abs: Tensor,
                      spec: QuantSpec) -> tuple[Tensor, float, list[float]]:
        """Scale search of a multi-linear group, the loss on the output of `inspect` in the block's forward."""
        linears = [ctx.block.role(r) for r in roles]
        refs = [ctx.role_output(b, inspect).float().cpu() for b in ctx.batches()]

        def loss_fn(s: Tensor) -> float:
            num, den = 0.0, 0.0
            with _temporary_weights(linears, s, spec):
                for b, ref in zip(ctx.batches(), refs):
                    y = ctx.role_output(b, inspect).float()
                    num += float(((y - ref.to(y.device)).pow(2).mean(-1) * b.weights).sum())
                    den += float(b.weights.sum())
            return num / max(den, 1e-30)

        return search_scale(x_mean_abs, loss_fn, self.n_grid, self.scale_min)

    @torch.no_grad()
    def quantize_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, Any]:
        spec = self.bits.weight_spec()
        if not spec.enabled:
            return {}
        x = {role: torch.cat(chunks) for role, chunks in self._cache.items()}
        self._cache = {}
        tw = ctx.token_weights
        r = block.role
        extras: dict[str, Any] = {}

        # 1. scale searches, all on the FP weights
        s_qkv, extras["ratio_qkv"], _ = self._block_search(ctx, ("q", "k", "v"), "o",
                                                           weighted_mean_abs(x["q"], tw).to(ctx.device), spec)
        s_o = None
        if r("v").out_features == r("o").in_features:
            o = r("o")
            s_o, extras["ratio_vo"], _ = awq_linear_search(o.weight, o.bias, x["o"].to(ctx.device), tw, spec,
                                                           self.n_grid, self.scale_min)
        # the MLP is token-wise: search on the cached normed inputs, zero-weight tokens dropped
        s_gu, extras["ratio_gate_up"], _ = awq_token_search(lambda h: mlp_branch(block, h), [r("gate"), r("up")],
                                                            x["gate"].to(ctx.device), tw, spec, self.n_grid,
                                                            self.scale_min)
        d = r("down")
        s_down, extras["ratio_down"], _ = awq_linear_search(d.weight, d.bias, x["down"].to(ctx.device), tw, spec,
                                                            self.n_grid, self.scale_min)

        # 2. fold the scales (FP function unchanged) and scale the cached inputs accordingly
        fold_norm_scale(r("attn_norm"), [r("q"), r("k"), r("v")], s_qkv)
        x["q"] = x["q"] / s_qkv.cpu()
        if s_o is not None:
            fold_linear_scale(r("v"), r("o"), s_o)
            x["o"] = x["o"] / s_o.cpu()
        fold_norm_scale(r("mlp_norm"), [r("gate"), r("up")], s_gu)
        x["gate"] = x["gate"] / s_gu.cpu()
        fold_linear_scale(r("up"), r("down"), s_down)
        x["down"] = x["down"] / s_down.cpu()

        # 3. clip search on the scaled weights and inputs
        if self.clip:
            for role in CLIP_ROLES:
                lin = r(role)
                max_val = awq_clip_search(lin.weight.data, x[INPUT_OF[role]], tw, spec, self.clip_grid,
                                          self.max_shrink, self.clip_tokens, self.clip_oc_batch)
                apply_clip(lin, max_val)
        if self.freeze_weights:
            freeze_linears(block)
        return extras
