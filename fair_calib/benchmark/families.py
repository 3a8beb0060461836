"""Evaluation defaults per model family (DESIGN section 5): sampler, guidance, mask token, logit shift, chat template.

The loader already reads the mask id and the shift from config.json (falling back to the 8B/7B
values); these defaults are what the evaluation adds on top, and a check that a loaded model
agrees with its family where the family fixes a value (the full-size vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fair_calib.registry import ConfigError


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family's reference evaluation uses unless the user or a task says otherwise."""

    decoding: str          # sampler registry key
    mask_id: int           # mask token of the released checkpoints
    full_vocab: int        # vocabulary size of the released checkpoints (mask id checked only there)
    shift_logits: bool     # Dream predicts token i from position i-1
    cfg_scale: float       # classifier-free guidance (prompt masked) for likelihood and generation
    chat_template: bool    # apply the tokenizer's chat template (instruct models: only when asked)


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    "llada": FamilyDefaults(decoding="llada", mask_id=126336, full_vocab=126464, shift_logits=False,
                            cfg_scale=0.0, chat_template=False),
    "dream": FamilyDefaults(decoding="dream", mask_id=151666, full_vocab=152064, shift_logits=True,
                            cfg_scale=0.0, chat_template=False),
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


def resolve_cfg_scale(value: float | dict[str, float] | None, family: str) -> float:
    """A task's guidance scale: a number, or a {family: scale} map (missing family -> the family default)."""
    if value is None:
        return FAMILY_DEFAULTS[family].cfg_scale
    if isinstance(value, dict):
        return float(value.get(family, FAMILY_DEFAULTS[family].cfg_scale))
    return float(value)
