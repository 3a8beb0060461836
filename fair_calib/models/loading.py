"""Load and save dLLMs as Hugging Face-style folders (config.json, safetensors, tokenizer files).

The same code loads a shipped tiny model and an official LLaDA-8B / Dream-7B snapshot: our module
tree uses the official parameter names, so checkpoints load key for key.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.validate import (
    DTYPE_BYTES,
    INDEX,
    NATIVE_TYPES,
    ModelLoadError,
    architecture,
    check_model_folder,
    read_config,
    skeleton,
    weight_headers,
)
from fair_calib.utils.io import atomic_dir

__all__ = ["ModelLoadError", "load_dllm", "read_config", "save_dllm"]
log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
AUTO = "auto"  # the folder's config.json `torch_dtype` (float32 when it names none)
FLOAT_CODES = ("F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3")


def check_dtype(dtype: str) -> torch.dtype | None:
    """`model.dtype` as a torch dtype; None for `auto` (resolved per folder by `resolve_dtype`)."""
    if dtype == AUTO:
        return None
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype={dtype} unknown; valid: {AUTO}, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_dtype(dtype: str, raw: dict) -> tuple[torch.dtype, str]:
    """(dtype, where it came from): an explicit `model.dtype` wins; `auto` reads config.json's `torch_dtype`."""
    explicit = check_dtype(dtype)
    if explicit is not None:
        return explicit, f"model.dtype={dtype}"
    named = raw.get("torch_dtype", raw.get("dtype"))
    if named is None:
        return torch.float32, "auto: config.json names no torch_dtype"
    named = str(named).removeprefix("torch.")
    if named not in DTYPES:
        raise ModelLoadError(f"config.json has torch_dtype={named!r}, which model.dtype=auto cannot use: "
                             f"set model.dtype to one of {', '.join(DTYPES)}")
    return DTYPES[named], f"auto: config.json torch_dtype={named}"


def weights_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the folder's tensors take once loaded: floating tensors in `dtype`, the others as stored."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for code, shape in weight_headers(folder).values():
        numel = math.prod(shape)
        total += numel * size if code in FLOAT_CODES else numel * DTYPE_BYTES.get(code, 4)
    return total


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


def load_dllm(path: str | Path, dtype: str = AUTO, device: str | torch.device = "cpu",
              trust_remote_code: bool = False) -> DiffusionLM:
    """Build the native LLaDA/Dream module tree from `path` and load its weights strictly.

    `dtype=auto` loads in the folder's `torch_dtype` (a bf16 snapshot stays bf16); an explicit dtype wins.
    The dtype and the memory the weights will take are logged before anything is read.
    """
    folder = Path(path)
    check_dtype(dtype)
    raw = read_config(folder)
    torch_dtype, source = resolve_dtype(dtype, raw)
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

        _announce(folder, torch_dtype, source)
        return load_remote_dllm(folder, raw, torch_dtype, device)
    check_model_folder(folder)  # config keys, safetensors headers, tensor names and shapes: before any weights load
    _announce(folder, torch_dtype, source)
    model = skeleton(raw, architecture(raw, folder / "config.json"))
    state = load_state_dict(folder)
    model.load_state_dict({k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()},
                          assign=True)
    model.to(device)
    model.tokenizer = load_tokenizer(folder, trust_remote_code)
    model.eval()
    return model


def _announce(folder: Path, dtype: torch.dtype, source: str) -> None:
    gib = weights_bytes(folder, dtype) / 2**30
    log.info("loading %s in %s (%s): %.2f GiB of weights", folder, str(dtype).removeprefix("torch."), source, gib)


# ---- saving ------------------------------------------------------------------------------------
REMOTE_AUTO_CLASSES = {"llada": ("AutoModel", "AutoModelForCausalLM"), "dream": ("AutoModel",)}
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def remote_code_files(path: str | Path) -> list[Path]:
    """A user-provided modeling file and the sibling modules it imports relatively (`from .configuration_x import`)."""
    first = Path(path)
    if not first.is_file() or first.suffix != ".py":
        raise ModelLoadError(f"with_remote_code={path}: expected the path of a modeling .py file "
                             "(e.g. the official modeling_llada.py)")
    files, todo = [], [first]
    while todo:
        f = todo.pop()
        if f in files:
            continue
        files.append(f)
        for name in RELATIVE_IMPORT.findall(f.read_text()):
            sibling = f.parent / f"{name}.py"
            if not sibling.is_file():
                raise ModelLoadError(f"{f.name} imports .{name}, but {sibling} does not exist: put it next to {f.name}")
            todo.append(sibling)
    return files


def remote_auto_map(files: list[Path], config: dict) -> dict[str, str]:
    """auto_map for the copied files: the PretrainedConfig subclass and the class named in `architectures`."""
    arch = config["architectures"][0]
    config_ref = model_ref = None
    for f in files:
        text = f.read_text()
        found = re.search(r"^class\s+(\w+)\(\s*PretrainedConfig\s*\)", text, re.MULTILINE)
        if found and config_ref is None:
            config_ref = f"{f.stem}.{found.group(1)}"
        if re.search(rf"^class\s+{re.escape(arch)}\(", text, re.MULTILINE):
            model_ref = f"{f.stem}.{arch}"
    if config_ref is None or model_ref is None:
        missing = [what for what, ref in (("a PretrainedConfig subclass", config_ref), (f"class {arch}", model_ref))
                   if ref is None]
        raise ModelLoadError(f"with_remote_code: {' and '.join(missing)} not found in "
                             f"{', '.join(f.name for f in files)}")
    family = "llada" if config.get("model_type") == "llada" else "dream"
    return {"AutoConfig": config_ref, **{auto: model_ref for auto in REMOTE_AUTO_CLASSES[family]}}


def save_dllm(model: DiffusionLM, path: str | Path, extra_files: dict[str, str] | None = None,
              with_remote_code: str | Path | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) atomically: a temp folder renamed in place.

    config.json carries every key the official configuration class reads (`DLLMConfig.to_hf_dict`),
    the keys the source folder had, and `torch_dtype`; Dream folders get a generation_config.json.
    `with_remote_code=<modeling .py>` copies that user-provided file (and the modules it imports)
    and writes the `auto_map` that lets `transformers` load the folder with `trust_remote_code`;
    without it, no `auto_map` (we ship no modeling code).
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"refusing to save non-finite weights in {k}")
    with atomic_dir(path) as tmp:  # an existing folder is replaced only once the new one is complete
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_hf_dict()
        config.pop("auto_map", None)  # the source folder's modeling files are not copied (unless asked below)
        config["torch_dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        if with_remote_code is not None:
            files = remote_code_files(with_remote_code)
            for f in files:
                shutil.copyfile(f, tmp / f.name)
            config["auto_map"] = remote_auto_map(files, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.config.family == "dream":
            (tmp / "generation_config.json").write_text(json.dumps(model.config.generation_config(), indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(path)
