"""Load and save dLLMs as Hugging Face-style folders (config.json, safetensors, tokenizer files).

The same code loads a shipped tiny model and an official LLaDA-8B / Dream-7B snapshot: our module
tree uses the official parameter names, so checkpoints load key for key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.validate import (
    INDEX,
    NATIVE_TYPES,
    ModelLoadError,
    architecture,
    check_model_folder,
    read_config,
    skeleton,
)

__all__ = ["ModelLoadError", "load_dllm", "read_config", "save_dllm"]
log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype={dtype} unknown; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s); call `check_model_folder` first (headers and names)."""
    index = folder / INDEX
    files = sorted({str(s) for s in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() \
        else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return state


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    try:
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns about its model_type
        try:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(level)
    except Exception as err:  # custom tokenizer classes need remote code; tokenizer.json is enough
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        log.warning("no usable tokenizer in %s (%s)", folder, err)
        return None


def load_dllm(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
              trust_remote_code: bool = False) -> DiffusionLM:
    """Build the native LLaDA/Dream module tree from `path` and load its weights strictly."""
    folder = Path(path)
    check_dtype(dtype)
    raw = read_config(folder)
    model_type = str(raw.get("model_type", "")).lower()
    if model_type not in NATIVE_TYPES:
        if raw.get("auto_map") and not trust_remote_code:
            raise ModelLoadError(
                f"{folder} ships its own modeling code (model_type {raw.get('model_type')!r}); "
                "rerun with model.trust_remote_code=true if you trust it"
            )
        if not trust_remote_code:
            raise ModelLoadError(f"model_type {raw.get('model_type')!r} is not an LLaDA or Dream model")
        check_model_folder(folder, trust_remote_code=True)
        from fair_calib.models.remote import load_remote_dllm

        return load_remote_dllm(folder, raw, DTYPES[dtype], device)
    check_model_folder(folder)  # config keys, safetensors headers, tensor names and shapes: before any weights load
    model = skeleton(raw, architecture(raw, folder / "config.json"))
    state = load_state_dict(folder)
    model.load_state_dict({k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()},
                          assign=True)
    model.to(device)
    model.tokenizer = load_tokenizer(folder, trust_remote_code)
    model.eval()
    return model


def save_dllm(model: DiffusionLM, path: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) atomically: a temp folder renamed in place."""
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"refusing to save non-finite weights in {k}")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
