"""Evaluation defaults per model family (DESIGN section 5): sampler, guidance, chat template.

The token facts of the released checkpoints (mask id, vocabulary, logit shift) are the model config's
(`fair_calib.models.config.RELEASED`); these defaults are what the evaluation adds on top, and a check that a
loaded model agrees with its family where the family fixes a value (the full-size vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fair_calib.models.config import RELEASED, Released
from fair_calib.registry import ConfigError


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family's reference evaluation uses unless the user or a task says otherwise."""

    family: str
    decoding: str          # sampler registry key
    cfg_scale: float       # classifier-free guidance (prompt masked) for likelihood and generation
    chat_template: bool    # apply the tokenizer's chat template (instruct models: only when asked)

    @property
    def released(self) -> Released:
        return RELEASED[self.family]

    @property
    def mask_id(self) -> int:
        return self.released.mask_id

    @property
    def full_vocab(self) -> int:  # the mask id is checked only at the released vocabulary size
        return self.released.vocab_size

    @property
    def shift_logits(self) -> bool:
        return self.released.shift_logits


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "llada": FamilyDefaults(family="llada", decoding="llada", cfg_scale=0.0, chat_template=False),
    "dream": FamilyDefaults(family="dream", decoding="dream", cfg_scale=0.0, chat_template=False),
}


def model_family(model: Any) -> str:
    """'llada' or 'dream' from the model's config (models loaded through remote code: 'llada' unless shifted)."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "family", None)
    if family is None:
        family = "dream" if getattr(model, "shift_logits", False) else "llada"
    if family not in FAMILY_DEFAULTS:
        raise ConfigError(f"model family {family!r} has no evaluation defaults; known: {', '.join(FAMILY_DEFAULTS)}")
    return family


def family_defaults(model: Any) -> FamilyDefaults:
    """The family's defaults, after checking that the model agrees with what the family fixes."""
    family = model_family(model)
    defaults = FAMILY_DEFAULTS[family]
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if cfg.shift_logits != defaults.shift_logits:
            raise ConfigError(f"{family} model with shift_logits={cfg.shift_logits}; the family uses "
                              f"{defaults.shift_logits}")
        if cfg.vocab_size == defaults.full_vocab and cfg.mask_id != defaults.mask_id:
            raise ConfigError(f"{family} model with the released vocabulary ({defaults.full_vocab}) but mask id "
                              f"{cfg.mask_id}; the released checkpoints use {defaults.mask_id} (config.json "
                              "mask_token_id)")
    return defaults


def resolve_cfg_scale(value: float | dict[str, float] | str | None, family: str) -> float | None:
    """A task's guidance scale: a number, or a {family: scale} map (missing family -> the family default);
    "decoding": None, the lm-eval wrapper's own rule (the run's sampler's guidance, else the family default)."""
    if value == "decoding":
        return None
    if value is None:
        return FAMILY_DEFAULTS[family].cfg_scale
    if isinstance(value, dict):
        return float(value.get(family, FAMILY_DEFAULTS[family].cfg_scale))
    return float(value)
