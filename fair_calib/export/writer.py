"""``save_quantized``: a fake-quantized model -> a Hugging Face-style folder with packed weights.

Folder: ``config.json`` (the model's own config + ``quantization_config``, ``export.config``),
``model.safetensors`` (packed block linears and their scales / zero points, online transform factors and clipping
ratios, everything else — embeddings, norms with any merged transforms, LM head — as the model holds it) and the
tokenizer files. Written into a temporary sibling folder, then renamed into place; nothing is written when a
tensor is NaN/inf or a layer is not on its grid (the error names the layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from fair_calib.errors import ComputationError
from fair_calib.export.config import build_quantization_config
from fair_calib.export.grid import GridWeight, recover_grid
from fair_calib.export.layout import ExportError, describe_blocks
from fair_calib.kernels import pack_int32
from fair_calib.models.block import LINEAR_ROLES, TAP_POINTS
from fair_calib.models.dllm import DiffusionLM
from fair_calib.quant.flat_linear import FlatActTap, FlatLinear
from fair_calib.quant.qlinear import ActQuantizer, QLinear
from fair_calib.quant.transforms import FrozenKron
from fair_calib.utils.io import atomic_dir


class NonFiniteExportError(ExportError, ComputationError):
    """A tensor to be written holds NaN/inf (a computation failure: exit 1)."""

    exit_code = 1


def _check_finite(t: Tensor, key: str, layer: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise NonFiniteExportError(f"refusing to export: non-finite values (NaN/inf) in {key} (layer {layer}); "
                                   "nothing was written")


def packed_tensors(grid: GridWeight) -> dict[str, Tensor]:
    """compressed-tensors ``pack-quantized`` tensors of one linear (local names)."""
    out_f, in_f = grid.codes.shape
    t = {"weight_packed": pack_int32(grid.codes.cpu(), grid.bits),
         "weight_scale": grid.scale.cpu(),
         "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    if grid.zero is not None:
        t["weight_zero_point"] = pack_int32(grid.zero.cpu(), grid.bits, packed_dim=0)
    return t


def _sigmoid_pair(lo: Tensor | None, hi: Tensor | None) -> Tensor:
    """(sigmoid(lo), sigmoid(hi)) as fp32 (2,); one learned logit serves both sides."""
    lo = hi if lo is None else lo
    hi = lo if hi is None else hi
    return torch.stack([torch.sigmoid(lo.detach().float()).reshape(()), torch.sigmoid(hi.detach().float()).reshape(())])


def linear_tensors(q: QLinear, spec: dict[str, Any]) -> dict[str, Tensor]:
    w = spec["weights"]
    w_hat = q.quantized_weight().detach()
    _check_finite(w_hat, "weight", q.name)
    grid = recover_grid(w_hat, w["num_bits"], w["symmetric"], w["group_size"], q.name)
    t = packed_tensors(grid)
    if q.bias is not None:
        t["bias"] = q.bias.detach().cpu()
    a = spec["input_activations"]
    if a is not None and a["clip"] == "learned":
        lo = q.act_clip_logit_lo if isinstance(q, FlatLinear) else None
        t["input_clip"] = _sigmoid_pair(lo, q.act_clip_logit)
    return t


def _tap_ops(m: nn.Module) -> list[nn.Module]:
    """The modules behind each described op of a tap, in the same order as ``layout.describe_tap``."""
    if isinstance(m, nn.Identity):
        return []
    if isinstance(m, nn.Sequential):
        return [op for sub in m for op in _tap_ops(sub)]
    if isinstance(m, FlatActTap):
        return (_tap_ops(m.op) if m.op is not None else []) + ([m] if m.spec.enabled else [])
    if isinstance(m, ActQuantizer):
        return [m] if m.spec.enabled else []
    return [m]


def tap_tensors(m: nn.Module) -> dict[str, Tensor]:
    """Saved state of a tap: ``<op index>.left/right/inv_scale`` (Kronecker factors), ``<op index>.clip``."""
    out: dict[str, Tensor] = {}
    for i, op in enumerate(_tap_ops(m)):
        if isinstance(op, FrozenKron):
            for name in ("left", "right", "inv_scale"):
                t = getattr(op, name)
                if t is not None:
                    out[f"{i}.{name}"] = t.detach().float().cpu()
        elif isinstance(op, ActQuantizer) and op.clip_logit is not None:
            out[f"{i}.clip"] = _sigmoid_pair(getattr(op, "clip_logit_lo", None), op.clip_logit)
    return out


def export_state(model: DiffusionLM, blocks: list[dict[str, Any]]) -> tuple[dict[str, Tensor], list[list[str]]]:
    """Every tensor of the exported folder (full names), and the module names of the block linears."""
    prefix_of = {id(m): n for n, m in model.named_modules()}
    state: dict[str, Tensor] = {}
    skip: list[str] = []
    names: list[list[str]] = []
    for block, spec in zip(model.blocks, blocks, strict=True):
        bp = prefix_of[id(block)]
        block_names = []
        for role in LINEAR_ROLES:
            q = block.role(role)
            p = f"{bp}.{block.ROLE_PATHS[role]}"
            block_names.append(p)
            skip.append(p + ".")
            state.update({f"{p}.{k}": v for k, v in linear_tensors(q, spec["linears"][role]).items()})
        names.append(block_names)
        for point in TAP_POINTS:
            p = f"{bp}.taps.{point}"
            skip.append(p + ".")
            state.update({f"{p}.{k}": v for k, v in tap_tensors(block.taps[point]).items()})
    for k, v in model.state_dict().items():
        if not any(k.startswith(s) for s in skip):
            state[k] = v.detach().cpu()
    for k, v in state.items():
        _check_finite(v, k, k.rsplit(".", 1)[0])
    return {k: v.contiguous().clone() for k, v in state.items()}, names


def save_quantized(model: DiffusionLM, path: str | Path, method: str = "", bits_label: str = "") -> Path:
    """Export a quantized model to ``path`` (see the module docstring); returns the folder."""
    blocks = describe_blocks(model)
    state, names = export_state(model, blocks)
    dtype = model.embed_tokens.weight.dtype
    head_name = next(n for n, m in model.named_modules() if m is model.output_layer)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = build_quantization_config(blocks, names, head_name, dtype, method, bits_label)
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(tmp))
    return Path(path)
