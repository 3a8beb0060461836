"""DiffusionEvalLM: Monte Carlo likelihood, seeding, stop strings, the sampler-fitting rule, lm-eval registration."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import EOT_ID, MASK_ID, PAD_ID, VOCAB, make_tiny, tiny_config
from lm_eval.api.instance import Instance
from torch import nn

from fair_calib.benchmark.families import family_defaults, resolve_cfg_scale
from fair_calib.benchmark.lm import (
    DiffusionEvalLM,
    mc_loglikelihood,
    random_masks,
    request_seed,
    stratified_mask_counts,
    truncate_at_stop,
)
from fair_calib.decoding.dream import DreamSampler
from fair_calib.decoding.llada import LLaDASampler
from fair_calib.models.dllm import DiffusionLM
from fair_calib.models.tokenizer import build_char_tokenizer
from fair_calib.registry import ConfigError


class TableLM(DiffusionLM):
    """Input-independent logits: position t gets `table[t]` (`table[-1]` beyond it); exact probabilities known."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__(tiny_config("llada"))
        self.table = table
        self.wte = nn.Embedding(VOCAB, 4)
        self.tokenizer = build_char_tokenizer(VOCAB)
        self.seen: list[torch.Tensor] = []

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.wte

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(ids.clone())
        rows = [self.table[min(t, len(self.table) - 1)] for t in range(ids.shape[1])]
        return torch.stack(rows)[None].expand(ids.shape[0], -1, -1).clone()


class ScriptedLM(TableLM):
    """Predicts `script[t - prompt_len]` at answer position t (end-of-text after it) with near-certainty."""

    def __init__(self, script: str, prompt_len: int) -> None:
        super().__init__(torch.zeros(1, VOCAB))
        self.script = self.tokenizer.encode(script, add_special_tokens=False)
        self.prompt_len = prompt_len

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.full((*ids.shape, VOCAB), -20.0)
        for t in range(ids.shape[1]):
            j = t - self.prompt_len
            logits[:, t, self.script[j] if 0 <= j < len(self.script) else EOT_ID] = 20.0
        return logits


def ll_request(context: str, continuation: str, idx: int = 0) -> Instance:
    return Instance("loglikelihood", {}, (context, continuation), idx)


def gen_request(context: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def ids(text: str) -> list[int]:
    return build_char_tokenizer(VOCAB).encode(text, add_special_tokens=False)


# ---- Monte Carlo estimator -------------------------------------------------------------------------
def test_mc_never_masks_the_context():
    model = make_tiny("llada")
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    ctx, cont = ids("Which is larger: 047 or 052?\nAnswer:"), ids(" 052")
    mc_loglikelihood(model, ctx, cont, mc_num=12, mc_batch_size=5, generator=torch.Generator().manual_seed(0))
    x = torch.cat(seen)
    assert all(len(s) <= 5 for s in seen) and len(x) <= 12
    assert len(torch.unique(x, dim=0)) == len(x)  # duplicate masked sequences are run once
    p = len(ctx)
    assert torch.equal(x[:, :p], torch.tensor(ctx).expand(len(x), -1))  # context untouched in every sequence
    masked = x[:, p:] == MASK_ID
    assert (masked.sum(1) >= 1).all()  # every sample masks at least one continuation token
    assert torch.equal(x[:, p:][~masked], torch.tensor(cont).expand(len(x), -1)[~masked])


def test_deduplicated_estimate_equals_the_per_sample_average():
    model = make_tiny("dream")
    ctx, cont = ids("1+2="), ids("0003")
    est = mc_loglikelihood(model, ctx, cont, 16, 16, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # redraw the same masks, run every sample
    counts = stratified_mask_counts(4, 16, g)
    masks = random_masks(counts, 4, g)
    x = torch.tensor(ctx + cont).repeat(16, 1)
    x[:, len(ctx):][masks] = MASK_ID
    logp = torch.log_softmax(model(x)[:, len(ctx):], -1)
    logp = logp.gather(-1, torch.tensor(cont).expand(16, -1)[..., None])[..., 0]
    naive = ((logp * masks).sum(1) / (counts / 4)).mean().item()
    assert est == pytest.approx(naive, rel=1e-5)


def test_lm_loglikelihood_masks_only_the_continuation():
    model = TableLM(torch.randn(1, VOCAB))
    lm = DiffusionEvalLM(model, LLaDASampler(gen_length=8, steps=8, block_length=8), mc_num=6, mc_batch_size=6,
                         show_progress=False)
    lm.loglikelihood([ll_request("12+4= ", "16")])  # the trailing space moves to the continuation
    ctx = ids("12+4=")
    x = model.seen[0]
    assert len(model.seen) == 1 and x.shape[0] <= 6 and x.shape[1] == len(ctx) + 3  # " 16" is 3 tokens
    assert torch.equal(x[:, : len(ctx)], torch.tensor(ctx).expand(len(x), -1))
    assert (x[:, len(ctx):] == MASK_ID).any(1).all()


def test_stratified_counts_and_masks():
    # 12 samples over L = 3 tokens: counts 1, 2 and 3 exactly four times each
    counts = stratified_mask_counts(3, 12, torch.Generator().manual_seed(0))
    assert sorted(counts.tolist()) == [1] * 4 + [2] * 4 + [3] * 4
    g = torch.Generator().manual_seed(3)
    for length, n in [(1, 5), (4, 4), (7, 3), (10, 16)]:
        counts = stratified_mask_counts(length, n, g)
        assert counts.min() >= 1 and counts.max() <= length
        if n == length:
            assert sorted(counts.tolist()) == list(range(1, length + 1))
        masks = random_masks(counts, length, g)
        assert torch.equal(masks.sum(1), counts)
    # L = 10, n = 4, start k: offsets floor(j * 10 / 4) = 0, 2, 5, 7, wrapped into 1..10
    counts = stratified_mask_counts(10, 4, torch.Generator().manual_seed(0)).tolist()
    k = counts[0]
    assert counts == [(k - 1 + o) % 10 + 1 for o in (0, 2, 5, 7)]


def test_one_token_estimate_is_the_exact_log_probability():
    torch.manual_seed(1)
    table = torch.randn(1, VOCAB) * 3
    model = TableLM(table)
    ctx, cont = ids("7+5="), ids("2")
    exact = torch.log_softmax(table[0], -1)[cont[0]].item()
    for mc_num in (1, 4, 16):
        est = mc_loglikelihood(model, ctx, cont, mc_num, 4, torch.Generator().manual_seed(mc_num))
        assert est == pytest.approx(exact, abs=1e-5)  # mask ratio 1: CE / 1 in every sample


def test_equal_token_losses_make_every_sample_exact():
    # input-independent logits and a continuation of one repeated token: each sample gives (L / m) * m * CE
    table = torch.randn(1, VOCAB)
    model = TableLM(table)
    cont = ids("5555")
    exact = 4 * torch.log_softmax(table[0], -1)[cont[0]].item()
    est = mc_loglikelihood(model, ids("x="), cont, 8, 8, torch.Generator().manual_seed(0))
    assert est == pytest.approx(exact, rel=1e-5)


def test_estimator_is_unbiased_for_a_factorized_model():
    # position-dependent, input-independent logits: E[sum_masked CE * L / m] = sum_i CE_i
    torch.manual_seed(2)
    table = torch.randn(8, VOCAB) * 2
    model = TableLM(table)
    ctx, cont = ids("ab"), ids("cdef")
    logp = torch.log_softmax(table, -1)
    exact = sum(logp[len(ctx) + i, t].item() for i, t in enumerate(cont))
    est = mc_loglikelihood(model, ctx, cont, 4000, 4000, torch.Generator().manual_seed(0))
    assert est == pytest.approx(exact, rel=0.02)


def test_same_seed_same_number_and_batch_size_invariance():
    model = make_tiny("dream")
    sampler = DreamSampler(gen_length=8, steps=8)
    reqs = [ll_request("Which is smaller: 3 or 9?\nAnswer:", " 3", 0), ll_request("1+1=", "2", 1)]

    def run(seed: int, mc_batch_size: int = 16, order=(0, 1)) -> list[float]:
        lm = DiffusionEvalLM(model, sampler, seed=seed, mc_num=16, mc_batch_size=mc_batch_size, show_progress=False)
        out = lm.loglikelihood([reqs[i] for i in order])
        return [out[order.index(i)][0] for i in range(2)]

    a, b = run(0), run(0)
    assert a == b
    assert run(0, mc_batch_size=3) == pytest.approx(a, rel=1e-5)  # masks drawn up front: batching is compute only
    assert run(0, order=(1, 0)) == a  # per-request seeds: independent of request order
    assert run(1) != a
    assert all(math.isfinite(v) and v < 0 for v in a)


def test_is_greedy_only_when_asked_and_reproduces_the_continuation():
    prompt = "7+9="
    model = ScriptedLM("16", prompt_len=len(prompt))
    sampler = LLaDASampler(gen_length=8, steps=8, block_length=8)
    plain = DiffusionEvalLM(model, sampler, mc_num=2, show_progress=False)
    assert plain.loglikelihood([ll_request(prompt, "16")])[0][1] is False  # not computed unless asked
    lm = DiffusionEvalLM(model, sampler, mc_num=2, check_greedy=True, show_progress=False)
    out = lm.loglikelihood([ll_request(prompt, "16"), ll_request(prompt, "17"), ll_request(prompt, "1")])
    assert [greedy for _, greedy in out] == [True, False, True]
    assert out[0][0] == pytest.approx(0.0, abs=1e-6) and out[1][0] < -10  # scripted logits: p("16") ~ 1


def test_loglikelihood_rolling_is_the_estimator_over_the_whole_text():
    model = make_tiny("llada")
    sampler = LLaDASampler(gen_length=8, steps=8, block_length=8)
    text = "12+34=46\n#### 46"
    toks = ids(text)
    lm = DiffusionEvalLM(model, sampler, mc_num=8, seed=3, show_progress=False)
    (whole,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    g = torch.Generator().manual_seed(request_seed(3, [], toks))
    assert whole == pytest.approx(mc_loglikelihood(model, [], toks, 8, 16, g), rel=1e-6)
    assert whole < 0 and math.isfinite(whole)
    # longer than the window: windows of 6 tokens, each conditioned on the 4 tokens before it
    lm = DiffusionEvalLM(model, sampler, mc_num=8, seed=3, rolling_window=6, rolling_context=4, show_progress=False)
    (windowed,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    expected = sum(mc_loglikelihood(model, c, w, 8, 16, torch.Generator().manual_seed(request_seed(3, c, w)))
                   for c, w in [(toks[:0], toks[:6]), (toks[2:6], toks[6:12]), (toks[8:12], toks[12:])])
    assert windowed == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="exceeds max_length"):
        DiffusionEvalLM(model, sampler, rolling_window=4000, rolling_context=200, show_progress=False)


def test_family_defaults_pick_the_sampler_and_guidance(tmp_path):
    from fair_calib.models.loading import save_dllm

    save_dllm(make_tiny("dream"), tmp_path / "d")
    lm = DiffusionEvalLM(path=str(tmp_path / "d"), device="cpu", gen_length=8, steps=8, show_progress=False)
    assert isinstance(lm.sampler, DreamSampler) and lm.cfg_scale == 0.0  # no decoding= given: Dream's sampler
    assert lm.get_model_info()["mask_id"] == MASK_ID
    guided = DiffusionEvalLM(make_tiny("llada"), None, cfg_scale=0.5, decoding="llada", show_progress=False)
    assert guided.cfg_scale == 0.5 and guided.sampler.cfg_scale == 0.5  # one guidance scale for both request types
    with pytest.raises(ConfigError, match="mask id"):
        family_defaults(SimpleNamespace(config=tiny_config("llada", vocab_size=126464, mask_id=5)))
    assert family_defaults(SimpleNamespace(config=tiny_config("llada", vocab_size=126464, mask_id=126336))).mask_id \
        == 126336
    assert family_defaults(make_tiny("dream")).shift_logits is True
    assert resolve_cfg_scale({"llada": 0.5}, "llada") == 0.5 and resolve_cfg_scale({"llada": 0.5}, "dream") == 0.0
    assert resolve_cfg_scale(2.0, "dream") == 2.0 and resolve_cfg_scale(None, "llada") == 0.0


def test_chat_template_only_when_the_tokenizer_has_one():
    lm = DiffusionEvalLM(make_tiny("llada"), LLaDASampler(gen_length=8, steps=8, block_length=8),
                         show_progress=False)
    assert lm.chat_template(False) is None
    with pytest.raises(ConfigError, match="no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "1+2="}])
    lm.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                  "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        assert lm.apply_chat_template([{"role": "user", "content": "1+2="}]) == "<user>1+2=<assistant>"
        assert lm.chat_template(True) == lm.tokenizer.chat_template
    finally:
        lm.tokenizer.chat_template = None


def test_single_process_rank_and_gather_defaults():
    lm = DiffusionEvalLM(make_tiny("llada"), LLaDASampler(gen_length=8, steps=8, block_length=8),
                         show_progress=False)
    assert (lm.rank, lm.world_size) == (0, 1)
    t = torch.tensor(3)
    assert lm.all_gather(t) is t and lm.gather_object({"a": 1}) == [{"a": 1}]
    lm.barrier()


# ---- generation ------------------------------------------------------------------------------------
def test_truncate_at_stop():
    assert truncate_at_stop("12+4=16\n#### 16", ["\n"]) == "12+4=16"
    assert truncate_at_stop("ab|cd;ef", [";", "|"]) == "ab"  # earliest stop wins, whatever the list order
    assert truncate_at_stop("abc", "c") == "ab"
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("abc", None) == "abc"
    assert truncate_at_stop("abc", [""]) == "abc"


@pytest.mark.parametrize("sampler", [LLaDASampler(gen_length=64, steps=64, block_length=4), DreamSampler(64, 64)])
def test_generate_until_honours_until_and_max_gen_toks(sampler):
    prompt = "7+9="
    model = ScriptedLM("16\n#### 16", prompt_len=len(prompt))
    lm = DiffusionEvalLM(model, sampler, show_progress=False)
    out = lm.generate_until([
        gen_request(prompt, until=["\n"], max_gen_toks=12),
        gen_request(prompt, until=[], max_gen_toks=6),  # llada: canvas 8 (block 4), text cut to 6 tokens
        gen_request(prompt, until=["#"], max_gen_toks=12),
    ])
    assert out == ["16", "16\n###", "16\n"]


def test_generate_until_left_pads_batches_and_keeps_order():
    model = make_tiny("llada")
    sampler = LLaDASampler(gen_length=8, steps=8, block_length=8)
    lm = DiffusionEvalLM(model, sampler, batch_size=2, show_progress=False)
    prompts = ["1+1=", "123+456=", "9+9=", "77+1="]
    batched = lm.generate_until([gen_request(p, until=[], max_gen_toks=8) for p in prompts])
    alone = [lm.generate_until([gen_request(p, until=[], max_gen_toks=8)])[0] for p in prompts]
    assert batched == alone


def test_progress_bars_name_the_model_they_decode(capsys):
    """A run decodes FP, a baseline and the method one after another: each bar says which."""
    model = make_tiny("llada")
    lm = DiffusionEvalLM(model, LLaDASampler(gen_length=8, steps=8, block_length=8), batch_size=2, mc_num=2,
                         label="RTN W4A4")
    lm.generate_until([gen_request("1+1=", until=[], max_gen_toks=8)])
    lm.loglikelihood([ll_request("1+1=", "2")])
    err = capsys.readouterr().err
    assert "generate [RTN W4A4]" in err and "loglikelihood (MC) [RTN W4A4]" in err
    DiffusionEvalLM(model, LLaDASampler(gen_length=8, steps=8, block_length=8)).generate_until(
        [gen_request("1+1=", until=[], max_gen_toks=8)])
    assert "generate:" in capsys.readouterr().err  # no label: the bar as before


def test_sampler_fitted_rule():
    llada = LLaDASampler(gen_length=64, steps=64, block_length=32)
    for want, (g, steps, block) in {8: (8, 8, 8), 32: (32, 32, 32), 100: (128, 128, 32), 256: (256, 256, 32)}.items():
        s, got = llada.fitted(want)
        assert (got, s.gen_length, s.steps, s.block_length) == (g, g, steps, block)
    half = LLaDASampler(gen_length=64, steps=32, block_length=32)  # 2 tokens per step
    assert half.fitted(32)[0].steps == 16
    assert half.fitted(64)[0].steps == 32
    assert LLaDASampler(gen_length=64, steps=64, block_length=4).fitted(8)[0].block_length == 4
    dream, g = DreamSampler(gen_length=64, steps=32).fitted(8)
    assert (g, dream.gen_length, dream.steps) == (8, 8, 4)
    assert llada.gen_length == 64  # the configured sampler is not modified


# ---- lm-eval registration --------------------------------------------------------------------------
def test_registered_with_lm_eval_and_built_from_model_args(tmp_path):
    from lm_eval.api.registry import get_model

    from fair_calib.models.loading import save_dllm

    assert get_model("fair_calib") is DiffusionEvalLM
    save_dllm(make_tiny("llada"), tmp_path / "m")
    lm = DiffusionEvalLM.create_from_arg_string(
        f"path={tmp_path / 'm'},decoding=llada,gen_length=8,steps=8,block_length=8,mc_num=2,show_progress=false",
        {"batch_size": 4, "device": "cpu", "max_batch_size": None})
    assert isinstance(lm.sampler, LLaDASampler) and lm.sampler.steps == 8 and lm.batch_size == 4
    assert lm.model.config.pad_id == PAD_ID
    ll, greedy = lm.loglikelihood([ll_request("1+2=", "3")])[0]
    assert ll < 0 and greedy is False
