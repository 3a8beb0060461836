"""Shared fixtures: tiny random LLaDA- and Dream-layout models with the char tokenizer, one CPU thread, fixed seeds."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

# tests build datasets from local mirrors under names like `openai/gsm8k`: keep them out of the user's HF
# datasets cache (a stale cached copy would shadow the next run's files); set before `datasets` is imported
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="fair_calib_test_hf_datasets_")

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fair_calib.models.config import DLLMConfig
from fair_calib.models.dllm import DiffusionLM, build_model
from fair_calib.models.tokenizer import build_char_tokenizer

torch.set_num_threads(1)

# char tokenizer ids: pad 0, eot 1, mask 2, unk 3, then one id per character
PAD_ID, EOT_ID, MASK_ID = 0, 1, 2
VOCAB = 128


def tiny_config(family: str, **overrides) -> DLLMConfig:
    """A 2-layer, 32-wide config of `family` (Dream: GQA 4 query / 2 KV heads with q/k/v biases)."""
    kw = dict(
        family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
        n_kv_heads=4 if family == "llada" else 2, intermediate_size=64, mask_id=MASK_ID, eos_id=EOT_ID,
        pad_id=PAD_ID, rope_theta=10000.0, norm_eps=1e-5 if family == "llada" else 1e-6,
        qkv_bias=family == "dream",
    )
    kw.update(overrides)
    return DLLMConfig(**kw)


def random_calib(n: int = 8, length: int = 24, vocab: int | None = None):
    """n random calibration rows of `length` ids (half of them end in 4 padding positions): input_ids and
    attention_mask, the two fields the layer-wise engine reads."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB if vocab is None else vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, -4:] = 0
    ids[mask == 0] = 0
    return SimpleNamespace(input_ids=ids, attention_mask=mask)


def make_tiny(family: str, seed: int = 0, **overrides) -> DiffusionLM:
    """Random tiny model with non-trivial norm weights and biases (so every parameter matters in a test)."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(family, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_f." in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.tokenizer = build_char_tokenizer(VOCAB)
    return model.eval()


_THIS = sys.modules[__name__]  # this module object, captured before another conftest takes the name


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Keep `from conftest import make_tiny` pointing at this file.

    pytest imports every conftest.py outside a package as the module `conftest`, so loading tests/kernels/conftest.py
    replaces this one in sys.modules; test modules of this folder are imported right after this hook.
    """
    if isinstance(collector, pytest.Module) and collector.path.parent == Path(__file__).parent:
        sys.modules["conftest"] = _THIS


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(VOCAB)


@pytest.fixture
def tiny_llada() -> DiffusionLM:
    return make_tiny("llada")


@pytest.fixture
def tiny_dream() -> DiffusionLM:
    return make_tiny("dream")


@pytest.fixture(params=["llada", "dream"])
def tiny_model(request: pytest.FixtureRequest) -> DiffusionLM:
    return make_tiny(request.param)
