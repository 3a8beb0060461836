"""Peak memory of layer-wise GPTQ calibration vs the number of blocks (it should stay near flat).

    python experiments/perf/engine_memory.py                 # 4, 8, 16, 32 blocks, one subprocess each
    python experiments/perf/engine_memory.py --blocks 8 --child

Each configuration runs in a fresh process (peak RSS is per process). Reported per run:
  model_mb     parameters of the random model (grows with depth by construction)
  base_mb      RSS after building the model and the calibration set, before calibrating
  peak_mb      peak RSS of the process (VmHWM, procmem.peak_rss_mb)
  overhead_mb  peak - base: what calibration costs on top of the model (should not grow with depth)
  acts_mb      size of one (N, L, d_model) activation store; the engine keeps two (inputs, FP outputs)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from procmem import peak_rss_mb, rss_mb


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from fair_calib.data.calibration import CalibrationSet
    from fair_calib.models.config import DLLMConfig
    from fair_calib.models.dllm import build_model
    from fair_calib.quant.gptq import GPTQ

    torch.manual_seed(0)
    cfg = DLLMConfig(family="llada", vocab_size=128, d_model=args.d_model, n_layers=args.blocks, n_heads=4,
                     n_kv_heads=4, intermediate_size=2 * args.d_model, mask_id=2, eos_id=1, pad_id=0)
    model = build_model(cfg).eval()
    ids = torch.randint(4, 128, (args.n_samples, args.seq_len))
    calib = CalibrationSet(ids, torch.ones_like(ids), torch.arange(args.seq_len).expand_as(ids).clone(),
                           [""] * args.n_samples)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    base = rss_mb()
    t0 = time.perf_counter()
    report = GPTQ(w_bits=4, a_bits=4, batch_size=args.batch_size, offload=args.offload,
                  progress=False).quantize(model, calib)
    peak = peak_rss_mb()
    return {"blocks": args.blocks, "model_mb": round(model_mb, 1), "base_mb": round(base, 1),
            "peak_mb": round(peak, 1), "overhead_mb": round(peak - base, 1),
            "acts_mb": round(args.n_samples * args.seq_len * args.d_model * 4 / 2**20, 1),
            "time_s": round(time.perf_counter() - t0, 1),
            "last_block_mse_w": report["blocks"][-1]["mse_weighted"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="*", default=[4, 8, 16, 32])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--offload", default="cpu", choices=["cpu", "disk"])
    p.add_argument("--child", action="store_true", help="run one configuration in this process")
    args = p.parse_args()
    if args.child:
        args.blocks = args.blocks[0]
        print(json.dumps(child(args)))
        return
    rows = []
    for n in args.blocks:
        cmd = [sys.executable, __file__, "--child", "--blocks", str(n), "--d-model", str(args.d_model),
               "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--offload", args.offload]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
