"""Loading an exported folder: the model skeleton built from config.json gets the runtime modules its
``quantization_config`` describes, then the folder's state dict loads into it strictly (``models.loading``).

The layouts are registered under the ``quant_method`` names the writer uses (registry group ``layout``);
``models.validate.skeleton`` looks them up by that name, so ``models`` does not import ``export``."""

from __future__ import annotations

from typing import Any

from torch import nn

from fair_calib.errors import ModelLoadError
from fair_calib.export.config import read_layout
from fair_calib.export.layout import ExportError
from fair_calib.export.runtime import install_runtime
from fair_calib.registry import register


@register("layout", "fair_calib")
@register("layout", "compressed-tensors")
def install_from_config(model: nn.Module, raw: dict[str, Any]) -> None:
    """Give ``model`` (an FP skeleton, meta device allowed) the exported structure described in ``raw``."""
    try:
        blocks, dtype = read_layout(raw["quantization_config"], len(model.blocks))
        install_runtime(model, blocks, dtype)
    except (ExportError, KeyError) as err:
        raise ModelLoadError(f"cannot read the quantization_config of this folder: {err}") from err
