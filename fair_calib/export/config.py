"""The ``quantization_config`` of an exported folder's config.json, and reading it back.

The weights are described in the compressed-tensors schema (``config_groups`` of ``QuantizationScheme``s, format
``pack-quantized``, ``ignore`` for the full-precision LM head), so tools that read compressed-tensors see the
packed weights for what they are. ``quant_method`` is ``"compressed-tensors"`` when that schema says everything
(weight-only, no online transforms): such a folder loads in serving stacks that read the format. Otherwise
(integer activations with our scale conventions, online Hadamard / Kronecker transforms, K/V quantization) it is
``"fair_calib"``. In both cases the ``fair_calib`` section holds the full runtime layout (``export.layout``).
"""

from __future__ import annotations

from typing import Any

import torch

from fair_calib.export.layout import ExportError, has_online_ops, pack_layout, unpack_layout, weight_only

FORMAT = "pack-quantized"
LAYOUT_VERSION = 1
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _weight_args(w: dict[str, Any]) -> dict[str, Any]:
    grouped = w["group_size"] is not None
    return {"num_bits": w["num_bits"], "type": "int", "symmetric": w["symmetric"],
            "strategy": "group" if grouped else "channel", "group_size": w["group_size"], "dynamic": False}


def _act_args(a: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"num_bits": a["num_bits"], "type": "int", "symmetric": a["symmetric"], "strategy": "token",
            "dynamic": True}


def config_groups(blocks: list[dict[str, Any]], module_names: list[list[str]]) -> dict[str, Any]:
    """One compressed-tensors scheme per distinct (weights, activations) setting; targets ``Linear`` when there
    is a single one (the LM head is in ``ignore``), else the full module names of each group."""
    groups: list[tuple[dict[str, Any], list[str]]] = []
    for block, names in zip(blocks, module_names, strict=True):
        for (_role, spec), name in zip(block["linears"].items(), names, strict=True):
            scheme = {"weights": _weight_args(spec["weights"]),
                      "input_activations": _act_args(spec["input_activations"])}
            for existing, members in groups:
                if existing == scheme:
                    members.append(name)
                    break
            else:
                groups.append((scheme, [name]))
    single = len(groups) == 1
    return {f"group_{i}": {"targets": ["Linear"] if single else members, **scheme, "format": FORMAT}
            for i, (scheme, members) in enumerate(groups)}


def build_quantization_config(blocks: list[dict[str, Any]], module_names: list[list[str]], head_name: str,
                              dtype: torch.dtype, method: str, bits_label: str) -> dict[str, Any]:
    pure = weight_only(blocks) and not has_online_ops(blocks)
    return {
        "quant_method": "compressed-tensors" if pure else "fair_calib",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups(blocks, module_names),
        "ignore": [head_name],
        "kv_cache_scheme": None,  # K/V quantization (per token per head, after the online ops) is in fair_calib
        "fair_calib": {"version": LAYOUT_VERSION, "method": method, "bits": bits_label,
                       "scale_dtype": DTYPE_NAMES.get(dtype, "float32"), **pack_layout(blocks)},
    }


def _layout_from_compressed_tensors(qcfg: dict[str, Any], n_layers: int) -> list[dict[str, Any]]:
    """A weight-only pack-quantized folder written by another tool: one scheme over every Linear."""
    groups = list((qcfg.get("config_groups") or {}).values())
    if qcfg.get("format") != FORMAT or len(groups) != 1 or groups[0].get("targets") != ["Linear"]:
        raise ExportError("only pack-quantized compressed-tensors folders with one scheme over every Linear load "
                          "here")
    w, a = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if a is not None or w.get("strategy") not in ("channel", "group") or w.get("type", "int") != "int":
        raise ExportError("compressed-tensors folder: only weight-only INT schemes (channel or group) load here")
    spec = {"weights": {"num_bits": int(w["num_bits"]), "symmetric": bool(w.get("symmetric", True)),
                        "group_size": w.get("group_size") if w["strategy"] == "group" else None},
            "input_activations": None}
    from fair_calib.models.block import LINEAR_ROLES, TAP_POINTS

    block = {"linears": {r: spec for r in LINEAR_ROLES}, "taps": {p: [] for p in TAP_POINTS}}
    return [block] * n_layers


def read_layout(qcfg: dict[str, Any], n_layers: int) -> tuple[list[dict[str, Any]], torch.dtype]:
    """(per-block layout, scale dtype) of a ``quantization_config``."""
    section = qcfg.get("fair_calib")
    if section is not None:
        if int(section.get("version", 0)) > LAYOUT_VERSION:
            raise ExportError(f"quantization_config version {section.get('version')} is newer than this fair-calib "
                              f"reads ({LAYOUT_VERSION}); update fair-calib")
        names = {v: k for k, v in DTYPE_NAMES.items()}
        return unpack_layout(section, n_layers), names.get(section.get("scale_dtype", "float32"), torch.float32)
    if qcfg.get("quant_method") == "compressed-tensors":
        return _layout_from_compressed_tensors(qcfg, n_layers), torch.float32
    raise ExportError(f"quantization_config with quant_method {qcfg.get('quant_method')!r} is not one fair-calib "
                      "wrote (fair_calib or compressed-tensors pack-quantized)")
