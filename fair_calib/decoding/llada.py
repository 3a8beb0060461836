"""LLaDA's semi-autoregressive sampler (DESIGN section 5), batched, with commit traces.

Per block of `block_length` positions, `steps // num_blocks` steps; the block's masked count is
split evenly over its steps (remainder to the first steps). Each step: logits (optionally with
classifier-free guidance, prompt masked: un + (cfg + 1) * (cond - un)), Gumbel-max sampling in
float64, confidence = softmax probability of the chosen token (`low_confidence`) or uniform
random (`random`), positions after the current block at -inf, commit the top-k masked positions.
`threshold` switches to Fast-dLLM: commit every masked position of the block whose confidence is
at least the threshold, and at least the most confident one.

`numerics` picks the arithmetic. `exact` (default): the mask token's logit is suppressed, confidences
are softmax probabilities in float64 and random-remasking draws float64 numbers. `official`:
ML-GSAI/LLaDA `generate()` as published: no mask suppression, the confidence softmax in float32 (where
guidance sharpens the logits several positions reach exactly 1.0 and `topk` keeps the lowest
index), random remasking draws float32 uniforms over the whole (B, prompt + gen) canvas, each step
after the Gumbel noise, from the seeded generator (the official code uses the global RNG: seeding
both the same gives the same numbers). Fast-dLLM (`threshold`) keeps the mask suppression in both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fair_calib.decoding.base import (
    DecodingConfigError,
    GenerationOutput,
    Sampler,
    check_numerics,
    check_temperature,
)
from fair_calib.decoding.trace import CommitTrace
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import register

REMASKING = ("low_confidence", "random")


def num_transfer_tokens(masked_count: Tensor, steps: int) -> Tensor:
    """(B,) masked counts -> (B, steps) tokens to commit per step: even split, remainder to the first steps."""
    base = masked_count // steps
    rem = masked_count % steps
    out = base[:, None].repeat(1, steps)
    out += (torch.arange(steps, device=masked_count.device)[None, :] < rem[:, None]).long()
    return out


def add_gumbel_noise(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Gumbel-max in float64: exp(logits) / (-log u)^temperature; argmax samples softmax(logits / temperature)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(u)) ** temperature


@register("decoding", "llada")
@dataclass
class LLaDASampler(Sampler):
    gen_length: int = 64
    steps: int = 64
    block_length: int = 32
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    numerics: str = "exact"

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_numerics(self.numerics)
        self.validate(self.gen_length)
        if self.remasking not in REMASKING:
            raise DecodingConfigError(f"remasking {self.remasking!r} unknown; valid: {', '.join(REMASKING)}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise DecodingConfigError(f"threshold must be in (0, 1], got {self.threshold}")

    def validate(self, gen_length: int) -> None:
        if gen_length <= 0 or self.steps <= 0 or self.block_length <= 0:
            raise DecodingConfigError("gen_length, steps and block_length must be positive")
        if gen_length % self.block_length:
            raise DecodingConfigError(f"block_length {self.block_length} does not divide gen_length {gen_length}")
        if self.steps % (gen_length // self.block_length):
            raise DecodingConfigError(f"steps {self.steps} is not a multiple of the number of blocks "
                                      f"{gen_length // self.block_length} (gen_length / block_length)")

    @property
    def suppress_mask(self) -> bool:
        """The official sampler leaves the mask token's logit in the softmax; ours (and Fast-dLLM) remove it."""
        return self.numerics == "exact" or self.threshold is not None

    @property
    def model_independent(self) -> bool:
        return self.remasking == "random"

    def rank_confidence(self, logits: Tensor) -> Tensor:
        """The greedy token's softmax probability (float32 under official numerics, float64 otherwise)."""
        return torch.softmax(logits.float() if self.numerics == "official" else logits.double(), dim=-1).max(-1).values

    def eligible(self, masked: Tensor) -> Tensor:
        """Masked positions inside the current block: the one holding the row's first masked position (blocks
        complete in order)."""
        g = masked.shape[1]
        pos = torch.arange(g, device=masked.device)
        first = torch.where(masked, pos, torch.full_like(pos, g)).min(-1).values
        block_end = (first // self.block_length + 1) * self.block_length
        return masked & (pos[None, :] < block_end[:, None])

    def with_length(self, gen_length: int, steps: int | None = None, block_length: int | None = None) -> LLaDASampler:
        g = int(gen_length)
        return dataclasses.replace(self, gen_length=g, steps=int(steps or g), block_length=int(block_length or g))

    def fitted(self, max_new_tokens: int) -> tuple[LLaDASampler, int]:
        """Block b = min(block_length, max_new_tokens); canvas G = max_new_tokens rounded up to a multiple of b;
        steps = ceil(G r) rounded up to a multiple of the G / b blocks. E.g. the default llada config (64 / 64 /
        32) gives G = steps = block = 8 for addition and 32 for word problems, and G 256 / block 32 / steps 256
        for a 256-token task."""
        if max_new_tokens <= 0:
            raise DecodingConfigError(f"max_gen_toks must be positive, got {max_new_tokens}")
        ratio = self.steps / self.gen_length
        b = min(self.block_length, max_new_tokens)
        g = math.ceil(max_new_tokens / b) * b
        n_blocks = g // b
        steps = math.ceil(math.ceil(g * ratio) / n_blocks) * n_blocks
        return self.with_length(g, steps, b), g

    def with_guidance(self, cfg_scale: float) -> LLaDASampler:
        return dataclasses.replace(self, cfg_scale=float(cfg_scale))

    def _confidence(self, logits: Tensor, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        """(B, N) confidence of each position's sampled token: its probability, or a uniform draw (`random`)."""
        official = self.numerics == "official"
        if self.remasking == "low_confidence":
            probs = torch.softmax(logits.float() if official else logits.double(), dim=-1)
            return probs.gather(-1, x0[..., None]).squeeze(-1)
        dtype = torch.float32 if official else torch.float64
        return torch.rand(x0.shape, dtype=dtype, device=x0.device, generator=generator)

    @torch.no_grad()
    def generate(self, model: DiffusionLM, prompt: Tensor, prompt_mask: Tensor | None = None, *,
                 record_trace: bool = False, generator: torch.Generator | None = None,
                 gen_length: int | None = None) -> GenerationOutput:
        g = gen_length or self.gen_length
        self.validate(g)
        p = prompt.shape[1]
        x, attn = self.canvas(prompt, prompt_mask, g, model.mask_id)
        trace = CommitTrace(prompt.cpu(), (prompt_mask if prompt_mask is not None else torch.ones_like(prompt)).cpu(),
                            model.mask_id) if record_trace else None
        num_blocks = g // self.block_length
        steps_per_block = self.steps // num_blocks
        rows = torch.arange(x.shape[0], device=x.device)
        for nb in range(num_blocks):
            lo, hi = p + nb * self.block_length, p + (nb + 1) * self.block_length
            schedule = num_transfer_tokens((x[:, lo:hi] == model.mask_id).sum(1), steps_per_block)
            step = 0
            while (x[:, lo:hi] == model.mask_id).any():
                if self.threshold is None and step >= steps_per_block:
                    break
                mask_index = x == model.mask_id
                logits = self.step_logits(model, x, attn, p)
                x0 = add_gumbel_noise(logits, self.temperature, generator).argmax(-1)
                x0_p = self._confidence(logits, x0, generator)
                x0_p[:, hi:] = -torch.inf
                x0 = torch.where(mask_index, x0, x)
                confidence = torch.where(mask_index, x0_p, torch.full_like(x0_p, -torch.inf))
                transfer = torch.zeros_like(mask_index)
                if self.threshold is None:
                    k = schedule[:, step]
                    for j in range(x.shape[0]):
                        if k[j] > 0:
                            transfer[j, confidence[j].topk(int(k[j])).indices] = True
                else:  # Fast-dLLM: everything above the threshold, and at least the best one
                    transfer = (confidence >= self.threshold) & mask_index
                    best = confidence.argmax(-1)
                    has_mask = mask_index[:, lo:hi].any(1)
                    transfer[rows[has_mask], best[has_mask]] = True
                x[transfer] = x0[transfer]
                if trace is not None:
                    trace.record(transfer[:, p:], confidence[:, p:], logits[:, p:])
                step += 1
        out = x[:, p:]
        if trace is not None:
            trace.tokens = out.cpu()
        return GenerationOutput(out, trace)
