"""Train the shipped tiny dLLMs on tinyreason with the masked-diffusion objective (nanoGPT-sized).

    python -m fair_calib.train.tiny --family llada --out fair_calib/assets/tiny-llada

Objective (LLaDA SFT form): the prompt is never masked; each answer token (answer + end-of-text
padding) is masked with probability t ~ U(eps, 1) (stratified over the batch); loss =
sum_masked CE / t / answer_length, averaged over the batch. Batches hold one task each, drawn
by `task_weights`; short tasks are cheap, so they get more batches. Dream uses the same code:
its one-position logit shift lives in the model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fair_calib.data.tinyreason import TASKS, iter_examples
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM, build_model
from fair_calib.models.loading import save_dllm
from fair_calib.models.tokenizer import build_char_tokenizer


@dataclass
class TrainConfig:
    family: str = "llada"
    out: str = "fair_calib/assets/tiny-llada"
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 6
    intermediate_size: int = 384
    vocab_size: int = 128
    rope_theta: float = 10000.0
    steps: int = 2400
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.05
    eps: float = 0.05
    max_extra_pad: int = 8
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"addition": 2.0, "word_problems": 2.0, "compare": 1.0})
    seed: int = 0
    threads: int = 2
    bf16: bool = False  # bf16 autocast only pays on CPUs with native bf16 matmul (AVX-512 BF16 / AMX)
    log_every: int = 100
    save_every: int = 500  # checkpoint the folder during training too (resumable with --init)
    init: str = ""  # continue from a saved model folder (same architecture) instead of a fresh init


def model_config(tc: TrainConfig, tok) -> DLLMConfig:
    return DLLMConfig(
        family=tc.family, vocab_size=tc.vocab_size, d_model=tc.d_model, n_layers=tc.n_layers,
        n_heads=tc.n_heads, n_kv_heads=tc.n_kv_heads, intermediate_size=tc.intermediate_size,
        mask_id=tok.mask_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        rope_theta=tc.rope_theta, norm_eps=1e-5 if tc.family == "llada" else 1e-6,
        qkv_bias=tc.family == "dream",
    )


def make_batch(examples, tok, extra_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + answer + end-of-text padding to a common length; returns ids and answer mask."""
    prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
    answers = [tok.encode(e.answer, add_special_tokens=False) for e in examples]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers)) + 1 + extra_pad
    ids = torch.full((len(examples), length), tok.eos_token_id, dtype=torch.long)
    answer_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, : len(p)] = torch.tensor(p)
        ids[i, len(p): len(p) + len(a)] = torch.tensor(a)
        answer_mask[i, len(p):] = True
    return ids, answer_mask


def diffusion_loss(model: DiffusionLM, ids: torch.Tensor, answer_mask: torch.Tensor, eps: float,
                   gen: torch.Generator) -> torch.Tensor:
    b, n = ids.shape
    # stratified t over the batch (marginally U(eps, 1), far lower variance of the 1/t-weighted loss)
    u = (torch.arange(b, dtype=torch.float32)[:, None] + torch.rand(1, generator=gen)) / b
    t = eps + (1 - eps) * u[torch.randperm(b, generator=gen)]
    masked = (torch.rand(b, n, generator=gen) < t) & answer_mask
    noisy = ids.masked_fill(masked, model.mask_id)
    logits = model(noisy)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none").view(b, n)
    per_row = (ce * masked / t).sum(1) / answer_mask.sum(1).clamp(min=1)
    return per_row.mean()


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def masked_accuracy(model: DiffusionLM, tok, n: int = 128, ratio: float = 0.5, seed: int = 1) -> dict[str, float]:
    """Teacher-forced token accuracy on masked answer tokens of the test split (a cheap health check)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for task in TASKS:
        it = iter_examples(task, "test", seed=0)
        ids, ans = make_batch([next(it) for _ in range(n)], tok, 0)
        masked = (torch.rand(ids.shape, generator=gen) < ratio) & ans
        pred = model(ids.masked_fill(masked, model.mask_id)).argmax(-1)
        out[task] = ((pred == ids) & masked).sum().item() / max(1, masked.sum().item())
    return out


def train(tc: TrainConfig) -> dict:
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    rnd = random.Random(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    tok = build_char_tokenizer(tc.vocab_size)
    phases = previous_phases(tc.init)  # before the first checkpoint of this run overwrites an --init == --out record
    if tc.init:
        from fair_calib.models.loading import load_dllm

        model = load_dllm(tc.init)
        model.tokenizer = tok
    else:
        model = build_model(model_config(tc, tok))
        model.tokenizer = tok
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.98))
    streams = {t: iter_examples(t, "train", seed=tc.seed) for t in TASKS}
    tasks, weights = zip(*tc.task_weights.items())
    start = time.time()
    history = []
    bar = tqdm(range(tc.steps), desc=f"train tiny-{tc.family}", mininterval=5)
    for step in bar:
        task = rnd.choices(tasks, weights)[0]
        batch = [next(streams[task]) for _ in range(tc.batch_size)]
        ids, ans = make_batch(batch, tok, rnd.randint(0, tc.max_extra_pad))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.bf16):
            loss = diffusion_loss(model, ids, ans, tc.eps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % tc.log_every == 0 or step == tc.steps - 1:
            model.eval()
            acc = masked_accuracy(model, tok)
            model.train()
            history.append({"step": step, "loss": loss.item(), "elapsed_s": round(time.time() - start, 1), **acc})
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k[:4]: f"{v:.2f}" for k, v in acc.items()})
            print(json.dumps(history[-1]), flush=True)
        if tc.save_every and step and step % tc.save_every == 0:
            _save(model, tc, history, time.time() - start, step, phases)
    model.eval()
    return _save(model, tc, history, time.time() - start, tc.steps, phases)


def previous_phases(init: str) -> list[dict]:
    """The training record of the checkpoint a run continues from: its earlier phases, then itself."""
    if not init or not (Path(init) / "training.json").is_file():
        return []
    before = json.loads((Path(init) / "training.json").read_text())
    return before.get("previous_phases", []) + [{k: v for k, v in before.items() if k != "previous_phases"}]


def _save(model: DiffusionLM, tc: TrainConfig, history: list[dict], wall: float, steps_done: int,
          phases: list[dict]) -> dict:
    info = {"train_config": asdict(tc), "steps_done": steps_done, "wall_time_s": round(wall, 1),
            "parameters": model.num_parameters(), "history": history}
    if phases:  # a continued run keeps the record of the phases before it (read once, before any save)
        info["previous_phases"] = phases
    save_dllm(model, tc.out, extra_files={"training.json": json.dumps(info, indent=2) + "\n"})
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = {"int": int, "float": float, "str": str, "bool": lambda s: s.lower() in ("1", "true", "yes")}
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name == "task_weights":
            parser.add_argument("--task-weights", type=json.loads, default=None, help="JSON dict task -> weight")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kinds[str(f.type)], default=None)
    args = vars(parser.parse_args(argv))
    tc = TrainConfig(**{k: v for k, v in args.items() if v is not None})
    if tc.family == "dream" and args.get("n_kv_heads") is None:
        tc.n_kv_heads = tc.n_heads // 3 if tc.n_heads % 3 == 0 else tc.n_heads
    Path(tc.out).parent.mkdir(parents=True, exist_ok=True)
    info = train(tc)
    print(f"saved {tc.out}: {info['parameters']} parameters, {info['wall_time_s']} s")


if __name__ == "__main__":
    main()
