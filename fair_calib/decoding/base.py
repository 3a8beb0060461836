"""What every sampler shares: batched left-padded prompts, the masked canvas, and the output record."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from fair_calib.decoding.trace import CommitTrace
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError


class DecodingConfigError(ConfigError):
    """Sampler settings that cannot work (e.g. a block length that does not divide the generation length)."""


def check_temperature(value: object, key: str = "decoding.temperature") -> None:
    """A sampling temperature is a number >= 0 (0 = greedy)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise DecodingConfigError(f"{key}={value!r}: a temperature must be a number >= 0 (0 = greedy), "
                                  f"e.g. {key}=0.0")


NUMERICS = ("exact", "official")


def check_numerics(value: object) -> None:
    """`decoding.numerics`: `exact` (our arithmetic: fp64 confidences, draws over the canvas) or `official`
    (the official samplers' arithmetic and random draws, to match published numbers token for token)."""
    if value not in NUMERICS:
        raise DecodingConfigError(f"decoding.numerics={value!r} unknown; valid: {', '.join(NUMERICS)}")


@dataclass
class GenerationOutput:
    tokens: Tensor  # (B, G) answer tokens
    trace: CommitTrace | None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths -> (B, P) ids left-padded with `pad_id`, and the (B, P) real-token mask.

    Left padding keeps every answer at the same offset; RoPE attention depends only on relative
    positions, so a padded row with its pads masked out computes exactly what the unpadded row does.
    """
    if not prompts:
        raise ValueError("no prompts to decode")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


class Sampler(ABC):
    """A decoding policy. `generate` fills `gen_length` masked positions after each prompt."""

    gen_length: int

    @abstractmethod
    def generate(self, model: DiffusionLM, prompt: Tensor, prompt_mask: Tensor | None = None, *,
                 record_trace: bool = False, generator: torch.Generator | None = None,
                 gen_length: int | None = None) -> GenerationOutput:
        ...

    def generate_texts(self, model: DiffusionLM, prompts: list[str], gen_length: int | None = None,
                       seed: int = 0, record_trace: bool = False) -> tuple[list[str], GenerationOutput]:
        """Tokenize, decode, and detokenize up to the first end-of-text token."""
        tok = model.tokenizer
        ids, mask = left_pad([tok.encode(p, add_special_tokens=False) for p in prompts], model.config.pad_id)
        device = model.device
        gen = torch.Generator(device=device).manual_seed(seed)
        out = self.generate(model, ids.to(device), mask.to(device), record_trace=record_trace, generator=gen,
                            gen_length=gen_length)
        return [decode_answer(tok, row, model.config.eos_id) for row in out.tokens.tolist()], out

    @staticmethod
    def canvas(prompt: Tensor, prompt_mask: Tensor | None, gen_length: int, mask_id: int) -> tuple[Tensor, Tensor]:
        """x = prompt + gen_length masks, and the attention mask over it (None-equivalent when unpadded)."""
        b, p = prompt.shape
        x = torch.cat([prompt, torch.full((b, gen_length), mask_id, dtype=torch.long, device=prompt.device)], 1)
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt)
        attn = torch.cat([prompt_mask, torch.ones((b, gen_length), dtype=prompt_mask.dtype, device=prompt.device)], 1)
        return x, attn


def decode_answer(tokenizer, ids: list[int], eos_id: int) -> str:
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def forward_logits(model: DiffusionLM, x: Tensor, attn: Tensor, suppress_mask: bool = True) -> Tensor:
    """Aligned logits, skipping the attention mask when no row is padded (faster SDPA path).

    The mask token itself is never a valid prediction (a trained model gives it ~0 mass; an
    untrained one must not "commit" a mask and leave a committed position masked).
    """
    logits = model(x, None if bool(attn.all()) else attn)
    if suppress_mask:
        logits[..., model.mask_id] = -torch.inf
    return logits
