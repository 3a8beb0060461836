"""GPTQ W4A16-g128: ours against llm-compressor's GPTQModifier on the same Qwen2-layout model and data.

    python experiments/perf/gptq_vs_llmcompressor.py [--samples 64 --seq-len 256 --threads 1 --repeats 1]

Builds a Qwen2-layout model (hidden 512, 8 layers, intermediate 1536, 8 query / 2 KV heads, q/k/v biases; random
weights with lognormal norm gains and a few large residual channels, so the Hessians are far from isotropic) in a
temporary folder, and random token rows for calibration and for a held-out check. Each quantizer runs in its own
fresh process (spawned one after the other, so the figures are side by side from one invocation) that reports
wall time, CPU time (user + system, all threads) and peak RSS of that process; calibration only, after the
model is loaded. The parent then scores every result with the same code, on our model of the same weights:

    layer error  mean over blocks of ||B_q(h) - B(h)||^2 / ||B(h)||^2, h = the quantized model's own input to
                 block l (the engine's per-block error with propagate="weights"), on the calibration rows and
                 on the held-out rows
    KL           mean over held-out tokens of KL(p_FP || p_Q) of the output distributions (nats)

llm-compressor sees the model as `Qwen2ForCausalLM` with its causal mask switched off (the block is the same
bidirectional block as ours; the script checks the two models agree before quantizing) and runs
`oneshot(recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]))` with its defaults (actorder
static, block 128, dampening 0.01, sequential pipeline). Ours is `quantizer=gptq bits=w4a16_g128` with its
defaults (composed from conf/, as `fair-calib` runs it); `--variants ours,ours_ist,ours_quarot,ours_block_error,
llmcompressor` adds our other references and our defaults with the per-block error report. Without llm-compressor
(`pip install -e ".[compare]"`) its row is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from procmem import peak_rss_mb, rss_mb

VARIANTS = {  # ours: overrides of the composed `quantizer=gptq bits=w4a16_g128` config
    "ours": {},
    "ours_ist": {"reference": "ist"},
    "ours_quarot": {"reference": "quarot"},  # = fair-calib's GPTQ defaults before issue 16
    "ours_block_error": {"block_error": True},  # + the per-block error report (FP outputs kept, FP down projection)
}


def qwen2_config(hidden: int, layers: int, intermediate: int, vocab: int) -> Any:
    from fair_calib.models.config import DLLMConfig

    return DLLMConfig(family="dream", vocab_size=vocab, d_model=hidden, n_layers=layers, n_heads=hidden // 64,
                      n_kv_heads=max(hidden // 256, 1), intermediate_size=intermediate, mask_id=vocab - 1, eos_id=1,
                      pad_id=0, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True)


@torch.no_grad()
def build_qwen2_layout(args: argparse.Namespace) -> Any:
    """Random Qwen2-layout weights (std 0.02 as HF initializes) with the structure trained models show: norm gains
    lognormal, 1% of the residual channels 20x larger in the embeddings."""
    from fair_calib.models.dllm import build_model

    torch.manual_seed(args.seed)
    model = build_model(qwen2_config(args.hidden, args.layers, args.intermediate, args.vocab))
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            p.copy_(torch.exp(0.5 * torch.randn_like(p)))
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.02)
        else:
            p.normal_(0.0, 0.02)
    emb = model.embed_tokens.weight
    outliers = torch.randperm(emb.shape[1])[: max(emb.shape[1] // 100, 1)]
    emb[:, outliers] *= 20.0
    return model.eval()


def token_rows(n: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab - 1, (n, length), generator=torch.Generator().manual_seed(seed))


def write_hf_qwen2(folder: Path, cfg: Any) -> None:
    """A Qwen2ForCausalLM config.json next to a link to the same safetensors (the state-dict names are Qwen2's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
        "max_position_embeddings": 4096, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 1,
    }, indent=2))


def bidirectional(model: Any) -> Any:
    """Qwen2ForCausalLM with the causal mask off (all rows are unpadded): the block our DreamModel computes."""
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    qwen2.create_causal_mask = lambda *args, **kwargs: None
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    return model


def llmcompressor_available() -> bool:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the measured children -------------------------------------------------------------------------------------

def _measure(fn: Any) -> dict[str, float]:
    r0, t0, rss0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), rss_mb()
    fn()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
            "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}


def _child(kind: str, work: str, threads: int, batch_size: int, group_size: int, out: str) -> None:
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # its per-module INFO lines
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(threads)
    work_dir = Path(work)
    ids = torch.load(work_dir / "calib_ids.pt")
    mask = torch.ones_like(ids)
    if kind == "llmcompressor":
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from transformers import AutoModelForCausalLM

        model = bidirectional(AutoModelForCausalLM.from_pretrained(str(work_dir / "hf"), dtype=torch.float32))
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
        figures = _measure(lambda: oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(ids),
                                           max_seq_length=ids.shape[1], batch_size=batch_size,
                                           shuffle_calibration_samples=False, pipeline="sequential"))
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    else:
        from fair_calib.models.loading import load_dllm
        from fair_calib.registry import build

        logging.getLogger("fair_calib.models.loading").setLevel(logging.ERROR)  # the random model has no tokenizer
        model = load_dllm(work_dir / "ours")
        from omegaconf import OmegaConf

        from fair_calib.compose import compose_config

        composed = compose_config(["quantizer=gptq", "bits=w4a16_g128", f"quantizer.group_size={group_size}",
                                   f"quantizer.batch_size={batch_size}", "quantizer.progress=false"])
        cfg = {**OmegaConf.to_container(composed.quantizer, resolve=True), **VARIANTS[kind]}
        quantizer = build("quantizer", cfg)
        calib = SimpleNamespace(input_ids=ids, attention_mask=mask)
        figures = _measure(lambda: quantizer.quantize(model, calib))
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    torch.save({"figures": figures, "state": state}, out)


def run_child(kind: str, work: Path, args: argparse.Namespace, index: int) -> dict[str, Any]:
    out = work / f"{kind}-{index}.pt"
    proc = mp.get_context("spawn").Process(target=_child, args=(kind, str(work), args.threads, args.batch_size,
                                                                args.group_size, str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{kind} run failed (exit code {proc.exitcode})")
    return torch.load(out)


# ---- scoring (one code path for every result) -----------------------------------------------------------------
@torch.no_grad()
def score(fp: Any, state: dict[str, torch.Tensor], ids: torch.Tensor, group_size: int | None,
          mask: torch.Tensor | None = None, chunk: int = 8, kl: bool = False) -> dict[str, float]:
    """Mean per-block relative error on the quantized stream (real tokens only), optionally KL(p_FP || p_Q) per
    token; checks every block linear is on a 4-bit symmetric grid (groups of `group_size`, None = per channel)."""
    from fair_calib.export.grid import recover_grid

    quant = _with_weights(fp, state)
    for block in quant.blocks:
        for name, lin in block.linears().items():
            recover_grid(lin.weight, 4, True, group_size, name)
    mask = torch.ones_like(ids) if mask is None else mask
    num = torch.zeros(len(fp.blocks), dtype=torch.float64)
    den = torch.zeros_like(num)
    kl_sum, tokens = 0.0, 0.0
    for start in range(0, len(ids), chunk):
        x, m = ids[start: start + chunk], mask[start: start + chunk].double()
        rope, bias = fp.rope(x.shape[1]), fp.attention_bias(mask[start: start + chunk], torch.float32)
        hq = quant.embed(x)
        for i, (bq, bf) in enumerate(zip(quant.blocks, fp.blocks)):
            yq, yf = bq(hq, rope, bias), bf(hq, rope, bias)
            num[i] += ((yq - yf).double().pow(2).sum(-1) * m).sum()
            den[i] += (yf.double().pow(2).sum(-1) * m).sum()
            hq = yq
        if kl:
            logp = torch.log_softmax(fp(x, mask[start: start + chunk]).double(), -1)
            logq = torch.log_softmax(quant.head(hq).double(), -1)
            kl_sum += float(((logp.exp() * (logp - logq)).sum(-1) * m).sum())
            tokens += float(m.sum())
    out = {"layer_error": float((num / den).mean())}
    if kl:
        out["kl"] = kl_sum / tokens
    return out


def _with_weights(fp: Any, state: dict[str, torch.Tensor]) -> Any:
    """A copy of `fp` with the block weights of `state` (same names: ours, or Qwen2's = our Dream layout)."""
    import copy

    model = copy.deepcopy(fp)
    blocks = {f"{name}.weight" for i, block in enumerate(fp.blocks) for name in _linear_names(fp, i)}
    missing = blocks - set(state)
    assert not missing, sorted(missing)[:3]
    model.load_state_dict({k: state[k] for k in blocks}, strict=False)
    return model


def _linear_names(fp: Any, index: int) -> list[str]:
    block = fp.blocks[index]
    prefix = next(n for n, m in fp.named_modules() if m is block)
    return [f"{prefix}.{block.ROLE_PATHS[role]}" for role in block.linears()]


@torch.no_grad()
def check_same_model(fp: Any, work: Path, ids: torch.Tensor) -> float:
    """Max |difference| of the final hidden states of our model and the bidirectional Qwen2ForCausalLM."""
    from transformers import AutoModelForCausalLM

    hf = bidirectional(AutoModelForCausalLM.from_pretrained(str(work / "hf"), dtype=torch.float32)).eval()
    x = ids[:2]
    ours = fp.final_norm(fp.hidden_states(x))
    theirs = hf.model(input_ids=x).last_hidden_state
    return float((ours - theirs).abs().max() / theirs.abs().max())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="calibration batch, the same for both tools")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the tools this many times")
    ap.add_argument("--variants", default="ours,llmcompressor")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in VARIANTS and k != "llmcompressor"]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; valid: {', '.join([*VARIANTS, 'llmcompressor'])}")
    if "llmcompressor" in kinds and not llmcompressor_available():
        print("llm-compressor is not installed (pip install -e '.[compare]'): skipping its row")
        kinds.remove("llmcompressor")

    from fair_calib.models.loading import save_dllm

    with tempfile.TemporaryDirectory(prefix="gptq_vs_llmc_") as tmp:
        work = Path(tmp)
        fp = build_qwen2_layout(args)
        save_dllm(fp, work / "ours")
        write_hf_qwen2(work / "hf", fp.config)
        (work / "hf" / "model.safetensors").symlink_to(work / "ours" / "model.safetensors")
        calib = token_rows(args.samples, args.seq_len, args.vocab, args.seed + 1)
        held_out = token_rows(args.eval_samples, args.seq_len, args.vocab, args.seed + 2)
        torch.save(calib, work / "calib_ids.pt")
        n_params = sum(p.numel() for b in fp.blocks for p in b.parameters())
        print(f"Qwen2 layout: hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
              f"{n_params / 1e6:.1f}M block parameters; calibration {args.samples} x {args.seq_len} tokens, "
              f"held-out {args.eval_samples} x {args.seq_len}; W4A16 g{args.group_size}; {args.threads} thread(s), "
              f"batch {args.batch_size}; torch {torch.__version__}")
        if "llmcompressor" in kinds:
            import llmcompressor

            print(f"llm-compressor {llmcompressor.__version__}; our model vs bidirectional Qwen2ForCausalLM: "
                  f"max rel. difference {check_same_model(fp, work, calib):.1e}")
        rows: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for rep in range(args.repeats):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                rows[kind].append(run_child(kind, work, args, rep))
                f = rows[kind][-1]["figures"]
                print(f"repeat {rep + 1} {kind}: wall {f['wall_s']:.1f} s, CPU {f['cpu_s']:.1f} s, "
                      f"peak RSS {f['peak_rss_mb']:.0f} MB", flush=True)
        print("\n| run | wall s | CPU s | peak RSS MB | layer error (calib) | layer error (held-out) | KL held-out |")
        print("|---|---|---|---|---|---|---|")
        summary = {}
        for kind, results in rows.items():
            figs = {k: sum(r["figures"][k] for r in results) / len(results) for k in results[0]["figures"]}
            state = results[-1]["state"]
            quality = {**{f"calib_{k}": v for k, v in score(fp, state, calib, args.group_size).items()},
                       **score(fp, state, held_out, args.group_size, kl=True)}
            summary[kind] = {**figs, **quality}
            print(f"| {kind} | {figs['wall_s']:.1f} | {figs['cpu_s']:.1f} | {figs['peak_rss_mb']:.0f} | "
                  f"{quality['calib_layer_error']:.4e} | {quality['layer_error']:.4e} | {quality['kl']:.4e} |")
        if "llmcompressor" in summary:
            ref = summary["llmcompressor"]
            print("\nratios to llm-compressor (same process run, side by side; mean over repeats):")
            for kind, s in summary.items():
                if kind != "llmcompressor":
                    print(f"  {kind}: wall {s['wall_s'] / ref['wall_s']:.2f}x, CPU {s['cpu_s'] / ref['cpu_s']:.2f}x, "
                          f"peak RSS {s['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x, layer error (calib) "
                          f"{s['calib_layer_error'] / ref['calib_layer_error']:.3f}x, held-out "
                          f"{s['layer_error'] / ref['layer_error']:.3f}x, KL {s['kl'] / ref['kl']:.3f}x")
        print(json.dumps({"args": vars(args), "summary": summary}))


if __name__ == "__main__":
    main()
