"""Write the model card (README.md) of a trained tiny model: how it was trained and how accurate it is.

    python -m fair_calib.train.card fair_calib/assets/tiny-llada

Accuracy is measured with `benchmark=tiny` and the family's default sampler (conf/decoding/<family>.yaml).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from fair_calib.compose import option_config
from fair_calib.models.loading import load_dllm
from fair_calib.registry import build
from fair_calib.train.tiny import TrainConfig, previous_phases
from fair_calib.utils.io import write_text_atomic


def train_command(tc: dict, out: str) -> str:
    """The command that reproduces a training run: every setting that differs from TrainConfig's defaults."""
    defaults = TrainConfig()
    if tc["family"] == "dream":  # the trainer's own default for Dream
        defaults.n_kv_heads = defaults.n_heads // 3
    args = [f"--family {tc['family']}", f"--threads {tc['threads']}", f"--out {out}"]
    for f in fields(TrainConfig):
        if f.name in ("family", "threads", "out", "init") or f.name not in tc:
            continue
        if tc[f.name] != getattr(defaults, f.name):
            value = json.dumps(tc[f.name]) if isinstance(tc[f.name], dict) else tc[f.name]
            args.append(f"--{f.name.replace('_', '-')} {value!s}" if not isinstance(tc[f.name], dict)
                        else f"--{f.name.replace('_', '-')} '{value}'")
    return "python -m fair_calib.train.tiny " + " ".join(args)


TARGETS = {"tinyreason_addition": 0.90, "tinyreason_word_problems": 0.60, "tinyreason_compare": 0.90}


def targets_text(metrics: dict) -> str:
    """One line per target of the foundation issue: met or not, with the measured value."""
    lines = []
    for task, target in TARGETS.items():
        value = next(iter(metrics.get(task, {}).values()), None)
        if value is None:
            continue
        verdict = "met" if value >= target else "NOT met"
        name = task.removeprefix("tinyreason_")
        lines.append(f"- {name}: {100 * value:.1f} % (target >= {100 * target:.0f}): {verdict}")
    return "\n".join(lines)


def write_card(folder: str | Path, seed: int = 0, threads: int | None = None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    folder = Path(folder)
    model = load_dllm(folder)
    decoding = option_config("decoding", model.config.family)
    sampler = build("decoding", decoding)
    bench = build("benchmark", {"name": "tiny"})
    t0 = time.time()
    metrics = bench.evaluate(model, sampler, seed=seed)
    eval_s = time.time() - t0
    rows = "\n".join(f"| {task} | {name} | {100 * v:.1f} |" for task, m in metrics.items() for name, v in m.items())
    phases = previous_phases(str(folder))  # the trainer's own reading of the record: earlier phases, then this one
    out = f"fair_calib/assets/{folder.name}"
    phase_rows = []
    for i, ph in enumerate(phases, 1):
        ptc = ph["train_config"]
        tag = f" (phase {i} of {len(phases)})" if len(phases) > 1 else ""
        init = f" --init {out}" if i > 1 else ""
        phase_rows += [
            f"| training{tag} | {ptc['steps']} steps x batch {ptc['batch_size']}, AdamW lr {ptc['lr']} cosine, "
            f"seed {ptc['seed']}, {ptc['threads']} thread(s) |",
            f"| wall time{tag} | {ph['wall_time_s'] / 60:.1f} min on a shared 2-core machine |",
            f"| command{tag} | `{train_command(ptc, out)}{init}` |"]
    if len(phases) > 1:
        total = sum(ph["wall_time_s"] for ph in phases) / 60
        phase_rows.append(f"| total | {sum(ph['train_config']['steps'] for ph in phases)} steps, {total:.1f} min |")
        phase_rows.append(f"| all phases + this card | `experiments/train_tiny_models.sh {model.config.family}` |")
    phase_rows = "\n".join(phase_rows)
    cfg = model.config
    extras = ", q/k/v biases, shifted logits" if cfg.family == "dream" else ""
    layout = "LLaDA" if cfg.family == "llada" else "Dream"
    card = f"""# {folder.name}

A {layout}-layout masked-diffusion LM trained on CPU on the synthetic `tinyreason` tasks
(`fair_calib/data/tinyreason.py`), shipped so that every fair-calib experiment runs for real on a laptop.

| | |
|---|---|
| layout | {cfg.family} (d_model {cfg.d_model}, {cfg.n_layers} blocks, {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, \
MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}{extras}) |
| parameters | {model.num_parameters():,} |
{phase_rows}

## Full-precision accuracy on the tinyreason test split

Default sampler `conf/decoding/{cfg.family}.yaml`, `benchmark=tiny` (seed {seed}; evaluation took {eval_s:.0f} s).

| task | metric | % |
|---|---|---|
{rows}

Targets of the foundation issue with the default sampler:

{targets_text(metrics)}
"""
    write_text_atomic(folder / "README.md", card)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(write_card(args.folder, args.seed, args.threads), indent=2))


if __name__ == "__main__":
    main()
