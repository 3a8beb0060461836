"""Hugging Face-style folders: save/load round trip, official config and tensor names, shards, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_tiny
from safetensors.torch import save_file

from fair_calib.models.dllm import DiffusionLM, DreamModel, LLaDAModelLM
from fair_calib.models.loading import ModelLoadError, load_dllm, save_dllm
from fair_calib.registry import ConfigError, build

IDS = torch.tensor([[5, 17, 33, 2, 2, 40, 9], [60, 61, 2, 2, 2, 12, 13]])

# config.json as shipped with GSAI-ML/LLaDA-8B-Instruct (OLMo names), shrunk to the tiny sizes
LLADA_OFFICIAL = {
    "activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "block_type": "llama", "d_model": 32, "embedding_size": VOCAB, "eos_token_id": 1, "include_bias": False,
    "include_qkv_bias": False, "layer_norm_type": "rms", "mask_token_id": 2, "max_sequence_length": 4096,
    "mlp_hidden_size": 64, "mlp_ratio": 4, "model_type": "llada", "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope": True, "rope_theta": 500000.0, "vocab_size": VOCAB,
    "weight_tying": False,
}
# config.json as shipped with Dream-org/Dream-v0-Instruct-7B (Qwen2 names), shrunk to the tiny sizes
DREAM_OFFICIAL = {
    "architectures": ["DreamModel"],
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 1, "eos_token_id": 1, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
    "mask_token_id": 2, "max_position_embeddings": 131072, "model_type": "Dream", "num_attention_heads": 4,
    "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": VOCAB,
}


def _official_tensors(family: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """Tensors named as in the official checkpoints, written without using our module tree."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    t: dict[str, torch.Tensor] = {}
    if family == "llada":
        t["model.transformer.wte.weight"] = r(VOCAB, 32)
        t["model.transformer.ln_f.weight"] = 1 + r(32)
        t["model.transformer.ff_out.weight"] = r(VOCAB, 32)
        for i in range(2):
            p = f"model.transformer.blocks.{i}"
            t[f"{p}.attn_norm.weight"], t[f"{p}.ff_norm.weight"] = 1 + r(32), 1 + r(32)
            for n in ("q_proj", "k_proj", "v_proj", "attn_out"):
                t[f"{p}.{n}.weight"] = r(32, 32)
            t[f"{p}.ff_proj.weight"], t[f"{p}.up_proj.weight"] = r(64, 32), r(64, 32)
            t[f"{p}.ff_out.weight"] = r(32, 64)
    else:
        t["model.embed_tokens.weight"] = r(VOCAB, 32)
        t["model.norm.weight"] = 1 + r(32)
        t["lm_head.weight"] = r(VOCAB, 32)
        for i in range(2):
            p = f"model.layers.{i}"
            t[f"{p}.input_layernorm.weight"], t[f"{p}.post_attention_layernorm.weight"] = 1 + r(32), 1 + r(32)
            t[f"{p}.self_attn.q_proj.weight"], t[f"{p}.self_attn.q_proj.bias"] = r(32, 32), r(32)
            for n in ("k", "v"):
                t[f"{p}.self_attn.{n}_proj.weight"], t[f"{p}.self_attn.{n}_proj.bias"] = r(16, 32), r(16)
            t[f"{p}.self_attn.o_proj.weight"] = r(32, 32)
            t[f"{p}.mlp.gate_proj.weight"], t[f"{p}.mlp.up_proj.weight"] = r(64, 32), r(64, 32)
            t[f"{p}.mlp.down_proj.weight"] = r(32, 64)
    return t


def _write_official(folder: Path, family: str, tensors: dict[str, torch.Tensor] | None = None,
                    config: dict | None = None) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config or (LLADA_OFFICIAL if family == "llada" else DREAM_OFFICIAL)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = tensors if tensors is not None else _official_tensors(family)
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


# ---- round trip ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_save_load_round_trip(family: str, tmp_path: Path) -> None:
    model = make_tiny(family)
    folder = save_dllm(model, tmp_path / "m")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temp folder was renamed away
    loaded = load_dllm(folder)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)
    text = "12+34=46\nAnn has 3 pens."
    assert loaded.tokenizer.encode(text, add_special_tokens=False) == model.tokenizer.encode(text,
                                                                                             add_special_tokens=False)
    assert loaded.tokenizer.mask_token_id == 2 and loaded.tokenizer.pad_token_id == 0
    assert loaded.tokenizer.decode(model.tokenizer.encode(text, add_special_tokens=False)) == text


def test_save_overwrites_and_load_in_bfloat16(tmp_path: Path) -> None:
    first, second = make_tiny("dream", seed=1), make_tiny("dream", seed=2)
    save_dllm(first, tmp_path / "m")
    save_dllm(second, tmp_path / "m")
    loaded = load_dllm(tmp_path / "m", dtype="bfloat16")
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.lm_head.weight.float(), second.lm_head.weight.bfloat16().float())


def test_rtn_weight_only_model_round_trips(tmp_path: Path) -> None:
    """A W4A16 RTN model keeps the official names, so it saves and reloads with its quantized weights."""
    model = make_tiny("llada")
    build("quantizer", {"name": "rtn", "w_bits": 4, "a_bits": 16}).quantize(model)
    loaded = load_dllm(save_dllm(model, tmp_path / "w4"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)
    w = loaded.blocks[0].role("q").weight
    assert all(row.unique().numel() <= 16 for row in w)


# ---- official folders ---------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "cls"), [("llada", LLaDAModelLM), ("dream", DreamModel)])
def test_official_config_and_tensor_names_load(family: str, cls: type, tmp_path: Path) -> None:
    tensors = _write_official(tmp_path / "snap", family)
    # auto_map present, but a native model_type needs no remote code; an explicit dtype wins over torch_dtype
    model = load_dllm(tmp_path / "snap", dtype="float32")
    assert type(model) is cls
    cfg = model.config
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.intermediate_size, cfg.mask_id) == (32, 2, 4, 64, 2)
    assert cfg.n_kv_heads == (4 if family == "llada" else 2)
    assert cfg.rope_theta == (500000.0 if family == "llada" else 1e6)
    assert cfg.qkv_bias == (family == "dream")
    state = model.state_dict()
    assert set(state) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(state[k], v), k
    assert model.tokenizer is None  # the folder has no tokenizer files
    with torch.no_grad():
        assert model(IDS).shape == (2, 7, VOCAB)


def test_sharded_index_loads(tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DREAM_OFFICIAL))
    tensors = _official_tensors("dream")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_dllm(folder)
    single = tmp_path / "single"
    _write_official(single, "dream", tensors)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), load_dllm(single)(IDS), rtol=0, atol=0)
    assert model.lm_head.weight.dtype == torch.bfloat16  # dtype=auto: the config's torch_dtype
    assert torch.equal(model.lm_head.weight, tensors["lm_head.weight"].bfloat16())


# ---- errors -------------------------------------------------------------------------------------
def test_missing_folder_names_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"model folder {missing} does not exist"):
        load_dllm(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_dllm(empty)
    (empty / "config.json").write_text(json.dumps(LLADA_OFFICIAL))
    with pytest.raises(ModelLoadError, match="holds no model.safetensors"):
        load_dllm(empty)


def test_missing_and_unexpected_tensors_are_listed(tmp_path: Path) -> None:
    tensors = _official_tensors("llada")
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    tensors["model.transformer.blocks.1.extra.weight"] = torch.zeros(2)
    _write_official(tmp_path / "bad", "llada", tensors)
    with pytest.raises(ModelLoadError) as err:
        load_dllm(tmp_path / "bad")
    msg = str(err.value)
    assert "weights do not match the llada layout" in msg
    assert "missing ['model.transformer.blocks.1.up_proj.weight']" in msg
    assert "unexpected ['model.transformer.blocks.1.extra.weight']" in msg


def test_wrong_family_tensors_fail(tmp_path: Path) -> None:
    _write_official(tmp_path / "mixed", "llada", _official_tensors("dream"))
    with pytest.raises(ModelLoadError, match=r"missing \['model.transformer.blocks.0.attn_norm.weight'"):
        load_dllm(tmp_path / "mixed")


REMOTE_CONFIG = '''from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "toy_dllm"

    def __init__(self, vocab_size=128, hidden_size=8, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''
REMOTE_MODEL = '''from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_toy import ToyConfig


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return MaskedLMOutput(logits=self.head(self.emb(input_ids)))
'''


def _remote_folder(folder: Path, char_tokenizer) -> dict[str, torch.Tensor]:
    folder.mkdir()
    (folder / "configuration_toy.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_toy.py").write_text(REMOTE_MODEL)
    cfg = {"model_type": "toy_dllm", "architectures": ["ToyModel"], "vocab_size": VOCAB, "hidden_size": 8,
           "mask_token_id": 2, "shift_logits": True,
           "auto_map": {"AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    tensors = {"emb.weight": torch.randn(VOCAB, 8, generator=g), "head.weight": torch.randn(VOCAB, 8, generator=g)}
    save_file(tensors, str(folder / "model.safetensors"))
    char_tokenizer.save_pretrained(str(folder))
    return tensors


def test_remote_code_needs_trust(tmp_path: Path, char_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    tensors = _remote_folder(tmp_path / "remote", char_tokenizer)
    with pytest.raises(ModelLoadError, match=r"ships its own modeling code .*model\.trust_remote_code=true"):
        load_dllm(tmp_path / "remote")
    model = load_dllm(tmp_path / "remote", trust_remote_code=True)
    assert model.mask_id == 2
    with torch.no_grad():
        logits = model(IDS)
    raw = tensors["emb.weight"][IDS] @ tensors["head.weight"].T
    # the config asks for Dream-style shifted logits: position i comes from i - 1, position 0 from itself
    torch.testing.assert_close(logits[:, 1:], raw[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 0], raw[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="no block interface"):
        _ = model.blocks


def test_unknown_dtype(tmp_path: Path) -> None:
    save_dllm(make_tiny("llada"), tmp_path / "m")
    with pytest.raises(ModelLoadError, match="model.dtype=float64 unknown; valid: auto, float32, fp32, bfloat16"):
        load_dllm(tmp_path / "m", dtype="float64")


def test_unknown_model_type_without_auto_map(tmp_path: Path) -> None:
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not an LLaDA or Dream model"):
        load_dllm(folder)


def test_quantized_folder_of_an_unknown_layout_is_refused(tmp_path: Path) -> None:
    """A quantization_config fair-calib did not write (e.g. AutoGPTQ's) is a one-line error naming the layouts."""
    save_dllm(make_tiny("llada"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"quant_method 'gptq' is not a layout fair-calib reads \(valid: "
                                             r"compressed-tensors, fair_calib\)"):
        load_dllm(tmp_path / "m")


def test_save_refuses_nan_and_leaves_nothing_behind(tmp_path: Path) -> None:
    model = make_tiny("llada")
    with torch.no_grad():
        model.blocks[1].role("down").weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite weights in model\.transformer\.blocks\.1\.ff_out\.weight"):
        save_dllm(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # an existing good folder survives a failed overwrite
    good = make_tiny("llada", seed=4)
    save_dllm(good, tmp_path / "out")
    with pytest.raises(ValueError):
        save_dllm(model, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    torch.testing.assert_close(load_dllm(tmp_path / "out").output_layer.weight, good.output_layer.weight)


# ---- the shipped tiny checkpoints --------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_shipped_tiny_checkpoint(name: str) -> None:
    """The shipped models load through the 8B code path, have the documented layout, and learned the task."""
    from fair_calib.data.tinyreason import examples
    from fair_calib.models.hf_folder import ASSETS

    if not (ASSETS / name / "config.json").is_file():
        pytest.skip(f"fair_calib/assets/{name} is not shipped yet (trained by fair_calib.train.tiny)")
    model = load_dllm(ASSETS / name)
    cfg, tok = model.config, model.tokenizer
    assert cfg.family == name.split("-")[1]
    assert tok is not None and tok.mask_token_id == cfg.mask_id and tok.eos_token_id == cfg.eos_id
    if cfg.family == "dream":
        assert cfg.shift_logits and cfg.qkv_bias and cfg.n_kv_heads < cfg.n_heads
    else:
        assert not cfg.shift_logits and not cfg.qkv_bias
    # all answer tokens masked at once: a trained model beats the uniform guess log(V) by a wide margin
    exs = examples("addition", "test", 8, seed=0)
    rows, answer_pos = [], []
    for e in exs:
        p, a = tok.encode(e.prompt, add_special_tokens=False), tok.encode(e.answer, add_special_tokens=False)
        rows.append(p + a)
        answer_pos.append(range(len(p), len(p) + len(a)))
    ids = torch.tensor(rows)  # every addition example has the same length (zero-padded operands)
    masked = ids.clone()
    for r, pos in enumerate(answer_pos):
        masked[r, list(pos)] = cfg.mask_id
    with torch.no_grad():
        logp = model(masked).log_softmax(-1)
    nll = torch.stack([-logp[r, list(pos)].gather(-1, ids[r, list(pos)][:, None]).mean()
                       for r, pos in enumerate(answer_pos)]).mean()
    assert nll < 0.5 * math.log(cfg.vocab_size)


# ---- the `model=` registry entry ----------------------------------------------------------------
def test_model_registry_entry(tmp_path: Path) -> None:
    model: DiffusionLM = make_tiny("dream")
    save_dllm(model, tmp_path / "m")
    spec = build("model", {"name": "dllm", "path": str(tmp_path / "m"), "dtype": "float32"})
    assert spec.label == "m" and spec.model_type == "Dream"
    with torch.no_grad():
        torch.testing.assert_close(spec.load()(IDS), model(IDS), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="model folder .*nowhere does not exist"):
        build("model", {"name": "dllm", "path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="model.family=llada but"):
        build("model", {"name": "dllm", "path": str(tmp_path / "m"), "family": "llada"})
