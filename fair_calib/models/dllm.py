"""The masked-diffusion LM interface used by the whole project, and its LLaDA and Dream layouts.

`DiffusionLM.forward(ids)` returns logits *aligned* so that `logits[:, i]` predicts token `i`
(Dream's one-position shift is applied inside). Methods that work block by block use
`embed`, `blocks`, `rope`, `head`
(and `embed_tokens`, `final_norm`, `output_layer`) — the same four calls for every family.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fair_calib.models.block import DreamBlock, LLaDABlock, RMSNorm, rope_tables
from fair_calib.models.config import DLLMConfig


class DiffusionLM(nn.Module):
    """Base class: subclasses place embeddings, blocks, final norm and LM head under official names."""

    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tokenizer = None  # attached by the loader
        self._rope_cache: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    # ---- parts (overridden by the layouts) ------------------------------------------------
    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> RMSNorm:
        raise NotImplementedError

    @property
    def output_layer(self) -> nn.Linear:
        raise NotImplementedError

    # ---- interface ------------------------------------------------------------------------
    @property
    def mask_id(self) -> int:
        return self.config.mask_id

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def rope(self, seq_len: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        device = device or self.device
        key = (seq_len, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(seq_len, self.config.head_dim, self.config.rope_theta, device)
        return self._rope_cache[key]

    @staticmethod
    def attention_bias(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """Key-padding mask (B, L) of 1 = attend, 0 = padding -> additive bias (B, 1, 1, L)."""
        if attention_mask is None:
            return None
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
        return bias[:, None, None, :]

    def head(self, h: Tensor) -> Tensor:
        """Final norm + LM head on block outputs, returning aligned logits."""
        logits = self.output_layer(self.final_norm(h))
        if self.config.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def hidden_states(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(ids)
        rope = self.rope(ids.shape[1], ids.device)
        bias = self.attention_bias(attention_mask, h.dtype)
        for block in self.blocks:
            h = block(h, rope, bias)
        return h

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(self.hidden_states(ids, attention_mask))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _Container(nn.Module):
    """Plain attribute holder so state-dict keys follow the official nesting."""


class LLaDAModelLM(DiffusionLM):
    """LLaDA layout: model.transformer.{wte, blocks[i], ln_f, ff_out}; untied head, no shift."""

    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__(cfg)
        self.model = _Container()
        self.model.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(cfg.vocab_size, cfg.d_model),
                "blocks": nn.ModuleList([LLaDABlock(cfg) for _ in range(cfg.n_layers)]),
                "ln_f": RMSNorm(cfg.d_model, cfg.norm_eps),
                "ff_out": nn.Linear(cfg.d_model, cfg.vocab_size, bias=False),
            }
        )

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.transformer["wte"]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer["blocks"]

    @property
    def final_norm(self) -> RMSNorm:
        return self.model.transformer["ln_f"]

    @property
    def output_layer(self) -> nn.Linear:
        return self.model.transformer["ff_out"]


class DreamModel(DiffusionLM):
    """Dream (Qwen2) layout: model.{embed_tokens, layers[i], norm}, lm_head; logits shifted by one."""

    def __init__(self, cfg: DLLMConfig) -> None:
        super().__init__(cfg)
        self.model = _Container()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.model.layers = nn.ModuleList([DreamBlock(cfg) for _ in range(cfg.n_layers)])
        self.model.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> RMSNorm:
        return self.model.norm

    @property
    def output_layer(self) -> nn.Linear:
        return self.lm_head


def build_model(cfg: DLLMConfig) -> DiffusionLM:
    cls = LLaDAModelLM if cfg.family == "llada" else DreamModel
    return cls(cfg)
