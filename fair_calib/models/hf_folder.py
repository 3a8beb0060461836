"""`model=` registry entry: a dLLM from a local Hugging Face folder (shipped tiny models by short name)."""

from __future__ import annotations

from pathlib import Path

import torch

from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.loading import check_dtype, load_dllm
from fair_calib.models.validate import check_model_folder, read_config
from fair_calib.registry import ConfigError, register

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def shipped_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file()) if ASSETS.is_dir() else []


def resolve_model_path(path: str) -> Path:
    """A folder path, or the name of a model shipped in fair_calib/assets."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    if (ASSETS / str(path)).is_dir():
        return ASSETS / str(path)
    raise ConfigError(f"model folder {path} does not exist: set model.path to a local Hugging Face snapshot folder "
                      f"or one of the shipped models ({', '.join(shipped_models()) or 'none found'})")


DEVICE_HINT = "use device=cpu, device=cuda, device=cuda:<index> or device=auto"


def resolve_device(device: str) -> torch.device:
    """`device=` as a torch device: auto, cpu, cuda, cuda:<index> (present on this machine), mps when available."""
    device = str(device).strip()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"device={device!r} is not a device: {DEVICE_HINT}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device} requested but CUDA is not available: use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1}): {DEVICE_HINT}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device={device} requested but MPS is not available: use device=cpu or device=auto")
    elif dev.type != "cpu":
        raise ConfigError(f"device={device}: runs need cpu, cuda or mps: {DEVICE_HINT}")
    return dev


@register("model", "dllm")
class HFFolderModel:
    """Model spec: validated at build time (no weights read), loaded by `load()`."""

    def __init__(self, path: str, label: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                 family: str | None = None) -> None:
        check_dtype(dtype)
        self.path = resolve_model_path(path)
        check_model_folder(self.path, trust_remote_code=bool(trust_remote_code))  # headers only, no weights
        raw = read_config(self.path)
        self.model_type = str(raw.get("model_type", ""))
        if family is not None and family != self.model_type.lower():
            raise ConfigError(f"model.family={family} but {self.path}/config.json says model_type={self.model_type}")
        self.label = label or self.path.name
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code

    def load(self, device: str | torch.device = "cpu") -> DiffusionLM:
        return load_dllm(self.path, dtype=self.dtype, device=device, trust_remote_code=self.trust_remote_code)
