"""Bytes of an exported model, counted from shapes alone (meta device), so that 8B-sized exports can be sized
without weights: the FP skeleton of a config gets the runtime modules of a layout (``runtime.install_runtime``),
and its state dict is exactly the set of tensors ``save_quantized`` writes (the file adds a JSON header)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fair_calib.export.runtime import install_runtime
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM, build_model


def state_bytes(state: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def meta_model(cfg: DLLMConfig, dtype: torch.dtype = torch.bfloat16) -> DiffusionLM:
    """The FP module tree of ``cfg`` without storage."""
    with torch.device("meta"):
        return build_model(cfg).to(dtype)


def fp_bytes(cfg: DLLMConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    return state_bytes(meta_model(cfg, dtype).state_dict())


def exported_bytes(cfg: DLLMConfig, blocks: list[dict[str, Any]], dtype: torch.dtype = torch.bfloat16) -> int:
    """Tensor bytes of the export of a ``cfg`` model quantized as ``blocks`` describes (``layout.describe_blocks``)."""
    model = meta_model(cfg, dtype)
    install_runtime(model, blocks, dtype)
    return state_bytes(model.state_dict())


def folder_bytes(folder: str | Path, pattern: str = "*.safetensors") -> int:
    """Bytes on disk of a saved model's weight files."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern))
