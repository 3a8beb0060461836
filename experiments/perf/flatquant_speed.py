"""FlatQuant calibration speed on the default job's model and data (issue 16, item 4): before / after, FAIR-Calib.

    python experiments/perf/flatquant_speed.py                 # the default job's settings (15 epochs)
    python experiments/perf/flatquant_speed.py --epochs 3 --reps 2

One process, the variants interleaved rep by rep, so on a shared machine every variant sees the same load; read the
ratios, not the absolute seconds. Variants (all on `fair-calib`'s default model, calibration set and W4A4 bits):

  flatquant_before   quantizer=flatquant with the pre-issue-16 precision (amp=false: fp32 training on CPU,
                     weight_decay=0.0); the parameterisation is today's (its cost per step is the same)
  flatquant          quantizer=flatquant at today's defaults (amp=auto: bf16 autocast where the hardware has bf16,
                     weight decay 0.01)
  flatquant_bf16     the same with amp=true (bf16 autocast forced, emulated on CPUs without AVX512-BF16 / AMX)
  fair_calib         Stage I probe (cold: force=true) + FlatQuant on the FAIR weights: the FAIR-Calib total
  fair_calib_cached  the FlatQuant part of fair_calib alone (what a cached prior costs)

Printed per variant: median wall time, CPU time, the final per-block MSE (engine's weighted MSE); then the ratios
after / before and FAIR-Calib total / FlatQuant. `--threads` defaults to `fair-calib`'s threads=null rule.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    from fair_calib import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _block_mse(report: dict[str, Any]) -> list[float]:
    blocks = report.get("blocks") or report.get("per_block") or []
    out = []
    for b in blocks:
        for key in ("mse_weighted", "mse"):
            if isinstance(b, dict) and key in b:
                out.append(float(b[key]))
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="quantizer.epochs (default: the config's, 15)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default="flatquant_before,flatquant,flatquant_bf16,fair_calib")
    args = ap.parse_args()

    import torch

    from fair_calib.cli import available_cores
    from fair_calib.quant.flatquant import native_bf16
    from fair_calib.registry import build
    from fair_calib.utils.io import state_dict_hash

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    extra = [] if args.epochs is None else [f"quantizer.epochs={args.epochs}"]
    base = ["quantizer.progress=false", "logger=none", *extra]
    cfg_fair = _compose(["experiment=fair_calib", "force=true", "prior.progress=false", *base])
    cfg_flat = _compose(["experiment=fair_calib", "method=flatquant", *base])
    cfg_before = _compose(["experiment=fair_calib", "method=flatquant", "quantizer.amp=false",
                           "quantizer.weight_decay=0.0", *base])
    cfg_bf16 = _compose(["experiment=fair_calib", "method=flatquant", "quantizer.amp=true", *base])

    fp = build("model", cfg_fair.model).load(torch.device("cpu"))
    calib = build("data", cfg_fair.data, tokenizer=fp.tokenizer)
    fp_hash = state_dict_hash(fp)
    uniform = build("weighting", cfg_flat.weighting).token_weights(calib.answer_offset, calib.attention_mask, None)

    def run_quant(cfg: Any, weights: Any) -> tuple[float, float, dict[str, Any]]:
        q = build("quantizer", cfg.quantizer)
        model = copy.deepcopy(fp)
        t0, c0 = time.perf_counter(), time.process_time()
        report = q.quantize(model, calib, weights)
        return time.perf_counter() - t0, time.process_time() - c0, report

    times: dict[str, list[tuple[float, float]]] = {}
    mses: dict[str, list[float]] = {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for _ in range(args.reps):
        for v in variants:
            if v == "fair_calib":
                probe = build("prior", cfg_fair.prior)
                t0, c0 = time.perf_counter(), time.process_time()
                prior = probe.estimate(fp, calib.prompts, out_dir=None, weights_hash=fp_hash)
                weights = build("weighting", cfg_fair.weighting).token_weights(calib.answer_offset,
                                                                               calib.attention_mask, prior)
                tp, cp = time.perf_counter() - t0, time.process_time() - c0
                tq, cq, report = run_quant(cfg_fair, weights)
                times.setdefault("fair_calib_probe", []).append((tp, cp))
                times.setdefault("fair_calib_cached", []).append((tq, cq))
                times.setdefault(v, []).append((tp + tq, cp + cq))
            else:
                cfg = {"flatquant_before": cfg_before, "flatquant_bf16": cfg_bf16}.get(v, cfg_flat)
                tq, cq, report = run_quant(cfg, uniform)
                times.setdefault(v, []).append((tq, cq))
            mses[v] = _block_mse(report)
            print(f"  {v}: {times[v][-1][0]:.1f} s", flush=True)

    med = {k: (statistics.median(t for t, _ in vs), statistics.median(c for _, c in vs)) for k, vs in times.items()}
    print(f"\nnative bf16 on this CPU: {native_bf16(torch.device('cpu'))}")
    print(f"threads={threads}, epochs={cfg_flat.quantizer.epochs}, reps={args.reps}, "
          f"{calib.input_ids.shape[0]} calibration sequences x {calib.input_ids.shape[1]} tokens")
    print(f"{'variant':20s} {'wall_s':>8s} {'cpu_s':>8s}  per-block MSE")
    for k, (w, c) in med.items():
        m = " ".join(f"{x:.4g}" for x in mses.get(k, []))
        print(f"{k:20s} {w:8.1f} {c:8.1f}  {m}")
    ratios = {}
    if "flatquant" in med and "flatquant_before" in med:
        ratios["flatquant_after_over_before"] = med["flatquant"][0] / med["flatquant_before"][0]
    if "flatquant_bf16" in med and "flatquant_before" in med:
        ratios["flatquant_bf16_over_fp32"] = med["flatquant_bf16"][0] / med["flatquant_before"][0]
    if "flatquant" in med and "fair_calib" in med:
        ratios["fair_calib_total_over_flatquant"] = med["fair_calib"][0] / med["flatquant"][0]
        ratios["fair_calib_cached_over_flatquant"] = med["fair_calib_cached"][0] / med["flatquant"][0]
    print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
