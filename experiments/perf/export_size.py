"""Size of saved quantized models vs the full-precision model.

1. The shipped tiny models: quantized for real (RTN, QuaRot with RTN weights, FlatQuant with a short calibration,
   W4A16 RTN), saved with ``save_quantized``; bytes of model.safetensors on disk, and the same number counted from
   shapes (``fair_calib.export.size``) as a check of the analytic count.
2. LLaDA-8B and Dream-7B shapes (DESIGN section 5), counted on the meta device: no download, no weights. The
   layout of each method is the one its production quantizer leaves: a one-block model with the 8B block shapes (and
   a small vocabulary, random weights) is quantized for real (FlatQuant with 0 epochs: transforms, merge, frozen
   weights, no training) and described; every block of a quantized model has that layout. GPTQ and AWQ leave the
   same layout as RTN with the same bit settings (packed weights, no online ops), so RTN stands in for them.

    python experiments/perf/export_size.py            # a few minutes on one CPU core
    python experiments/perf/export_size.py --no-tiny  # 8B shapes only (about a minute: one 8B-sized block each)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from fair_calib.data.calibration import CalibrationSet, tinyreason_calibration
from fair_calib.export import save_quantized
from fair_calib.export.layout import describe_blocks
from fair_calib.export.size import exported_bytes, folder_bytes, fp_bytes
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import build_model
from fair_calib.models.hf_folder import ASSETS
from fair_calib.models.loading import load_dllm
from fair_calib.registry import build

LLADA_8B = DLLMConfig(family="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      intermediate_size=12288, mask_id=126336, eos_id=126081, pad_id=126081, rope_theta=500000.0)
DREAM_7B = DLLMConfig(family="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                      intermediate_size=18944, mask_id=151666, eos_id=151643, pad_id=151643, rope_theta=1e6,
                      qkv_bias=True)

W4A4 = {"w_bits": 4, "a_bits": 4}
W4A16_G128 = {"w_bits": 4, "a_bits": 16, "w_granularity": "group", "group_size": 128}
SHAPES: list[tuple[str, dict[str, Any]]] = [  # label, quantizer config (RTN stands in for GPTQ / AWQ: same layout)
    ("W4A4 RTN/GPTQ", {"name": "rtn", **W4A4}),
    ("W4A4 QuaRot", {"name": "quarot", "weight_method": "rtn", **W4A4}),
    ("W4A4 FlatQuant / FAIR-Calib", {"name": "flatquant", "epochs": 0, **W4A4}),
    ("W4A16-g128 GPTQ (sym)", {"name": "rtn", **W4A16_G128}),
    ("W4A16-g128 AWQ (asym)", {"name": "rtn", **W4A16_G128, "w_symmetric": False}),
]


# ---- layouts of quantized models, from one block quantized by the production quantizer ------------------------
def block_layout(cfg: DLLMConfig, qcfg: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """The layout (``describe_blocks``) of a ``cfg`` model quantized with ``qcfg``, from one block of ``cfg``'s shapes
    quantized for real on two random 8-token rows."""
    vocab = 64
    small = dataclasses.replace(cfg, n_layers=1, vocab_size=vocab, mask_id=vocab - 1, eos_id=vocab - 2,
                                pad_id=vocab - 2)
    torch.manual_seed(seed)
    model = build_model(small).eval()
    ids = torch.randint(0, vocab - 2, (2, 8))
    calib = CalibrationSet(ids, torch.ones_like(ids), torch.arange(8).expand(2, 8).clone(), ["", ""])
    progress = {} if qcfg["name"] == "rtn" else {"progress": False}
    build("quantizer", {**qcfg, **progress}).quantize(model, calib, None)
    return describe_blocks(model) * cfg.n_layers


def gb(n: int) -> str:
    return f"{n / 1e9:8.3f} GB"


def mb(n: int) -> str:
    return f"{n / 1e6:8.3f} MB"


def analytic(dtype: torch.dtype = torch.bfloat16, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    print(f"\n## LLaDA-8B / Dream-7B shapes (counted, {str(dtype).removeprefix('torch.')} FP parts)\n")
    print("| model | format | size | vs FP |\n|---|---|---|---|")
    for name, cfg in (("LLaDA-8B", LLADA_8B), ("Dream-7B", DREAM_7B)):
        fp = fp_bytes(cfg, dtype)
        print(f"| {name} | FP ({str(dtype).removeprefix('torch.')}) | {gb(fp)} | 1.00x |")
        for label, qcfg in SHAPES:
            n = exported_bytes(cfg, block_layout(cfg, qcfg), dtype)
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
    analytic(threads=args.threads)


if __name__ == "__main__":
    main()
