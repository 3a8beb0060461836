"""Calibration sets: tinyreason packing (prompt + answer + eos, offsets) and random text windows."""

from __future__ import annotations

import json

import pytest
import torch

from fair_calib.data.calibration import CalibrationSet, pack_prompt_answer, text_calibration, tinyreason_calibration
from fair_calib.data.tinyreason import examples
from fair_calib.registry import ConfigError, build

EOT = 1


def test_pack_prompt_answer_layout_by_hand(char_tokenizer):
    """'1+2=' + '3' with 2 eos after the longest row: offsets -1 on the prompt, 0.. from the answer on."""
    cs = pack_prompt_answer(char_tokenizer, [("1+2=", "3"), ("10+20=", "30")], min_eos=2)
    assert cs.input_ids.shape == (2, 10)  # longest 6 + 2 chars, + 2 eos
    assert char_tokenizer.decode(cs.input_ids[0, :5].tolist()) == "1+2=3"
    assert cs.input_ids[0, 5:].tolist() == [EOT] * 5
    assert cs.input_ids[1, 8:].tolist() == [EOT] * 2
    assert cs.answer_offset[0].tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    assert cs.answer_offset[1].tolist() == [-1] * 6 + [0, 1, 2, 3]
    assert cs.attention_mask.sum().item() == 20  # eos padding is attended, as in training
    assert cs.prompts == ["1+2=", "10+20="]

    cs = pack_prompt_answer(char_tokenizer, [("1+2=", "3")], seq_len=8, eos_in_answer=False)
    assert cs.answer_offset[0].tolist() == [-1, -1, -1, -1, 0, -1, -1, -1]
    with pytest.raises(ConfigError, match="seq_len"):
        pack_prompt_answer(char_tokenizer, [("1+2=", "3")], seq_len=5)
    with pytest.raises(ConfigError, match="empty"):
        pack_prompt_answer(char_tokenizer, [])


def test_tinyreason_set_mixes_tasks_round_robin(char_tokenizer):
    cs = build("data", {"name": "tinyreason", "n_samples": 7, "seed": 0}, tokenizer=char_tokenizer)
    assert isinstance(cs, CalibrationSet) and len(cs) == 7
    add = examples("addition", "calibration", 3, 0)
    wp = examples("word_problems", "calibration", 2, 0)
    cmp = examples("compare", "calibration", 2, 0)
    assert cs.prompts == [add[0].prompt, wp[0].prompt, cmp[0].prompt, add[1].prompt, wp[1].prompt, cmp[1].prompt,
                          add[2].prompt]
    for r in range(7):
        start = int((cs.answer_offset[r] == 0).nonzero())
        n_prompt = len(char_tokenizer.encode(cs.prompts[r], add_special_tokens=False))
        assert start == n_prompt
        # offsets count up to the end (the eos padding belongs to the answer window)
        assert torch.equal(cs.answer_offset[r, start:], torch.arange(cs.seq_len - start))
        assert cs.input_ids[r, -1].item() == EOT
    again = tinyreason_calibration(char_tokenizer, n_samples=7, seed=0)
    assert torch.equal(again.input_ids, cs.input_ids)
    other = tinyreason_calibration(char_tokenizer, n_samples=7, seed=1)
    assert other.prompts != cs.prompts


@pytest.mark.parametrize("kwargs, match", [
    ({"n_samples": 0}, "n_samples"), ({"tasks": ["poetry"]}, "tasks"), ({"split": "dev"}, "split"),
])
def test_tinyreason_config_errors(char_tokenizer, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tinyreason_calibration(char_tokenizer, **kwargs)
    with pytest.raises(ConfigError, match="tokenizer"):
        tinyreason_calibration(None)


def test_text_windows_are_seeded_slices_of_the_corpus(char_tokenizer, tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(300))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    cs = build("data", {"name": "text", "path": str(path), "n_samples": 5, "seq_len": 16, "prompt_len": 4},
               tokenizer=char_tokenizer)
    assert cs.input_ids.shape == (5, 16)
    assert torch.equal(cs.answer_offset, torch.arange(16).expand(5, 16))
    assert int(cs.attention_mask.sum()) == 80
    for r in range(5):
        window = char_tokenizer.decode(cs.input_ids[r].tolist())
        assert window in text and cs.prompts[r] == window[:4]
    same = text_calibration(char_tokenizer, str(path), n_samples=5, seq_len=16, prompt_len=4)
    assert torch.equal(same.input_ids, cs.input_ids)
    assert not torch.equal(text_calibration(char_tokenizer, str(path), 5, 16, seed=3).input_ids, cs.input_ids)


def test_text_jsonl_and_errors(char_tokenizer, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["abcdefgh", "ijklmnop"]) + "\n")
    cs = text_calibration(char_tokenizer, str(path), n_samples=3, seq_len=18)
    assert char_tokenizer.decode(cs.input_ids[0].tolist()) == "abcdefgh\n\nijklmnop"
    with pytest.raises(ConfigError, match="fewer than"):
        text_calibration(char_tokenizer, str(path), n_samples=1, seq_len=50)
    with pytest.raises(ConfigError, match="does not exist"):
        text_calibration(char_tokenizer, str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="field"):
        text_calibration(char_tokenizer, str(path), text_field="body", seq_len=4)
    with pytest.raises(ConfigError, match="path"):
        text_calibration(char_tokenizer, None)


def test_subset_keeps_rows(char_tokenizer):
    cs = tinyreason_calibration(char_tokenizer, n_samples=6)
    sub = cs.subset([4, 1])
    assert torch.equal(sub.input_ids, cs.input_ids[[4, 1]]) and sub.prompts == [cs.prompts[4], cs.prompts[1]]
    assert len(cs.subset(slice(0, 3))) == 3


def _rows(n: int = 3, length: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    ids = torch.arange(n * length).reshape(n, length)
    offset = torch.arange(length).expand(n, length) - 2
    return ids, torch.ones_like(ids), offset.clone(), [f"p{i}" for i in range(n)]


def test_masked_must_be_a_bool_tensor_of_the_ids_shape():
    ids, attn, offset, prompts = _rows()
    ok = CalibrationSet(ids, attn, offset, prompts, ids % 2 == 0)
    assert torch.equal(ok.mask_status(), ids % 2 == 0)
    assert not CalibrationSet(ids, attn, offset, prompts).mask_status().any()  # None = teacher-forced
    assert CalibrationSet(ids, attn, offset, prompts).mask_status().shape == ids.shape
    with pytest.raises(ValueError, match="masked must be a bool tensor of shape \\(3, 5\\), got torch.int64"):
        CalibrationSet(ids, attn, offset, prompts, (ids % 2 == 0).long())
    with pytest.raises(ValueError, match="masked must be a bool tensor of shape \\(3, 5\\).*\\(3, 4\\)"):
        CalibrationSet(ids, attn, offset, prompts, torch.zeros(3, 4, dtype=torch.bool))


def test_subset_keeps_the_mask_status_of_its_rows():
    ids, attn, offset, prompts = _rows(4)
    masked = torch.zeros(ids.shape, dtype=torch.bool)
    masked[1, 3] = masked[3, 2] = True
    cs = CalibrationSet(ids, attn, offset, prompts, masked)
    sub = cs.subset([3, 1])
    assert torch.equal(sub.masked, masked[[3, 1]]) and sub.prompts == ["p3", "p1"]
    assert torch.equal(sub.input_ids, ids[[3, 1]]) and torch.equal(sub.answer_offset, offset[[3, 1]])
    assert torch.equal(cs.subset(slice(1, 3)).masked, masked[1:3])
    assert CalibrationSet(ids, attn, offset, prompts).subset([0]).masked is None


def test_builders_take_the_masking_keys_and_refuse_others(char_tokenizer, tmp_path):
    """The data config carries data.masking*; the builders accept (and check) them and return teacher-forced rows."""
    keys = {"masking": "mcs", "mask_copies": 2, "mask_eps": 0.01, "tmas_batch_size": 4}
    plain = build("data", {"name": "tinyreason", "n_samples": 4, "seed": 0}, tokenizer=char_tokenizer)
    cs = build("data", {"name": "tinyreason", "n_samples": 4, "seed": 0, **keys}, tokenizer=char_tokenizer)
    assert torch.equal(cs.input_ids, plain.input_ids) and cs.masked is None
    path = tmp_path / "c.txt"
    path.write_text("abcdefghij" * 20)
    assert build("data", {"name": "text", "path": str(path), "n_samples": 2, "seq_len": 8, **keys},
                 tokenizer=char_tokenizer).masked is None
    with pytest.raises(ConfigError, match="data=tinyreason: unknown key\\(s\\) mask_rate; the masking keys are"):
        build("data", {"name": "tinyreason", "mask_rate": 0.5}, tokenizer=char_tokenizer)
    with pytest.raises(ConfigError, match="data.mask_copies=0"):
        build("data", {"name": "text", "path": str(path), "mask_copies": 0}, tokenizer=char_tokenizer)
