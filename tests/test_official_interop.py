"""Interop with the official LLaDA / Dream code: configs that load there, and numbers reproduced draw for draw.

The `_reference_*` functions restate, in plain loops over the global RNG, what ML-GSAI/LLaDA `generate()`
and `get_log_likelihood()` and Dream's `diffusion_generate` (`alg="origin"`) compute; our samplers with
`numerics="official"` (and the estimator with `estimator="official"`) must give the same tokens and
numbers when their generator is seeded as the global RNG was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MASK_ID, VOCAB, make_tiny, tiny_config
from torch import Tensor, nn

from fair_calib.benchmark.lm import mc_loglikelihood
from fair_calib.decoding.base import DecodingConfigError
from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.hf_folder import ASSETS
from fair_calib.models.loading import ModelLoadError, load_dllm, save_dllm
from fair_calib.registry import ConfigError, build

# Every key of GSAI-ML/LLaDA-8B-Base's config.json (the fields of LLaDA's ModelConfig that checkpoint sets,
# plus the transformers bookkeeping), and of Dream-org/Dream-v0-Base-7B's (DreamConfig's arguments).
LLADA_OFFICIAL_KEYS = {
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout", "attention_layer_norm",
    "attention_layer_norm_with_affine", "bias_for_layer_norm", "block_group_size", "block_type", "d_model",
    "embedding_dropout", "embedding_size", "eos_token_id", "flash_attention", "include_bias", "include_qkv_bias",
    "init_cutoff_factor", "init_device", "init_fn", "init_std", "input_emb_norm", "layer_norm_type",
    "layer_norm_with_affine", "mask_token_id", "max_sequence_length", "mlp_hidden_size", "mlp_ratio", "model_type",
    "multi_query_attention", "n_heads", "n_kv_heads", "n_layers", "pad_token_id", "precision", "residual_dropout",
    "rms_norm_eps", "rope", "rope_full_precision", "rope_theta", "scale_logits", "use_cache", "vocab_size",
    "weight_tying", "torch_dtype",
}
DREAM_OFFICIAL_KEYS = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "mask_token_id", "max_position_embeddings", "max_window_layers",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id", "rms_norm_eps",
    "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype", "use_cache",
    "use_sliding_window", "vocab_size",
}
# values without which the official LLaDA modeling code builds another model or refuses to build
LLADA_MUST = {"block_type": "llama", "rope": True, "rope_full_precision": True, "alibi": False,
              "max_sequence_length": 4096, "weight_tying": False, "layer_norm_type": "rms", "activation_type": "silu",
              "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0, "scale_logits": False}


# ---- configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_saved_shipped_model_has_every_official_key(name: str, tmp_path: Path) -> None:
    model = load_dllm(ASSETS / name)
    folder = save_dllm(model, tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    if name == "tiny-llada":
        assert LLADA_OFFICIAL_KEYS <= set(config), sorted(LLADA_OFFICIAL_KEYS - set(config))
        assert {k: config[k] for k in LLADA_MUST} == LLADA_MUST
        assert not (folder / "generation_config.json").exists()
    else:
        assert DREAM_OFFICIAL_KEYS <= set(config), sorted(DREAM_OFFICIAL_KEYS - set(config))
        assert (config["use_sliding_window"], config["max_window_layers"]) == (False, model.config.n_layers)
        gen = json.loads((folder / "generation_config.json").read_text())
        assert (gen["mask_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (2, 1, 0)
    assert config["torch_dtype"] == "float32"
    assert "auto_map" not in config  # we ship no modeling code
    back = load_dllm(folder)
    assert back.config == model.config
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, MASK_ID, MASK_ID]])
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_unknown_keys_survive_load_and_save(tmp_path: Path) -> None:
    model = make_tiny("llada")
    first = save_dllm(model, tmp_path / "a")
    config = json.loads((first / "config.json").read_text())
    config.update({"my_lab_flag": {"nested": [1, 2]}, "init_device": "cpu", "transformers_version": "4.46.3",
                   "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig"}})
    (first / "config.json").write_text(json.dumps(config))
    loaded = load_dllm(first)
    assert loaded.config.extra["my_lab_flag"] == {"nested": [1, 2]}
    again = json.loads((save_dllm(loaded, tmp_path / "b") / "config.json").read_text())
    assert again["my_lab_flag"] == {"nested": [1, 2]}
    assert (again["init_device"], again["transformers_version"]) == ("cpu", "4.46.3")  # kept, official default or not
    assert "auto_map" not in again  # its modeling files were not copied
    hf = {**config, "vocab_size": 100}  # OLMo-style padded embedding: vocab_size < embedding_size survives too
    assert DLLMConfig.from_hf_dict(hf).to_hf_dict()["vocab_size"] == 100
    assert DLLMConfig.from_hf_dict(tiny_config("dream").to_hf_dict()) == tiny_config("dream")


TOY_CONFIG = '''from transformers import PretrainedConfig


class ToyLLaDAConfig(PretrainedConfig):
    model_type = "llada"
'''
TOY_MODELING = '''from transformers import PreTrainedModel

from .configuration_toy import ToyLLaDAConfig


class LLaDAModelLM(PreTrainedModel):
    config_class = ToyLLaDAConfig
'''


def test_with_remote_code_copies_the_users_files_and_writes_auto_map(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "configuration_toy.py").write_text(TOY_CONFIG)
    (src / "modeling_toy.py").write_text(TOY_MODELING)
    folder = save_dllm(make_tiny("llada"), tmp_path / "m", with_remote_code=src / "modeling_toy.py")
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_toy.ToyLLaDAConfig",
                                  "AutoModel": "modeling_toy.LLaDAModelLM",
                                  "AutoModelForCausalLM": "modeling_toy.LLaDAModelLM"}
    assert (folder / "modeling_toy.py").read_text() == TOY_MODELING
    assert (folder / "configuration_toy.py").read_text() == TOY_CONFIG
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert type(hf).__name__ == "ToyLLaDAConfig" and hf.block_type == "llama" and hf.rope is True
    assert type(load_dllm(folder)).__name__ == "LLaDAModelLM"  # our loader still builds the native model
    (src / "modeling_toy.py").write_text("from .missing import X\n")
    with pytest.raises(ModelLoadError, match="imports .missing"):
        save_dllm(make_tiny("llada"), tmp_path / "n", with_remote_code=src / "modeling_toy.py")


# ---- dtype ----------------------------------------------------------------------------------------------
def test_dtype_auto_reads_torch_dtype_and_an_explicit_dtype_wins(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    folder = save_dllm(make_tiny("dream").to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    n_float = sum(p.numel() for p in make_tiny("dream").state_dict().values() if p.is_floating_point())
    with caplog.at_level(logging.INFO, logger="fair_calib.models.loading"):
        auto = load_dllm(folder)
    assert auto.lm_head.weight.dtype == torch.bfloat16
    assert f"in bfloat16 (auto: config.json torch_dtype=bfloat16): {n_float * 2 / 2**30:.2f} GiB" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fair_calib.models.loading"):
        explicit = load_dllm(folder, dtype="float32")
    assert explicit.lm_head.weight.dtype == torch.float32
    assert f"in float32 (model.dtype=float32): {n_float * 4 / 2**30:.2f} GiB" in caplog.text
    assert build("model", {"name": "dllm", "path": str(folder)}).load().lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype=int8 unknown; valid: auto, float32"):
        build("model", {"name": "dllm", "path": str(folder), "dtype": "int8"})


# ---- LLaDA numerics -------------------------------------------------------------------------------------
class ScriptedLM(DiffusionLM):
    """Input-independent logits: position i puts margin[i] on token 3 + i (everything else 0, the mask -100)."""

    def __init__(self, margins: list[float], prompt_len: int) -> None:
        super().__init__(tiny_config("llada"))
        self.margins, self.prompt_len = margins, prompt_len
        self.wte = nn.Embedding(VOCAB, 2)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.wte

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        logits[..., MASK_ID] = -100.0
        for i, m in enumerate(self.margins):
            logits[:, self.prompt_len + i, 3 + i] = m
        return logits


def _commit_order(sampler: LLaDASampler, model: DiffusionLM, prompt: Tensor) -> list[int]:
    out = sampler.generate(model, prompt, record_trace=True)
    return [int(c.nonzero()[0, 1]) for c in out.trace.committed]


@pytest.mark.parametrize("prompt_len", [2, 60])
def test_official_fp32_confidences_tie_and_the_tie_is_broken_as_the_reference_breaks_it(prompt_len: int) -> None:
    """Margins 24..36 over 126 zero logits: fp64 probabilities 1 - 126 e^-m are distinct, fp32 ones all exactly 1.0.

    `exact` commits by the fp64 order (largest margin first); `official` has four tied confidences and
    commits in the order `torch.topk(k=1)` returns for the tie on the official canvas, as the reference
    `generate()` does: the lowest index on a realistic canvas (64 positions); on a 6-position canvas CPU
    topk (torch 2.13) returns another tied index, and official follows it there too.
    """
    margins = [24.0, 28.0, 32.0, 36.0]
    probs = torch.softmax(torch.tensor([[m] + [0.0] * (VOCAB - 2) + [-100.0] for m in margins]), -1)[:, 0]
    assert probs.tolist() == [1.0] * 4
    prompt = torch.arange(prompt_len)[None] % 50 + 5
    model = ScriptedLM(margins, prompt_len)
    exact = LLaDASampler(gen_length=4, steps=4, block_length=4)
    official = LLaDASampler(gen_length=4, steps=4, block_length=4, numerics="official")
    assert _commit_order(exact, model, prompt) == [3, 2, 1, 0]  # largest margin first
    reference_order, x = [], torch.cat([prompt, torch.full((1, 4), MASK_ID)], 1)
    for _ in range(4):  # the reference's step: fp32 confidences of the masked positions, topk(1) over the canvas
        conf = torch.where(x == MASK_ID, torch.softmax(model(x).float(), -1).amax(-1), torch.tensor(-float("inf")))
        pick = int(torch.topk(conf[0], k=1).indices[0])
        reference_order.append(pick - prompt_len)
        x[0, pick] = 3 + pick - prompt_len
    assert sorted(reference_order) == [0, 1, 2, 3]
    assert _commit_order(official, model, prompt) == reference_order
    if prompt_len == 60:
        assert reference_order == [0, 1, 2, 3]  # ties at 1.0: the lowest index first
    assert exact.generate(model, prompt).tokens.tolist() == official.generate(model, prompt).tokens.tolist()


def _reference_llada_generate(model: DiffusionLM, prompt: Tensor, steps: int, gen_length: int, block_length: int,
                              temperature: float, cfg_scale: float, remasking: str) -> Tensor:
    """ML-GSAI/LLaDA generate() restated: global RNG, fp64 Gumbel noise, fp32 softmax / uniforms, topk per row."""
    mask = model.mask_id
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask)], 1)
    is_prompt = x != mask
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for nb in range(n_blocks):
        lo, hi = prompt.shape[1] + nb * block_length, prompt.shape[1] + (nb + 1) * block_length
        left = (x[:, lo:hi] == mask).sum(1)
        plan = [[int(left[r]) // per_block + (1 if s < int(left[r]) % per_block else 0) for s in range(per_block)]
                for r in range(x.shape[0])]
        for step in range(per_block):
            masked = x == mask
            if cfg_scale > 0:
                un = x.clone()
                un[is_prompt] = mask
                cond, uncond = model(torch.cat([x, un])).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x)
            if temperature > 0:
                u = torch.rand_like(logits, dtype=torch.float64)
                noisy = logits.double().exp() / (-torch.log(u)) ** temperature
            else:
                noisy = logits
            x0 = noisy.argmax(-1)
            if remasking == "low_confidence":
                conf = F.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                conf = torch.rand(x0.shape)
            conf[:, hi:] = -float("inf")
            x0 = torch.where(masked, x0, x)
            conf = torch.where(masked, conf, torch.tensor(-float("inf")))
            for r in range(x.shape[0]):
                picked = torch.topk(conf[r], k=plan[r][step]).indices
                x[r, picked] = x0[r, picked]
    return x[:, prompt.shape[1]:]


@pytest.mark.parametrize(("remasking", "temperature", "cfg_scale"),
                         [("random", 0.0, 0.0), ("random", 1.0, 0.0), ("low_confidence", 0.7, 0.5),
                          ("low_confidence", 0.0, 1.0)])
def test_llada_official_numerics_reproduce_the_reference_draw_for_draw(remasking: str, temperature: float,
                                                                       cfg_scale: float) -> None:
    model = make_tiny("llada", seed=3)
    prompt = torch.tensor([[11, 12, 13, 14], [40, 41, 42, 43]])
    settings = dict(steps=8, gen_length=16, block_length=8, temperature=temperature, cfg_scale=cfg_scale,
                    remasking=remasking)
    torch.manual_seed(21)
    with torch.no_grad():
        want = _reference_llada_generate(model, prompt, **settings)
    ours = LLaDASampler(**settings, numerics="official").generate(
        model, prompt, generator=torch.Generator().manual_seed(21)).tokens
    assert ours.tolist() == want.tolist()
    if remasking == "random":  # exact draws fp64 numbers: another rollout from the same seed
        exact = LLaDASampler(**settings).generate(model, prompt, generator=torch.Generator().manual_seed(21)).tokens
        assert exact.tolist() != want.tolist()


# ---- Dream numerics -------------------------------------------------------------------------------------
def _reference_dream_origin(model: DiffusionLM, prompt: Tensor, steps: int, gen_length: int, temperature: float,
                            eps: float = 1e-3) -> Tensor:
    """Dream diffusion_generate(alg="origin") restated: per step one fp32 uniform per masked position (row-major),
    each moved with probability 1 - s/t (all at the last step), its token from Categorical(softmax)."""
    mask = model.mask_id
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask)], 1)
    times = torch.linspace(1, eps, steps + 1)
    for i in range(steps):
        masked = x == mask
        logits = model(x)[masked]
        p_move = 1 - times[i + 1] / times[i] if i < steps - 1 else 1
        new = torch.full((int(masked.sum()),), mask)
        move = torch.rand(new.shape) < p_move
        chosen = logits[move]
        if temperature > 0:
            probs = torch.softmax(chosen / temperature, dim=-1)
            new[move] = torch.distributions.Categorical(probs=probs).sample()
        else:
            new[move] = torch.softmax(chosen, dim=-1).argmax(-1)
        x[masked] = new
    return x[:, prompt.shape[1]:]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_dream_origin_official_numerics_reproduce_the_reference(temperature: float) -> None:
    model = make_tiny("dream", seed=4)
    prompt = torch.tensor([[11, 12, 13], [40, 41, 42]])
    torch.manual_seed(8)
    with torch.no_grad():
        want = _reference_dream_origin(model, prompt, steps=6, gen_length=12, temperature=temperature)
    sampler = DreamSampler(gen_length=12, steps=6, alg="origin", temperature=temperature, numerics="official")
    ours = sampler.generate(model, prompt, generator=torch.Generator().manual_seed(8)).tokens
    assert ours.tolist() == want.tolist()


def test_numerics_errors_name_the_valid_values() -> None:
    for cls in (LLaDASampler, DreamSampler):
        with pytest.raises(DecodingConfigError, match="decoding.numerics='fp16' unknown; valid: exact, official"):
            cls(numerics="fp16")
    sampler = build("decoding", {"name": "llada", "numerics": "official"})
    assert sampler.numerics == "official"


# ---- likelihood -----------------------------------------------------------------------------------------
def _reference_log_likelihood(model: DiffusionLM, prompt: list[int], answer: list[int], mc_num: int,
                              batch_size: int) -> float:
    """ML-GSAI/LLaDA get_log_likelihood() restated: per batch a start k, round(linspace) counts, randperm rows."""
    seq = torch.tensor(prompt + answer).repeat(batch_size, 1)
    length, p = len(answer), len(prompt)
    losses = []
    for _ in range(mc_num // batch_size):
        k = torch.randint(1, length + 1, ())
        counts = torch.round(torch.linspace(float(k), k + (batch_size - 1) * (length / batch_size),
                                            steps=batch_size)).long()
        counts = (counts - 1) % length + 1
        is_mask = torch.arange(length).repeat(batch_size, 1) < counts[:, None]
        for r in range(batch_size):
            is_mask[r] = is_mask[r][torch.randperm(length)]
        is_mask = torch.cat([torch.zeros(batch_size, p, dtype=torch.bool), is_mask], 1)
        noisy = torch.where(is_mask, model.mask_id, seq)
        ratio = (counts / length)[:, None].repeat(1, seq.shape[1])
        logits = model(noisy)
        loss = F.cross_entropy(logits[is_mask], seq[is_mask], reduction="none") / ratio[is_mask]
        losses.append((loss.sum() / batch_size).item())
    return -sum(losses) / len(losses)


@pytest.mark.parametrize("answer_len", [3, 8, 13])
def test_official_estimator_reproduces_get_log_likelihood(answer_len: int) -> None:
    model = make_tiny("llada", seed=5)
    prompt, answer = [11, 12, 13, 14], [20 + i for i in range(answer_len)]
    torch.manual_seed(17)
    with torch.no_grad():
        want = _reference_log_likelihood(model, prompt, answer, mc_num=32, batch_size=16)
    ours = mc_loglikelihood(model, prompt, answer, mc_num=32, mc_batch_size=16,
                            generator=torch.Generator().manual_seed(17), estimator="official")
    assert ours == pytest.approx(want, rel=1e-5)
    stratified = mc_loglikelihood(model, prompt, answer, mc_num=32, mc_batch_size=16,
                                  generator=torch.Generator().manual_seed(17))
    assert stratified != pytest.approx(want, rel=1e-5)


def test_estimator_and_numerics_are_checked_before_any_weights_load() -> None:
    with pytest.raises(ConfigError, match="benchmark.estimator='round' unknown; valid: stratified, official"):
        build("benchmark", {"name": "tiny", "estimator": "round"})
    with pytest.raises(ConfigError, match="mc_num=24 must be a multiple of mc_batch_size=16"):
        build("benchmark", {"name": "tiny", "estimator": "official", "mc_num": 24, "mc_batch_size": 16})
    assert build("benchmark", {"name": "tiny", "estimator": "official", "mc_num": 8, "mc_batch_size": 16}).estimator \
        == "official"  # fewer draws than a batch: one batch of mc_num, as the reference with batch_size = mc_num
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=["decoding.numerics=official", "benchmark.estimator=official"])
        dream = compose("config", overrides=["model=tiny_dream", "decoding.numerics=official"])
    assert build("decoding", cfg.decoding).numerics == "official"
    assert build("decoding", dream.decoding).numerics == "official" and dream.decoding.name == "dream"
    assert build("benchmark", cfg.benchmark).estimator == "official"
    assert (cfg.model.dtype, dream.model.dtype) == ("auto", "auto")
