"""Dream's sampler (DESIGN section 5), batched, with commit traces.

Timesteps linspace(1, eps, steps + 1); going from t to the next, smaller s, commit
int(n_masked * (1 - s / t)) positions (all remaining at the last step). `alg` ranks masked
positions: `origin` (each masked position is committed with probability 1 - s/t, random order),
`maskgit_plus` (top-1 probability), `topk_margin` (top1 - top2), `entropy` (negative entropy,
the default). `alg_temp > 0` samples the positions from softmax(confidence / alg_temp).

`numerics` picks the arithmetic. `exact` (default): the mask token's logit is suppressed, the token
softmax runs in float32, `origin` draws one uniform per canvas position. `official`: Dream's
`diffusion_generate` as published: no mask suppression, the softmax in the logits' dtype, tokens
drawn like `torch.distributions.Categorical` (renormalized probabilities, multinomial with
replacement), `origin` draws float32 uniforms over the masked positions only (row-major order,
then the tokens of the chosen ones), all from the seeded generator (the official code uses the
global RNG: seeding both the same gives the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def filter_logits(logits: Tensor, top_p: float | None, top_k: int | None) -> Tensor:
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def sample_tokens(logits: Tensor, temperature: float, top_p: float | None, top_k: int | None, alg: str,
                  generator: torch.Generator | None, official: bool = False) -> tuple[Tensor, Tensor]:
    """(N, V) logits -> (confidence, token) under Dream's rules for `alg` (`official`: see the module docstring)."""
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_p, top_k)
    probs = torch.softmax(logits if official else logits.float(), dim=-1)
    if temperature > 0 and official:  # what Categorical(probs=probs).sample() draws
        x0 = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, True, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
    elif temperature > 0:
        x0 = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0


@register("decoding", "dream")
@dataclass
class DreamSampler(Sampler):
    gen_length: int = 64
    steps: int = 64
    alg: str = "entropy"
    alg_temp: float = 0.0
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    numerics: str = "exact"

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_numerics(self.numerics)
        check_temperature(self.alg_temp, "decoding.alg_temp")
        if self.alg not in ALGS:
            raise DecodingConfigError(f"alg {self.alg!r} unknown; valid: {', '.join(ALGS)}")
        if self.steps <= 0 or self.gen_length <= 0:
            raise DecodingConfigError("gen_length and steps must be positive")

    @property
    def suppress_mask(self) -> bool:
        return self.numerics != "official"

    @property
    def model_independent(self) -> bool:
        return self.alg == "origin"

    def rank_confidence(self, logits: Tensor) -> Tensor:
        """`alg`'s score of the greedy token on softmax(filter(logits / temperature)): maskgit_plus (and origin's
        tokens) top-1 probability, topk_margin top1 - top2, entropy sum_v p_v log(p_v + 1e-10)."""
        if self.temperature > 0:
            logits = logits / self.temperature
        logits = filter_logits(logits, self.top_p, self.top_k)
        probs = torch.softmax(logits if self.numerics == "official" else logits.float(), dim=-1)
        if self.alg == "topk_margin":
            top2 = probs.topk(2, dim=-1).values
            return top2[..., 0] - top2[..., 1]
        if self.alg == "entropy":
            return (probs * torch.log(probs + 1e-10)).sum(-1)
        return probs.max(-1).values

    @torch.no_grad()
    def generate(self, model: DiffusionLM, prompt: Tensor, prompt_mask: Tensor | None = None, *,
                 record_trace: bool = False, generator: torch.Generator | None = None,
                 gen_length: int | None = None) -> GenerationOutput:
        g = gen_length or self.gen_length
        p = prompt.shape[1]
        x, attn = self.canvas(prompt, prompt_mask, g, model.mask_id)
        trace = CommitTrace(prompt.cpu(), (prompt_mask if prompt_mask is not None else torch.ones_like(prompt)).cpu(),
                            model.mask_id) if record_trace else None
        timesteps = torch.linspace(1, self.eps, self.steps + 1, device=x.device)
        b = x.shape[0]
        official = self.numerics == "official"
        for i in range(self.steps):
            mask_index = x == model.mask_id
            if not mask_index.any():
                break
            logits = self.step_logits(model, x, attn, p)
            t, s = timesteps[i], timesteps[i + 1]
            transfer = torch.zeros_like(mask_index)
            full_conf = torch.full(x.shape, -torch.inf, device=x.device, dtype=logits.dtype if official else None)
            x0_full = x.clone()
            if self.alg == "origin":
                p_transfer = float(1 - s / t) if i < self.steps - 1 else 1.0
                if official:  # one float32 uniform per masked position, row-major
                    draw = torch.full(x.shape, 2.0, device=x.device)
                    draw[mask_index] = torch.rand(int(mask_index.sum()), device=x.device, generator=generator)
                else:
                    draw = torch.rand(x.shape, device=x.device, generator=generator)
                transfer = mask_index & (draw < p_transfer)
                if transfer.any():
                    _, x0 = sample_tokens(logits[transfer], self.temperature, self.top_p, self.top_k, "origin",
                                          generator, official)
                    x0_full[transfer] = x0
                full_conf[mask_index] = draw[mask_index].neg().to(full_conf.dtype)  # earlier draws commit first
            else:
                conf, x0 = sample_tokens(logits[mask_index], self.temperature, self.top_p, self.top_k, self.alg,
                                         generator, official)
                full_conf[mask_index] = conf
                x0_full[mask_index] = x0
                n_masked = mask_index.sum() / b
                k = int(n_masked * (1 - s / t)) if i < self.steps - 1 else int(n_masked)
                if k > 0:
                    if self.alg_temp is None or self.alg_temp == 0:
                        idx = full_conf.topk(k, dim=-1).indices
                    else:
                        idx = torch.multinomial(F.softmax(full_conf / self.alg_temp, dim=-1), k, generator=generator)
                    transfer[torch.arange(b, device=x.device)[:, None], idx] = True
                    transfer &= mask_index
            x[transfer] = x0_full[transfer]
            if trace is not None:
                trace.record(transfer[:, p:], full_conf[:, p:], logits[:, p:])
        out = x[:, p:]
        if trace is not None:
            trace.tokens = out.cpu()
        return GenerationOutput(out, trace)
