"""Architecture hyper-parameters shared by the LLaDA and Dream layouts, and their HF config.json forms."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FAMILIES = ("llada", "dream")


@dataclass(frozen=True)
class Released:
    """Token facts of a family's released checkpoints (DESIGN 5), written once: a config.json that omits a token id
    falls back to these, and the evaluation checks a full-vocabulary model against them."""

    mask_id: int
    eos_id: int
    vocab_size: int
    shift_logits: bool  # Dream predicts token i from the hidden state at i-1; LLaDA predicts it at i


RELEASED = {"llada": Released(mask_id=126336, eos_id=126081, vocab_size=126464, shift_logits=False),
            "dream": Released(mask_id=151666, eos_id=151643, vocab_size=152064, shift_logits=True)}
# config.json keys that describe a saved folder, not the model: `save_dllm` writes them afresh
FOLDER_KEYS = ("torch_dtype", "dtype")


@dataclass
class DLLMConfig:
    """What a masked-diffusion LM needs to be built; `family` picks the module layout."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    mask_id: int
    eos_id: int
    pad_id: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def shift_logits(self) -> bool:
        """Dream predicts token i from the hidden state at i-1; LLaDA predicts it at i."""
        return RELEASED[self.family].shift_logits

    # ---- Hugging Face config.json <-> DLLMConfig -------------------------------------------
    def derived_hf_dict(self) -> dict[str, Any]:
        """The config.json keys this config's fields determine, in the official naming of the family."""
        if self.family == "llada":
            return {
                "architectures": ["LLaDAModelLM"],
                "model_type": "llada",
                "d_model": self.d_model,
                "n_layers": self.n_layers,
                "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads,
                "mlp_hidden_size": self.intermediate_size,
                "vocab_size": self.vocab_size,
                "embedding_size": self.vocab_size,
                "rope_theta": self.rope_theta,
                "rms_norm_eps": self.norm_eps,
                "include_bias": False,  # OLMo: include_bias puts a bias on every linear
                "include_qkv_bias": self.qkv_bias,
                "weight_tying": False,
                "mask_token_id": self.mask_id,
                "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id,
                "activation_type": "silu",
                "layer_norm_type": "rms",
            }
        return {
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": False,
            "mask_token_id": self.mask_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "hidden_act": "silu",
        }

    def official_flags(self) -> dict[str, Any]:
        """The remaining keys the official configuration class reads, at the values the published checkpoints use.

        LLaDA's `LLaDAConfig` fills absent keys from OLMo's `ModelConfig` defaults (GPT-2-like: no RoPE,
        sequential block, dropout 0.1, max_sequence_length 1024), which its modeling code rejects
        ("Rope must be used in Llama-Encoder for MDM"); LLaDA-8B's config.json sets all of them.
        Dream's values are those of Dream-v0-7B (Qwen2.5: full attention, no sliding window).
        """
        if self.family == "llada":
            return {
                "alibi": False, "alibi_bias_max": 8.0, "attention_dropout": 0.0, "attention_layer_norm": False,
                "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False, "block_group_size": 1,
                "block_type": "llama", "embedding_dropout": 0.0, "flash_attention": False, "init_cutoff_factor": None,
                "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
                "layer_norm_with_affine": True, "max_sequence_length": 4096, "mlp_ratio": 4,
                "multi_query_attention": None, "precision": "amp_bf16", "residual_dropout": 0.0, "rope": True,
                "rope_full_precision": True, "scale_logits": False, "use_cache": False,
            }
        return {
            "attention_dropout": 0.0, "bos_token_id": self.eos_id, "initializer_range": 0.02,
            "max_position_embeddings": 131072, "max_window_layers": self.n_layers, "rope_scaling": None,
            "sliding_window": 131072, "use_cache": True, "use_sliding_window": False,
        }

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in the official naming of the family (LLaDA: OLMo names; Dream: Qwen2 names).

        Official flags first, then what the fields determine, then every other key the source
        config.json carried (`extra`), so a load -> save keeps unknown keys.
        """
        return {**self.official_flags(), **self.derived_hf_dict(), **self.extra}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DLLMConfig:
        """Read an official LLaDA or Dream config.json (or one written by `to_hf_dict`), keeping unknown keys."""
        cfg = cls._architecture(d)
        derived, flags = cfg.derived_hf_dict(), cfg.official_flags()
        # keys `to_hf_dict` writes with the same value anyway are not extra (a round trip compares equal)
        cfg.extra = {k: v for k, v in d.items()
                     if k not in derived and k not in FOLDER_KEYS and not (k in flags and flags[k] == v)}
        if cfg.family == "llada" and d.get("vocab_size", cfg.vocab_size) != cfg.vocab_size:
            cfg.extra["vocab_size"] = d["vocab_size"]  # OLMo: vocab_size < embedding_size (padded)
        return cfg

    @classmethod
    def _architecture(cls, d: dict[str, Any]) -> DLLMConfig:
        model_type = str(d.get("model_type", "")).lower()
        if model_type == "llada" or "d_model" in d:
            n_heads = int(d["n_heads"])
            hidden = d.get("mlp_hidden_size") or int(d["d_model"]) * int(d.get("mlp_ratio", 4))
            return cls(
                family="llada",
                vocab_size=int(d.get("embedding_size") or d["vocab_size"]),
                d_model=int(d["d_model"]),
                n_layers=int(d["n_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(d.get("n_kv_heads") or n_heads),
                intermediate_size=int(hidden),
                mask_id=int(d.get("mask_token_id", RELEASED["llada"].mask_id)),
                eos_id=int(d.get("eos_token_id", RELEASED["llada"].eos_id)),
                pad_id=int(d.get("pad_token_id", d.get("eos_token_id", RELEASED["llada"].eos_id))),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                qkv_bias=bool(d.get("include_qkv_bias", False) or d.get("include_bias", False)),
            )
        if model_type == "dream" or "hidden_size" in d:
            n_heads = int(d["num_attention_heads"])
            return cls(
                family="dream",
                vocab_size=int(d["vocab_size"]),
                d_model=int(d["hidden_size"]),
                n_layers=int(d["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                intermediate_size=int(d["intermediate_size"]),
                mask_id=int(d.get("mask_token_id", RELEASED["dream"].mask_id)),
                eos_id=int(d.get("eos_token_id", RELEASED["dream"].eos_id)),
                pad_id=int(d.get("pad_token_id", d.get("eos_token_id", RELEASED["dream"].eos_id))),
                rope_theta=float(d.get("rope_theta", 1e6)),
                norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                qkv_bias=True,
            )
        raise ValueError(
            f"config.json has model_type {d.get('model_type')!r}: expected an LLaDA ('llada') "
            "or Dream ('Dream') configuration"
        )

    def generation_config(self) -> dict[str, Any]:
        """Dream's generation_config.json (its `from_pretrained` reads one): the special token ids."""
        return {"_from_model_config": True, "bos_token_id": self.extra.get("bos_token_id", self.eos_id),
                "eos_token_id": self.eos_id, "pad_token_id": self.pad_id, "mask_token_id": self.mask_id}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
