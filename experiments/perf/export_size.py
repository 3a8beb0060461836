"""Size of saved quantized models vs the full-precision model.

1. The shipped tiny models: quantized for real (RTN, QuaRot with RTN weights, FlatQuant with a short calibration,
   W4A16 RTN), saved with ``save_quantized``; bytes of model.safetensors on disk, and the same number counted from
   shapes (``fair_calib.export.size``) as a check of the analytic count.
2. LLaDA-8B and Dream-7B shapes (DESIGN section 5), analytically on the meta device: no download, no weights.
   The layout of each method comes from its own runtime skeleton (the modules a finished model holds).

    python experiments/perf/export_size.py            # ~1 minute on one CPU core
    python experiments/perf/export_size.py --no-tiny  # analytic part only (seconds)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fair_calib.data.calibration import tinyreason_calibration
from fair_calib.export import save_quantized
from fair_calib.export.layout import describe_blocks
from fair_calib.export.size import exported_bytes, folder_bytes, fp_bytes, meta_model
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.hf_folder import ASSETS
from fair_calib.models.loading import load_dllm
from fair_calib.quant.base import BitSettings
from fair_calib.quant.flat_block import FlatBlockSpec, install_flat_skeleton
from fair_calib.quant.qlinear import wrap_block_linears
from fair_calib.quant.quarot import QuaRot
from fair_calib.quant.rotation import resolve_o_mode
from fair_calib.registry import build

LLADA_8B = DLLMConfig(family="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      intermediate_size=12288, mask_id=126336, eos_id=126081, pad_id=126081, rope_theta=500000.0)
DREAM_7B = DLLMConfig(family="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                      intermediate_size=18944, mask_id=151666, eos_id=151643, pad_id=151643, rope_theta=1e6,
                      qkv_bias=True)

W4A4 = BitSettings(w_bits=4, a_bits=4)
W4A16_G128 = BitSettings(w_bits=4, a_bits=16, w_granularity="group", group_size=128)
W4A16_G128_ASYM = BitSettings(w_bits=4, a_bits=16, w_granularity="group", group_size=128, w_symmetric=False)


# ---- layouts of finished models, from skeletons (structure only) -------------------------------------------
def plain_layout(model: DiffusionLM, bits: BitSettings) -> list[dict[str, Any]]:
    """RTN / GPTQ / AWQ: every block linear quantized, no online ops."""
    for q in wrap_block_linears(model, bits.weight_spec(), bits.act_spec()):
        q.weight_frozen = True
    return describe_blocks(model)


def quarot_layout(model: DiffusionLM, bits: BitSettings) -> list[dict[str, Any]]:
    rotation = {"o_hadamard": resolve_o_mode("auto", model.config.n_heads), "qk_hadamard": False}
    QuaRot(weight_method="rtn", w_bits=bits.w_bits, a_bits=bits.a_bits, progress=False).install_runtime(model, rotation)
    return describe_blocks(model)


def flatquant_layout(model: DiffusionLM, bits: BitSettings) -> list[dict[str, Any]]:
    install_flat_skeleton(model, FlatBlockSpec(bits.weight_spec(), bits.act_spec(), bits.kv_spec()))
    return describe_blocks(model)


ANALYTIC: list[tuple[str, Callable[[DiffusionLM, BitSettings], list[dict[str, Any]]], BitSettings]] = [
    ("W4A4 RTN/GPTQ", plain_layout, W4A4),
    ("W4A4 QuaRot", quarot_layout, W4A4),
    ("W4A4 FlatQuant / FAIR-Calib", flatquant_layout, W4A4),
    ("W4A16-g128 GPTQ (sym)", plain_layout, W4A16_G128),
    ("W4A16-g128 AWQ (asym)", plain_layout, W4A16_G128_ASYM),
]


def gb(n: int) -> str:
    return f"{n / 1e9:8.3f} GB"


def mb(n: int) -> str:
    return f"{n / 1e6:8.3f} MB"


def analytic(dtype: torch.dtype = torch.bfloat16) -> None:
    print(f"\n## LLaDA-8B / Dream-7B shapes (analytic, {str(dtype).removeprefix('torch.')} FP parts)\n")
    print("| model | format | size | vs FP |\n|---|---|---|---|")
    for name, cfg in (("LLaDA-8B", LLADA_8B), ("Dream-7B", DREAM_7B)):
        fp = fp_bytes(cfg, dtype)
        print(f"| {name} | FP ({str(dtype).removeprefix('torch.')}) | {gb(fp)} | 1.00x |")
        for label, layout_fn, bits in ANALYTIC:
            n = exported_bytes(cfg, layout_fn(meta_model(cfg, dtype), bits), dtype)
            print(f"| {name} | {label} | {gb(n)} | {n / fp:.3f}x ({fp / n:.2f}x smaller) |")


def tiny(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    print("\n## Shipped tiny models (float32 FP parts), model.safetensors on disk; analytic count in brackets\n")
    print("| model | format | on disk | analytic | vs FP |\n|---|---|---|---|---|")
    methods: list[tuple[str, dict[str, Any]]] = [
        ("W4A4 RTN", {"name": "rtn"}),
        ("W4A4 QuaRot (RTN weights)", {"name": "quarot", "weight_method": "rtn", "progress": False}),
        ("W4A4 FlatQuant (1 epoch)", {"name": "flatquant", "epochs": 1, "progress": False}),
        ("W4A16-g64 RTN", {"name": "rtn", "a_bits": 16, "w_granularity": "group", "group_size": 64}),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llada", "dream"):
            folder = ASSETS / f"tiny-{family}"
            fp_model = load_dllm(folder)
            fp = folder_bytes(folder)
            print(f"| tiny-{family} | FP (float32) | {mb(fp)} | {mb(fp_bytes(fp_model.config, torch.float32))} | "
                  "1.00x |")
            calib = tinyreason_calibration(fp_model.tokenizer, n_samples=8)
            for label, qcfg in methods:
                model = copy.deepcopy(fp_model)
                build("quantizer", qcfg).quantize(model, calib, None)
                out = save_quantized(model, Path(tmp) / f"{family}-{qcfg['name']}", method=qcfg["name"])
                disk = folder_bytes(out)
                counted = exported_bytes(model.config, describe_blocks(model), torch.float32)
                print(f"| tiny-{family} | {label} | {mb(disk)} | {mb(counted)} | {disk / fp:.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-tiny", action="store_true", help="skip quantizing and saving the tiny models")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.no_tiny:
        tiny(args.threads)
    analytic()


if __name__ == "__main__":
    main()
