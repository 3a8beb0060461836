"""Check a model folder before any weights load: one line that says what is wrong and what to do.

Reads only JSON (config.json, the shard index) and safetensors headers (8-byte little-endian length,
then a JSON table of name -> dtype, shape, data_offsets); tensors are never read. The expected tensor
names and shapes come from the model skeleton built on the meta device, the same one `load_dllm` fills.
`check_run_values` does the same for a run's top-level values (threads, device, switches, data=text's corpus).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fair_calib.errors import ConfigError, ModelLoadError
from fair_calib.models.config import DLLMConfig

NATIVE_TYPES = ("llada", "dream")

# config.json keys without which `DLLMConfig.from_hf_dict` cannot build the family's layout (alternatives: any one)
REQUIRED_KEYS: dict[str, tuple[tuple[str, ...], ...]] = {
    "llada": (("d_model",), ("n_layers",), ("n_heads",), ("vocab_size", "embedding_size")),
    "dream": (("hidden_size",), ("num_hidden_layers",), ("num_attention_heads",), ("vocab_size",),
              ("intermediate_size",)),
}
# keys that may be absent but, when given, must be positive integers / numbers
OPTIONAL_INTS = ("n_kv_heads", "num_key_value_heads", "mlp_hidden_size", "mlp_ratio")
TOKEN_IDS = ("mask_token_id", "eos_token_id", "pad_token_id")
OPTIONAL_FLOATS = ("rope_theta", "rms_norm_eps")

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
INDEX = "model.safetensors.index.json"
PICKLE_HINT = ("convert it to safetensors with `python -c \"import torch; from safetensors.torch import save_file; "
               "save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\"` "
               "(only for a file you trust) — pickles are not loaded for safety")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path} is not UTF-8 text ({what}): re-download it") from err
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                             f"fix or re-download the {what}") from err
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from err


def read_config(path: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict (ModelLoadError when missing, not JSON, or not a JSON object)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist: "
                             "set model.path to a local Hugging Face snapshot folder")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json: point model.path at a Hugging Face model folder")
    raw = _read_json(cfg_file, "model config")
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg_file} holds a JSON {type(raw).__name__}, not an object: a model config.json "
                             "is one {...} of architecture keys; fix or re-download it")
    return raw


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def architecture(raw: dict[str, Any], source: str | Path = "config.json") -> DLLMConfig:
    """The DLLMConfig of an LLaDA/Dream config.json, after checking that its architecture keys are present and sane."""
    family = str(raw.get("model_type", "")).lower()
    if family not in NATIVE_TYPES:
        raise ModelLoadError(f"{source}: model_type {raw.get('model_type')!r} is not an LLaDA or Dream model")
    missing = ["/".join(alts) for alts in REQUIRED_KEYS[family] if all(raw.get(k) is None for k in alts)]
    if missing:
        raise ModelLoadError(f"{source} lacks the {family} architecture key(s) {', '.join(missing)}: "
                             "fix or re-download the model's config.json")
    ints = [k for alts in REQUIRED_KEYS[family] for k in alts] + list(OPTIONAL_INTS)
    bad = [f"{k}={raw[k]!r}" for k in ints if raw.get(k) is not None and not (_is_int(raw[k]) and raw[k] > 0)]
    bad += [f"{k}={raw[k]!r}" for k in TOKEN_IDS if raw.get(k) is not None and not (_is_int(raw[k]) and raw[k] >= 0)]
    bad += [f"{k}={raw[k]!r}" for k in OPTIONAL_FLOATS
            if raw.get(k) is not None and (isinstance(raw[k], bool) or not isinstance(raw[k], int | float)
                                           or not math.isfinite(raw[k]) or raw[k] <= 0)]
    if bad:
        raise ModelLoadError(f"{source} has invalid architecture values ({', '.join(bad)}): sizes and token ids "
                             "must be non-negative integers (sizes positive), rope_theta / rms_norm_eps positive")
    try:
        return DLLMConfig.from_hf_dict(raw)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(f"{source}: {err}: fix the model's config.json") from err


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's header; checks that the header and the data fit the file."""
    hint = "the file is damaged or incompletely downloaded: re-download it"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelLoadError(f"{path} is not a safetensors file ({size} bytes, no header): {hint}")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ModelLoadError(f"{path}: safetensors header size {n} is larger than the file ({size} bytes): "
                                     f"{hint}")
            blob = f.read(n)
    except OSError as err:
        raise ModelLoadError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        table = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: corrupt safetensors header (not JSON): {hint}") from err
    if not isinstance(table, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object): {hint}")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end_max = 0
    for name, info in table.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = dtype in DTYPE_BYTES and all(_is_int(d) and d >= 0 for d in shape) and _is_int(begin) \
                and _is_int(end) and end - begin == DTYPE_BYTES[dtype] * math.prod(shape)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ModelLoadError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {hint}")
        out[name] = (dtype, shape)
        end_max = max(end_max, end)
    if end_max != size - 8 - n:
        raise ModelLoadError(f"{path} holds {size - 8 - n} bytes of tensor data but its header describes {end_max} "
                             f"(truncated or padded): {hint}")
    return out


def weight_headers(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor of the folder's model.safetensors or sharded index."""
    index = folder / INDEX
    if index.is_file():
        data = _read_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} names no shards (its weight_map is empty or missing): re-download the "
                                 "index, or delete it to load a single model.safetensors")
        shards = sorted({str(s) for s in weight_map.values()})
        absent = [s for s in shards if not (folder / s).is_file()]
        if absent:
            raise ModelLoadError(f"{index} names {len(absent)} missing shard file(s) ({', '.join(absent[:3])}"
                                 f"{', ...' if len(absent) > 3 else ''}): finish the download of {folder}")
        headers: dict[str, tuple[str, tuple[int, ...]]] = {}
        for s in shards:
            part = safetensors_header(folder / s)
            headers.update(part)
            stray = next((k for k, v in weight_map.items() if v == s and k not in part), None)
            if stray is not None:
                raise ModelLoadError(f"{index} places tensor {stray!r} in {s}, which does not hold it: "
                                     "re-download the index and its shards")
        return headers
    single = folder / "model.safetensors"
    if single.is_file():
        return safetensors_header(single)
    bins = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if bins:
        raise ModelLoadError(f"{folder}: this folder holds only pickle weights ({', '.join(bins)}); {PICKLE_HINT}")
    raise ModelLoadError(f"{folder} holds no model.safetensors or sharded index ({INDEX}): "
                         "point model.path at a complete Hugging Face snapshot")


def skeleton(raw: dict[str, Any], cfg: DLLMConfig):
    """The module tree `load_dllm` fills, on the meta device (no memory): the FP layout, or an exported folder's
    packed linears and online ops when config.json has a quantization_config."""
    import torch

    from fair_calib.models.dllm import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    if "quantization_config" in raw:
        install_layout(model, raw)
    return model


def install_layout(model, raw: dict[str, Any]) -> None:
    """The runtime modules of the layout config.json's `quantization_config.quant_method` names (registered by
    fair_calib.export, looked up by name so models never imports export)."""
    from fair_calib.registry import UnknownNameError, lookup, names

    method = str((raw["quantization_config"] or {}).get("quant_method"))
    try:
        install = lookup("layout", method)
    except UnknownNameError as err:
        raise ModelLoadError(f"quantization_config.quant_method {method!r} is not a layout fair-calib reads (valid: "
                             f"{', '.join(names('layout'))}); load the FP model, or a folder written by "
                             "save_quantized=true") from err
    install(model, raw)


def expected_tensors(raw: dict[str, Any], cfg: DLLMConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the folder must hold for this config."""
    return {k: tuple(v.shape) for k, v in skeleton(raw, cfg).state_dict().items()}


def compare_tensors(folder: Path, family: str, found: dict[str, tuple[str, tuple[int, ...]]],
                    expected: dict[str, tuple[int, ...]]) -> None:
    """Missing / unexpected names (first five listed), then the first tensor whose shape differs from the config."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ModelLoadError(
            f"{folder}: weights do not match the {family} layout of its config.json "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}): "
            "the weights belong to another model; re-download the folder"
        )
    for name in sorted(expected):
        if tuple(found[name][1]) != expected[name]:
            raise ModelLoadError(f"{folder}: tensor {name} has shape {list(found[name][1])} but config.json implies "
                                 f"{list(expected[name])}: the weights and config.json come from different models")


def check_model_folder(path: str | Path, trust_remote_code: bool = False) -> None:
    """Raise ModelLoadError (a ConfigError: one line, exit 2) unless `path` holds a loadable model folder.

    Native LLaDA/Dream folders: config.json is an object with the family's architecture keys, every weight file
    opens as safetensors, and the tensor names and shapes are those of the config. Folders with their own modeling
    code (trusted): the weight files are readable. Other model types are left to `load_dllm`'s message.
    """
    folder = Path(path)
    raw = read_config(folder)
    family = str(raw.get("model_type", "")).lower()
    if family not in NATIVE_TYPES:
        if trust_remote_code:
            weight_headers(folder)
        return
    cfg = architecture(raw, folder / "config.json")
    compare_tensors(folder, cfg.family, weight_headers(folder), expected_tensors(raw, cfg))


# ---- the run's top-level values ---------------------------------------------------------------------------------
RUN_SWITCHES = ("compare_fp", "save_quantized", "force")
POSITIVE_INTS = {"benchmark": ("batch_size", "mc_num", "mc_batch_size", "max_length"),
                 "diagnostics": ("n_prompts", "batch_size")}


def check_run_values(cfg: Mapping[str, Any]) -> None:
    """The top-level values of a run, before anything is built: `threads` a positive integer (or null), `device` one
    this machine has, the switches booleans, and data=text's corpus readable text (read once here, not after the
    model has loaded). `cfg` is the resolved config as plain containers."""
    from fair_calib.models.hf_folder import resolve_device

    threads = cfg.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads={threads!r}: must be a positive integer, e.g. threads=2 "
                          "(or threads=null for torch's default)")
    resolve_device(str(cfg.get("device", "auto")))
    for key in RUN_SWITCHES:
        if key in cfg and not isinstance(cfg[key], bool):
            raise ConfigError(f"{key}={cfg[key]!r}: must be true or false, e.g. {key}=true")
    for group, keys in POSITIVE_INTS.items():
        for key in keys:
            value = (cfg.get(group) or {}).get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{group}.{key}={value!r}: must be a positive integer, e.g. {group}.{key}=8")
    data = cfg.get("data") or {}
    if data.get("name") == "text" and data.get("path") not in (None, "???"):
        from fair_calib.data.calibration import read_corpus

        read_corpus(data["path"], str(data.get("text_field", "text")), data.get("max_chars"))
