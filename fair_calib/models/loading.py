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

from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM, build_model

log = logging.getLogger(__name__)

NATIVE_TYPES = ("llada", "dream")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model folder that cannot be loaded; the message says what to fix."""


def read_config(path: str | Path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist: "
                             "set model.path to a local Hugging Face snapshot folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json: point model.path at a Hugging Face model folder")
    return json.loads(cfg_file.read_text())


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ModelLoadError(f"{folder} holds no model.safetensors, sharded index or pytorch_model.bin")


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        else:  # legacy pickles: tensors only, never arbitrary objects
            state.update(torch.load(f, map_location="cpu", weights_only=True))
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
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype={dtype} unknown; valid: {', '.join(DTYPES)}")
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
        from fair_calib.models.remote import load_remote_dllm

        return load_remote_dllm(folder, raw, DTYPES[dtype], device)
    cfg = DLLMConfig.from_hf_dict(raw)
    with torch.device("meta"):
        model = build_model(cfg)
    if "quantization_config" in raw:  # an exported quantized folder: packed linears and online ops (fair_calib.export)
        from fair_calib.export.reload import install_from_config

        install_from_config(model, raw)
    state = load_state_dict(folder)
    model_keys = set(model.state_dict().keys())
    missing, unexpected = model_keys - state.keys(), state.keys() - model_keys
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: weights do not match the {cfg.family} layout "
            f"(missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''})"
        )
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
