"""Loading an exported folder: the model skeleton built from config.json gets the runtime modules its
``quantization_config`` describes, then the folder's state dict loads into it strictly (``models.loading``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fair_calib.errors import ModelLoadError
from fair_calib.export.config import read_layout
from fair_calib.export.layout import ExportError
from fair_calib.export.runtime import install_runtime


def install_from_config(model: nn.Module, raw: dict[str, Any]) -> None:
    """Give ``model`` (an FP skeleton, meta device allowed) the exported structure described in ``raw``."""
    try:
        blocks, dtype = read_layout(raw["quantization_config"], len(model.blocks))
        install_runtime(model, blocks, dtype)
    except (ExportError, KeyError) as err:
        raise ModelLoadError(f"cannot read the quantization_config of this folder: {err}") from err
