"""Masked calibration states (data.masking): MCS statistics and rules, TMAS states from real teacher trajectories,
the pipeline handing masked ids to the layer-wise engine, and bad settings refused before any weights load."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fair_calib.data.calibration import CalibrationSet
from fair_calib.data.masking import (
    MaskingSpec,
    answer_windows,
    draw_mcs,
    hashed_data_config,
    mask_ratio,
    masking_spec,
    mcs_states,
    stratified_steps,
    tmas_states,
)
from fair_calib.registry import ConfigError, build

MASK = 2
PROMPT, ANSWER, PAD = 8, 32, 8  # synthetic rows: 8 prompt tokens, 32 answer tokens, 8 padding positions


def synthetic_set(n: int, seed: int = 0) -> CalibrationSet:
    """n rows of prompt (offset -1) + answer (offsets 0..31) + padding (attention 0, offsets continued on purpose:
    padding must stay unmasked because it is not attended, whatever its offset)."""
    g = torch.Generator().manual_seed(seed)
    length = PROMPT + ANSWER + PAD
    ids = torch.randint(3, 100, (n, length), generator=g)
    offset = torch.full((n, length), -1, dtype=torch.long)
    offset[:, PROMPT:] = torch.arange(ANSWER + PAD)
    attn = torch.ones((n, length), dtype=torch.long)
    attn[:, PROMPT + ANSWER:] = 0
    return CalibrationSet(ids, attn, offset, [f"p{i}" for i in range(n)])


def answer_sd(eps: float, n_rows: int, per_row: int) -> float:
    """sd of the masked fraction over n_rows rows of per_row answer tokens, t ~ U(eps, 1), m | t ~ Bernoulli(t):
    Var(X_r / A) = Var(t) + E[t (1 - t)] / A (law of total variance), rows independent."""
    mean = (1 + eps) / 2
    var_t = (1 - eps) ** 2 / 12
    e_t1t = mean - (var_t + mean ** 2)
    return math.sqrt((var_t + e_t1t / per_row) / n_rows)


@pytest.mark.parametrize("eps", [1e-3, 0.4])
def test_mcs_masked_fraction_matches_the_expected_time(eps):
    calib = synthetic_set(2000)
    out = mcs_states(calib, MASK, copies=2, eps=eps, seed=0)
    answer = (out.answer_offset >= 0) & (out.attention_mask == 1)
    frac = float(out.masked[answer].double().mean())
    # 4.5 sd: a correct implementation fails with probability ~7e-6 (and the draw is seeded, so never flaky)
    assert abs(frac - (1 + eps) / 2) < 4.5 * answer_sd(eps, 4000, ANSWER), frac


def test_mcs_per_row_fraction_grows_with_its_time():
    calib = synthetic_set(2000)
    answer = (calib.answer_offset >= 0) & (calib.attention_mask == 1)
    t, masked = draw_mcs(answer, 1, 1e-3, seed=3)
    frac = masked.sum(1).double() / ANSWER
    order = t.argsort()
    means_t, means_f = [], []
    for part in order.chunk(10):  # deciles of t: E[frac | t] = t, Var = t (1 - t) / A per row
        tt, ff = t[part], frac[part]
        sd = math.sqrt(float((tt * (1 - tt)).mean()) / ANSWER / len(part))
        assert abs(float(ff.mean()) - float(tt.mean())) < 4.5 * sd + 1e-12
        means_t.append(float(tt.mean()))
        means_f.append(float(ff.mean()))
    assert all(b > a for a, b in zip(means_f, means_f[1:]))  # deciles 0.1 apart, bins within ~0.03 of t
    assert float(t.min()) >= 1e-3 and float(t.max()) < 1


def test_mcs_never_masks_the_prompt_or_padding_and_keeps_offsets():
    calib = synthetic_set(300)
    out = mcs_states(calib, MASK, copies=1, eps=1e-3, seed=0)
    assert not out.masked[:, :PROMPT].any() and not out.masked[:, PROMPT + ANSWER:].any()
    assert out.masked[:, PROMPT:PROMPT + ANSWER].any()
    assert torch.equal(out.input_ids[out.masked], torch.full((int(out.masked.sum()),), MASK))
    assert torch.equal(out.input_ids[~out.masked], calib.input_ids[~out.masked])  # nothing else changes
    assert torch.equal(out.answer_offset, calib.answer_offset) and torch.equal(out.attention_mask,
                                                                               calib.attention_mask)
    assert out.prompts == calib.prompts
    # a row with no answer token (all prompt) stays as it is
    bare = CalibrationSet(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long),
                          torch.full((1, 3), -1), ["x"])
    assert not mcs_states(bare, MASK, seed=0).masked.any()


def test_mask_copies_repeat_rows_with_different_masks():
    calib = synthetic_set(50)
    out = mcs_states(calib, MASK, copies=3, eps=1e-3, seed=0)
    assert len(out) == 150 and out.prompts == calib.prompts * 3
    for c in range(3):
        rows = slice(50 * c, 50 * (c + 1))
        keep = ~out.masked[rows]
        assert torch.equal(out.input_ids[rows][keep], calib.input_ids[keep])  # copy-major: row n, then n + N
    assert not torch.equal(out.masked[:50], out.masked[50:100])
    assert not torch.equal(out.masked[50:100], out.masked[100:])


def test_same_seed_same_masks_other_seed_other_masks():
    calib = synthetic_set(40)
    a = mcs_states(calib, MASK, 2, 1e-3, seed=5)
    b = mcs_states(calib, MASK, 2, 1e-3, seed=5)
    c = mcs_states(calib, MASK, 2, 1e-3, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.masked, b.masked)
    assert not torch.equal(a.masked, c.masked)
    spec = masking_spec({"masking": "mcs", "mask_copies": 2, "seed": 5})
    assert torch.equal(spec.apply(calib, type("M", (), {"mask_id": MASK})()).masked, a.masked)


def test_none_returns_the_set_itself():
    calib = synthetic_set(3)
    assert MaskingSpec().apply(calib) is calib and not MaskingSpec().active


# ---- tmas --------------------------------------------------------------------------------------------------------
def test_stratified_steps_put_one_state_in_each_slice_of_time():
    steps = stratified_steps(torch.full((10,), 100), seed=0)
    assert sorted(int(s) // 10 for s in steps) == list(range(10))  # one step in each tenth of the trajectory
    uneven = stratified_steps(torch.tensor([1, 3, 7, 50] * 5), seed=1)
    assert bool((uneven >= 0).all()) and bool((uneven < torch.tensor([1, 3, 7, 50] * 5)).all())
    assert torch.equal(uneven, stratified_steps(torch.tensor([1, 3, 7, 50] * 5), seed=1))
    assert not torch.equal(stratified_steps(torch.full((10,), 100), seed=2), steps)


@pytest.fixture(scope="module")
def shipped_llada():
    from fair_calib.models.hf_folder import HFFolderModel

    return HFFolderModel("tiny-llada").load("cpu")


def test_tmas_rows_are_the_teachers_trajectory_states(shipped_llada, tmp_path, monkeypatch):
    from fair_calib.diagnostics import trajectory
    from fair_calib.diagnostics.trajectory import encode_prompts, rollout

    model = shipped_llada
    calib = build("data", {"name": "tinyreason", "n_samples": 4, "tasks": ["addition", "compare"], "seed": 0},
                  tokenizer=model.tokenizer)
    sampler = build("decoding", {"name": "llada", "gen_length": 64, "steps": 64, "block_length": 64})
    copies, seed, batch = 3, 4, 2
    out = tmas_states(calib, model, sampler, copies, seed, batch_size=batch, cache_dir=tmp_path)

    # the same rollouts, decoded here without the cache, grouped as the module documents (rows per fitted length)
    prompt_ids = encode_prompts(model, calib.prompts)
    windows = answer_windows(calib, [len(p) for p in prompt_ids])
    assert windows == [int(calib.attention_mask[r].sum()) - len(prompt_ids[r]) for r in range(4)]
    traces: dict[int, tuple] = {}
    for g in sorted(set(windows)):
        rows = [r for r, w in enumerate(windows) if w == g]
        fitted, length = sampler.fitted(g)
        assert length == g  # block 64 covers every window: the canvas is exactly the row's answer window
        traj = rollout(model, [prompt_ids[r] for r in rows], fitted, seed=seed, gen_length=g, batch_size=batch)
        for i, r in enumerate(rows):
            traces[r] = (traj.traces[i // batch], i % batch)
    n = len(calib)
    num_steps = torch.tensor([traces[k % n][0].num_steps for k in range(n * copies)])
    steps = stratified_steps(num_steps, seed)
    assert len(out) == n * copies and out.prompts == calib.prompts * copies
    for k in range(n * copies):
        trace, b = traces[k % n]
        p, g = len(prompt_ids[k % n]), windows[k % n]
        state = trace.state(int(steps[k]))[b]
        assert out.input_ids[k, :p].tolist() == prompt_ids[k % n]
        assert torch.equal(out.input_ids[k, p:p + g], state)
        assert torch.equal(out.masked[k, p:p + g], state == model.mask_id) and not out.masked[k, :p].any()
        assert out.answer_offset[k, p:p + g].tolist() == list(range(g)) and bool((out.answer_offset[k, :p] == -1).all())
        assert int(out.attention_mask[k].sum()) == p + g
        assert not out.masked[k, p + g:].any() and not out.attention_mask[k, p + g:].any()
    # every state keeps the teacher-forced row's length (the window is the row's answer positions)
    assert torch.equal(out.attention_mask.sum(1)[:n], calib.attention_mask.sum(1))

    ratio = mask_ratio(out)  # mask ratios span the decoding process: early, middle and late states all present
    assert float(ratio.max()) > 2 / 3 and float(ratio.min()) < 1 / 3
    assert bool(((ratio >= 1 / 3) & (ratio <= 2 / 3)).any())

    # a repeated run reads the trajectory cache: no decoding at all
    def no_rollout(*args, **kwargs):
        raise AssertionError("the teacher was decoded again")

    monkeypatch.setattr(trajectory, "rollout", no_rollout)
    again = tmas_states(calib, model, sampler, copies, seed, batch_size=batch, cache_dir=tmp_path)
    assert torch.equal(again.input_ids, out.input_ids) and torch.equal(again.masked, out.masked)


# ---- run identity ------------------------------------------------------------------------------------------------
def test_run_hash_ignores_masking_keys_that_change_nothing():
    from fair_calib.pipeline import run_key

    old = {"seed": 0, "data": {"name": "tinyreason", "n_samples": 8, "seed": 0}}
    none = {"seed": 0, "data": {**old["data"], "masking": "none", "mask_copies": 1, "mask_eps": 0.001,
                                "tmas_batch_size": 8}}
    assert run_key(old) == run_key(none)  # runs finished before the keys existed keep their hash
    none2 = json.loads(json.dumps(none))
    none2["data"].update(mask_copies=4, mask_eps=0.3)
    assert run_key(none2) == run_key(none)
    mcs = json.loads(json.dumps(none))
    mcs["data"]["masking"] = "mcs"
    assert run_key(mcs) != run_key(none)
    for key, value, same in (("tmas_batch_size", 2, True), ("mask_eps", 0.1, False), ("mask_copies", 2, False)):
        other = json.loads(json.dumps(mcs))
        other["data"][key] = value
        assert (run_key(other) == run_key(mcs)) is same, key
    tmas = json.loads(json.dumps(mcs))
    tmas["data"]["masking"] = "tmas"
    assert hashed_data_config(tmas["data"]).keys() == {"name", "n_samples", "seed", "masking", "mask_copies",
                                                       "tmas_batch_size"}


# ---- the pipeline ------------------------------------------------------------------------------------------------
def test_pipeline_hands_masked_ids_to_the_engine(tmp_path, monkeypatch):
    from test_config import compose_cfg

    import fair_calib.quant.engine as engine
    from fair_calib.pipeline import Pipeline

    seen = []
    capture = engine.capture_block_inputs

    def recording(model, calib, settings):
        seen.append((calib, model.mask_id))
        return capture(model, calib, settings)

    monkeypatch.setattr(engine, "capture_block_inputs", recording)
    overrides = ["experiment=none", "method=gptq", "logger=none", "data.masking=mcs", "data.mask_copies=2",
                 "data.n_samples=3", "benchmark.n={addition:2,word_problems:1,compare:2}", "benchmark.mc_num=1",
                 "benchmark.show_progress=false", "diagnostics.enabled=false", "compare_fp=false",
                 f"cache_dir={tmp_path / 'cache'}", "device=cpu", "quantizer.progress=false"]
    pipe = Pipeline(compose_cfg(*overrides), tmp_path / "run")
    results = pipe.run()
    assert len(seen) == 1
    calib, mask_id = seen[0]
    plain = build("data", {"name": "tinyreason", "n_samples": 3, "seed": 0}, tokenizer=pipe.model_spec.load().tokenizer)
    assert len(calib) == 6 and calib.masked is not None and calib.masked.any()
    assert bool((calib.input_ids[calib.masked] == mask_id).all())
    assert not calib.masked[calib.answer_offset < 0].any()
    assert torch.equal(calib.input_ids[~calib.masked], plain.input_ids.repeat(2, 1)[~calib.masked])
    expected = masking_spec({"masking": "mcs", "mask_copies": 2, "seed": 0}).apply(
        plain, type("M", (), {"mask_id": mask_id})())
    assert torch.equal(calib.masked, expected.masked)  # the run's seed decides the masks
    assert results["config"]["data"]["masking"] == "mcs" and "masking_s" in results["timings"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["data"]["mask_copies"] == 2


# ---- bad input: one line, exit 2, before any weights load --------------------------------------------------------
def _sampler_less_model(tmp: Path) -> list[str]:
    from fair_calib.models.hf_folder import ASSETS

    folder = tmp / "foreign"
    shutil.copytree(ASSETS / "tiny-llada", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "tinyfoo"
    (folder / "config.json").write_text(json.dumps(cfg))
    return [f"model.path={folder}", "model.trust_remote_code=true", "model.family=null", "data.masking=tmas"]


CLI_CASES = {
    "unknown_masking": (["data.masking=bert"], "data.masking='bert' unknown; valid: none, mcs, tmas"),
    "zero_copies": (["data.masking=mcs", "data.mask_copies=0"], "data.mask_copies=0: must be an integer >= 1"),
    "eps_zero": (["data.masking=mcs", "data.mask_eps=0"], "data.mask_eps=0: must be a number in (0, 1)"),
    "eps_above_one": (["data.mask_eps=1.5"], "data.mask_eps=1.5: must be a number in (0, 1)"),
    "tmas_without_sampler": (_sampler_less_model, "data.masking=tmas decodes the calibration prompts with the "
                                                  "teacher, but the model (tiny-llada, model_type tinyfoo) has no "
                                                  "sampler here"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_masking_settings(case, tmp_path):
    args, message = CLI_CASES[case]
    args = args(tmp_path) if callable(args) else args
    env = {**os.environ, "FAIR_CALIB_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "fair_calib", "experiment=none", "method=gptq", "logger=none",
                           "hydra.run.dir=run", "threads=1", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "results.json").exists()


def test_spec_refuses_bad_values_in_process():
    with pytest.raises(ConfigError, match="data.mask_copies=True"):
        MaskingSpec("mcs", mask_copies=True)
    with pytest.raises(ConfigError, match="data.tmas_batch_size=0"):
        MaskingSpec("tmas", tmas_batch_size=0)
    with pytest.raises(ConfigError, match="data.mask_eps='a'"):
        MaskingSpec("mcs", mask_eps="a")
    spec = MaskingSpec("tmas")
    with pytest.raises(ConfigError, match="is not a sampler"):
        spec.check_sampler(type("S", (), {"model_type": "llada", "label": "m"})(), object())
    MaskingSpec("mcs").check_sampler(type("S", (), {"model_type": "tinyfoo"})(), None)  # only tmas decodes
