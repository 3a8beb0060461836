"""The tiny-model trainer: the masked-diffusion loss and the training record of multi-phase runs."""

import json

import torch

from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import build_model
from fair_calib.train.tiny import TrainConfig, diffusion_loss, train

SMALL = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=64, batch_size=4, threads=1,
             log_every=1000, task_weights={"addition": 1.0})


def test_loss_ignores_the_prompt_and_weights_by_one_over_t():
    cfg = DLLMConfig(family="llada", vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                     intermediate_size=32, mask_id=15, eos_id=14, pad_id=13)
    model = build_model(cfg)
    ids = torch.randint(0, 13, (8, 10))
    answer = torch.zeros(8, 10, dtype=torch.bool)
    answer[:, 6:] = True
    # eps = 1 forces t = 1: every answer token is masked, weight 1/t = 1, prompt untouched
    loss = diffusion_loss(model, ids, answer, eps=1.0, gen=torch.Generator().manual_seed(0))
    logits = model(ids.masked_fill(answer, cfg.mask_id))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), ids.reshape(-1), reduction="none").view(8, 10)
    assert torch.allclose(loss, ce[:, 6:].mean(), atol=1e-6)


def test_continued_phases_keep_one_record_each(tmp_path):
    out = str(tmp_path / "m")
    train(TrainConfig(out=out, steps=3, save_every=0, **SMALL))
    # phase 2 continues in the same folder and checkpoints mid-run: the record must still list phase 1 once
    info = train(TrainConfig(out=out, init=out, steps=4, save_every=1, **SMALL))
    saved = json.loads((tmp_path / "m" / "training.json").read_text())
    assert [p["steps_done"] for p in saved["previous_phases"]] == [3]
    assert saved["steps_done"] == info["steps_done"] == 4
