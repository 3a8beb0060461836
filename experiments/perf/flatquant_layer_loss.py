"""Per-block FlatQuant losses on the default job's model and data, for comparing two checkouts (issue 16, item 3).

    PYTHONPATH=<checkout> python experiments/perf/flatquant_layer_loss.py [--epochs 15] [hydra overrides ...]

Runs `quantizer=flatquant` (uniform weights, W4A4, the default job's calibration set) in this process and prints one
JSON line: the engine's per-block weighted MSE of the quantized block (FP inputs), its mean, the wall time and the
settings. Uses only the config and registry interfaces, so it runs against an older checkout as well.
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from fair_calib import CONF_DIR
    from fair_calib.registry import build

    torch.set_num_threads(args.threads)
    extra = [] if args.epochs is None else [f"quantizer.epochs={args.epochs}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=fair_calib", "method=flatquant", "logger=none",
                                                       "quantizer.progress=false", *extra, *args.overrides])
    fp = build("model", cfg.model).load(torch.device("cpu"))
    calib = build("data", cfg.data, tokenizer=fp.tokenizer)
    weights = build("weighting", cfg.weighting).token_weights(calib.answer_offset, calib.attention_mask, None)
    q = build("quantizer", cfg.quantizer)
    t0 = time.perf_counter()
    report = q.quantize(copy.deepcopy(fp), calib, weights)
    wall = time.perf_counter() - t0
    blocks = [float(b["mse_weighted"]) for b in report["blocks"]]
    print(json.dumps({"mse_weighted": [round(x, 6) for x in blocks], "mean": round(sum(blocks) / len(blocks), 6),
                      "wall_s": round(wall, 1), "epochs": int(cfg.quantizer.epochs),
                      "quantizer": {k: cfg.quantizer.get(k) for k in ("lr", "weight_decay", "amp")}}))


if __name__ == "__main__":
    main()
