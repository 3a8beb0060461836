"""Models that ship their own modeling code, loaded through transformers only when the user trusts it.

Only the forward pass is available (no block interface): evaluation works, block-wise
quantizers ask for a native LLaDA/Dream layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class RemoteCodeDLLM(nn.Module):
    """forward(ids) -> aligned logits around a transformers model built by its own code."""

    def __init__(self, hf_model: nn.Module, mask_id: int, shift_logits: bool, tokenizer: Any) -> None:
        super().__init__()
        self.hf_model = hf_model
        self._mask_id = mask_id
        self.shift_logits = shift_logits
        self.tokenizer = tokenizer

    @property
    def mask_id(self) -> int:
        return self._mask_id

    @property
    def blocks(self) -> nn.ModuleList:
        raise TypeError("this model was loaded through its own remote code and has no block interface: "
                        "layer-wise quantizers need an LLaDA or Dream layout")

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = self.hf_model(input_ids=ids, attention_mask=attention_mask).logits
        if self.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits


def load_remote_dllm(folder: Path, raw: dict, dtype: torch.dtype, device: str | torch.device) -> RemoteCodeDLLM:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, torch_dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    mask_id = raw.get("mask_token_id")
    if mask_id is None:
        raise ValueError(f"{folder}/config.json has no mask_token_id: not a masked diffusion LM")
    return RemoteCodeDLLM(model, int(mask_id), bool(raw.get("shift_logits", False)), tok)
