"""The transformer block shared by LLaDA and Dream: RMSNorm, RoPE, bidirectional (GQA) attention, SwiGLU.

The two families differ only in where the submodules live (`ROLE_PATHS`), so every quantization
method addresses linears and norms by *role* (`q`, `k`, `v`, `o`, `gate`, `up`, `down`,
`attn_norm`, `mlp_norm`) and is written once for both.

Activation *taps* are identity modules at the places where methods insert online operations
(FlatQuant transforms, QuaRot Hadamards, KV quantizers):

    attn_in  : normed input of q/k/v            (B, L, d_model)
    q_rope   : queries after RoPE               (B, H, L, head_dim)
    k_rope   : keys after RoPE                  (B, H_kv, L, head_dim)
    v_heads  : values                           (B, H_kv, L, head_dim)
    attn_ctx : attention output, input of o     (B, L, H * head_dim)
    mlp_in   : normed input of gate/up          (B, L, d_model)
    mlp_mid  : silu(gate) * up, input of down   (B, L, intermediate)
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fair_calib.models.config import DLLMConfig

TAP_POINTS = ("attn_in", "q_rope", "k_rope", "v_heads", "attn_ctx", "mlp_in", "mlp_mid")
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
NORM_ROLES = ("attn_norm", "mlp_norm")
# Facts about `DLLMBlock.forward`, written once for every method that needs a linear's input (GPTQ Hessians, AWQ and
# FlatQuant statistics and transforms, export): the tap whose output each linear reads, and the norm before a tap.
INPUT_TAP = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_ctx", "gate": "mlp_in", "up": "mlp_in",
             "down": "mlp_mid"}
NORM_BEFORE = {"attn_in": "attn_norm", "mlp_in": "mlp_norm"}


def tap_readers(tap: str) -> tuple[str, ...]:
    """The linear roles that read `tap`'s output, in LINEAR_ROLES order (e.g. attn_in -> q, k, v)."""
    return tuple(r for r in LINEAR_ROLES if INPUT_TAP[r] == tap)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin tables (seq_len, head_dim) for rotate-half RoPE, built in float64 then cast to fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)
    ang = torch.outer(pos, inv_freq)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, D) rotated by position: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rot * sin.to(x.dtype)).type_as(x)


class DLLMBlock(nn.Module):
    """Bidirectional pre-norm block; subclasses create the submodules under their official names."""

    ROLE_PATHS: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.taps = nn.ModuleDict({p: nn.Identity() for p in TAP_POINTS})

    # ---- role addressing -------------------------------------------------------------------
    def role(self, name: str) -> nn.Module:
        return self.get_submodule(self.ROLE_PATHS[name])

    def set_role(self, name: str, module: nn.Module) -> None:
        parent_path, _, attr = self.ROLE_PATHS[name].rpartition(".")
        parent = self.get_submodule(parent_path) if parent_path else self
        setattr(parent, attr, module)

    def linears(self) -> dict[str, nn.Module]:
        return {r: self.role(r) for r in LINEAR_ROLES}

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], attn_bias: Tensor | None = None) -> Tensor:
        b, n, _ = x.shape
        r = self.role
        h = self.taps["attn_in"](r("attn_norm")(x))
        q = r("q")(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = r("k")(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = r("v")(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q = self.taps["q_rope"](apply_rope(q, cos[:n], sin[:n]))
        k = self.taps["k_rope"](apply_rope(k, cos[:n], sin[:n]))
        v = self.taps["v_heads"](v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=False)
        ctx = att.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim)
        x = x + r("o")(self.taps["attn_ctx"](ctx))
        h = self.taps["mlp_in"](r("mlp_norm")(x))
        mid = F.silu(r("gate")(h)) * r("up")(h)
        return x + r("down")(self.taps["mlp_mid"](mid))


class LLaDABlock(DLLMBlock):
    """LLaDA / OLMo names: attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out."""

    ROLE_PATHS: ClassVar[dict[str, str]] = {
        "attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
        "mlp_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out",
    }

    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__(cfg)
        d, kv, ff, bias = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.qkv_bias
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, kv, bias=bias)
        self.v_proj = nn.Linear(d, kv, bias=bias)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.norm_eps)
        self.ff_proj = nn.Linear(d, ff, bias=False)
        self.up_proj = nn.Linear(d, ff, bias=False)
        self.ff_out = nn.Linear(ff, d, bias=False)


class DreamAttention(nn.Module):
    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, kv, bias=True)
        self.v_proj = nn.Linear(d, kv, bias=True)
        self.o_proj = nn.Linear(d, d, bias=False)


class DreamMLP(nn.Module):
    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)


class DreamBlock(DLLMBlock):
    """Qwen2 names: input_layernorm, self_attn.{q,k,v,o}_proj (q/k/v biased), post_attention_layernorm, mlp.*."""

    ROLE_PATHS: ClassVar[dict[str, str]] = {
        "attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
        "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    }

    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__(cfg)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = DreamMLP(cfg)
