"""Our GPTQ at weight-only settings under each reference's defaults: layer error and KL, before / after issue 16.

    python experiments/perf/gptq_defaults.py [--threads 1]

Rows: `quarot` = fair-calib's GPTQ defaults before issue 16 (absmax / 7 grid, no act order, groups from the updated
weights, true-sequential; what QuaRot keeps), `ist` = IST-DASLab's script with --true-sequential (halfstep grid),
`llm_compressor` = the defaults now (halfstep grid, act order with static groups, one Hessian pass per block), and
the single changes between the old and new defaults. Models: the shipped tiny-llada and tiny-dream at W4A16-g64
(128 does not divide their widths), calibrated on 128 tinyreason calibration rows and scored on 64 test rows, and the
Qwen2-layout model of `gptq_vs_llmcompressor.py` at W4A16-g128 (random token rows). Errors are those of
`gptq_vs_llmcompressor.score`: mean per-block relative error on the quantized stream, KL(p_FP || p_Q) per token.
"""

from __future__ import annotations

import argparse
import copy
import resource
from types import SimpleNamespace

import torch
from gptq_vs_llmcompressor import build_qwen2_layout, score, token_rows

ROWS = {
    "quarot (old default)": {"reference": "quarot"},
    "  + halfstep grid": {"reference": "quarot", "scale_convention": "halfstep"},
    "  + act order, static groups": {"reference": "quarot", "act_order": True, "static_groups": True},
    "  + one pass per block": {"reference": "quarot", "true_sequential": False},
    "ist": {"reference": "ist"},
    "llm_compressor (new default)": {},
}


def models(args: argparse.Namespace):
    from fair_calib.data.calibration import tinyreason_calibration
    from fair_calib.models.loading import load_dllm

    for name in ("tiny-llada", "tiny-dream"):
        model = load_dllm(f"fair_calib/assets/{name}")
        calib = tinyreason_calibration(model.tokenizer, n_samples=128)
        test = tinyreason_calibration(model.tokenizer, n_samples=64, split="test")
        yield name, model, calib, test, 64
    qwen = build_qwen2_layout(SimpleNamespace(seed=0, hidden=512, layers=8, intermediate=1536, vocab=1024))
    ids, held = token_rows(64, 256, 1024, 1), token_rows(16, 256, 1024, 2)
    ones = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    yield "qwen2-layout 512x8", qwen, ones, SimpleNamespace(input_ids=held, attention_mask=torch.ones_like(held)), 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from fair_calib.registry import build

    for name, fp, calib, test, group in models(args):
        print(f"\n{name}, W4A16-g{group}\n\n| defaults | layer error (calib) | layer error (test) | KL test | CPU s |")
        print("|---|---|---|---|---|")
        base = None
        for label, over in ROWS.items():
            model = copy.deepcopy(fp)
            q = build("quantizer", {"name": "gptq", "a_bits": 16, "w_granularity": "group", "group_size": group,
                                    "progress": False, **over})
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            q.quantize(model, calib)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            state = {k: v for k, v in model.state_dict().items() if k.endswith(".weight")}
            c = score(fp, state, calib.input_ids, group, calib.attention_mask)
            t = score(fp, state, test.input_ids, group, test.attention_mask, kl=True)
            base = base or (c["layer_error"], t["kl"])
            cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
            print(f"| {label} | {c['layer_error']:.4e} ({c['layer_error'] / base[0] - 1:+.0%}) | "
                  f"{t['layer_error']:.4e} | {t['kl']:.4e} ({t['kl'] / base[1] - 1:+.0%}) | {cpu:.1f} |")


if __name__ == "__main__":
    main()
