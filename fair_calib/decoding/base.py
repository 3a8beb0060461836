"""What every sampler shares: batched left-padded prompts, the masked canvas, the output record, and the few
operations the rest of the code asks of a decoding policy (`Sampler`):

    step_logits(model, x, attn, p)   the logits the policy acts on in canvas state x (its guidance, its mask rule)
    rank_confidence(logits)          the score its greedy rule ranks masked positions by
    eligible(masked)                 the positions it may commit this step (LLaDA: the current block only)
    model_independent                True when it ranks by random draws only (any model picks the same set)
    uses_guidance / cfg_scale        classifier-free guidance (a doubled batch per step); cfg_scale None = none
    fitted(n)                        the sampler for an n-token answer, keeping its tokens per step
    with_length(g, steps, block)     the sampler at generation length g (steps default g, one block unless given)
    with_guidance(scale)             the sampler with another guidance scale (a no-op without guidance)

Diagnostics, Stage I and the lm-eval wrapper use these; nothing outside `decoding/` asks which sampler it is.
"""

from __future__ import annotations

import dataclasses
import math
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
    cfg_scale: float | None = None  # classifier-free guidance scale; None: the policy has no guidance

    # ---- the policy's rules, for callers that replay one step (diagnostics) ----------------------------------
    @property
    def uses_guidance(self) -> bool:
        """True when a step runs the model on a doubled (conditional + unconditional) batch."""
        return bool(self.cfg_scale) and self.cfg_scale > 0

    @property
    def suppress_mask(self) -> bool:
        """Whether the mask token's logit is removed before the policy ranks and picks tokens."""
        return True

    @property
    def model_independent(self) -> bool:
        """True when the policy ranks positions by random draws only, so every model picks the same set."""
        return False

    def step_logits(self, model: DiffusionLM, x: Tensor, attn: Tensor, prompt_len: int) -> Tensor:
        """(B, L, V) logits the policy acts on in canvas state `x`."""
        return guided_logits(model, x, attn, prompt_len, self.cfg_scale or 0.0, self.suppress_mask)

    def rank_confidence(self, logits: Tensor) -> Tensor:
        """(B, G) score of each position's greedy token the policy ranks by: its softmax probability in float64."""
        return torch.softmax(logits.double(), dim=-1).max(-1).values

    def eligible(self, masked: Tensor) -> Tensor:
        """(B, G) positions the policy may commit this step, given the still-masked ones."""
        return masked

    # ---- the sampler at another length or guidance -------------------------------------------------------
    def with_length(self, gen_length: int, steps: int | None = None, block_length: int | None = None) -> Sampler:
        """This sampler at `gen_length` with `steps` (default: one token per step); `block_length` only matters
        to block samplers (default there: one block)."""
        if not dataclasses.is_dataclass(self):
            return self
        return dataclasses.replace(self, gen_length=int(gen_length), steps=int(steps or gen_length))

    def fitted(self, max_new_tokens: int) -> tuple[Sampler, int]:
        """(sampler, canvas length G) for an answer of `max_new_tokens`, keeping r = steps / gen_length tokens per
        step: G = max_new_tokens, steps = ceil(G r) (block samplers round G to whole blocks)."""
        if max_new_tokens <= 0:
            raise ConfigError(f"max_gen_toks must be positive, got {max_new_tokens}")
        if not dataclasses.is_dataclass(self):
            return self, max_new_tokens
        ratio = self.steps / self.gen_length
        return self.with_length(max_new_tokens, max(1, math.ceil(max_new_tokens * ratio))), max_new_tokens

    def with_guidance(self, cfg_scale: float) -> Sampler:
        """This sampler with guidance `cfg_scale` (unchanged when the policy has no guidance)."""
        return self

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


def guided_logits(model: DiffusionLM, x: Tensor, attn: Tensor, prompt_len: int, cfg_scale: float = 0.0,
                  suppress_mask: bool = True) -> Tensor:
    """Logits of canvas `x`; with `cfg_scale` > 0 LLaDA's classifier-free guidance un + (cfg + 1)(cond - un), the
    unconditional branch with the prompt (the first `prompt_len` positions) masked, in one doubled batch."""
    if cfg_scale <= 0:
        return forward_logits(model, x, attn, suppress_mask=suppress_mask)
    un = x.clone()
    un[:, :prompt_len] = model.mask_id
    cond, uncond = forward_logits(model, torch.cat([x, un]), torch.cat([attn, attn]), suppress_mask=False).chunk(2)
    guided = uncond + (cfg_scale + 1) * (cond - uncond)
    if suppress_mask:
        guided[..., model.mask_id] = -torch.inf
    return guided


def forward_logits(model: DiffusionLM, x: Tensor, attn: Tensor, suppress_mask: bool = True) -> Tensor:
    """Aligned logits, skipping the attention mask when no row is padded (faster SDPA path).

    The mask token itself is never a valid prediction (a trained model gives it ~0 mass; an
    untrained one must not "commit" a mask and leave a committed position masked).
    """
    logits = model(x, None if bool(attn.all()) else attn)
    if suppress_mask:
        logits[..., model.mask_id] = -torch.inf
    return logits
