"""Calibration sets for Stage II: teacher-forced full sequences plus where each answer starts.

Every builder returns a `CalibrationSet`. `answer_offset[n, i]` is the position of token i measured
from the first answer token of row n (0 = first answer token), -1 on prompt tokens and padding;
the weighting turns these offsets into per-token loss weights (DESIGN section 3).

    data=tinyreason   prompt + reference answer + end-of-text padding to a common length, as the
                      tiny models were trained (the padding is attended and belongs to the answer)
    data=text         a local .txt / .jsonl corpus cut into seeded random windows of seq_len tokens
                      (the whole window is "answer": offset = position in the window)

Builders take the tokenizer as a keyword argument at build time:
`build("data", cfg.data, tokenizer=model.tokenizer)`. They return the teacher-forced rows; the `data.masking*`
keys (checked here too) are applied by `fair_calib.data.masking` once the teacher is loaded, after Stage I.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fair_calib.data.tinyreason import SPLITS, TASKS, examples
from fair_calib.registry import ConfigError, register


@dataclass
class CalibrationSet:
    """N teacher-forced sequences of length L: ids, attention mask (1 = real token), answer offsets, prompts."""

    input_ids: Tensor  # (N, L) long
    attention_mask: Tensor  # (N, L) long, 1 = real token
    answer_offset: Tensor  # (N, L) long, position - answer start on answer tokens, -1 elsewhere
    prompts: list[str]  # the prompt text of each row (what Stage I probes the teacher with)
    masked: Tensor | None = None  # (N, L) bool, True where the input token was replaced by the mask id; None = none

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.numel() == 0:
            raise ConfigError(f"calibration set is empty or not (N, L): input_ids shape {tuple(self.input_ids.shape)}")
        shape = self.input_ids.shape
        for name in ("attention_mask", "answer_offset"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"calibration {name} shape {tuple(getattr(self, name).shape)} != ids {tuple(shape)}")
        if self.masked is not None and (self.masked.shape != shape or self.masked.dtype != torch.bool):
            raise ValueError(f"calibration masked must be a bool tensor of shape {tuple(shape)}, "
                             f"got {self.masked.dtype} {tuple(self.masked.shape)}")
        if len(self.prompts) != shape[0]:
            raise ValueError(f"calibration set has {shape[0]} rows but {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def mask_status(self) -> Tensor:
        """(N, L) bool: which inputs are the mask token (all False for unmasked, teacher-forced rows)."""
        return self.masked if self.masked is not None else torch.zeros(self.input_ids.shape, dtype=torch.bool)

    def subset(self, index: Sequence[int] | Tensor | slice) -> CalibrationSet:
        """Rows `index` (e.g. a quick run on the first few sequences)."""
        rows = range(len(self))[index] if isinstance(index, slice) else [int(i) for i in index]
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return CalibrationSet(self.input_ids[idx], self.attention_mask[idx], self.answer_offset[idx],
                              [self.prompts[i] for i in idx.tolist()],
                              None if self.masked is None else self.masked[idx])


def _check_tokenizer(tokenizer: Any, builder: str) -> None:
    if tokenizer is None:
        raise ConfigError(f"data={builder} needs the model's tokenizer: call build('data', cfg, tokenizer=tok)")


def _check_masking_keys(builder: str, keys: dict[str, Any]) -> None:
    """The builder's extra keys may only be the masking keys (valid values); they do not change the rows built here."""
    from fair_calib.data.masking import split_masking_keys  # the masking module builds on CalibrationSet

    split_masking_keys(builder, keys)


def _check_count(key: str, value: Any, least: int) -> None:
    """A count from the config (data.n_samples, data.seq_len) is an integer >= `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"data.{key}={value!r}: must be an integer >= {least}, e.g. data.{key}={max(least, 8)}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def pack_prompt_answer(tokenizer: Any, pairs: Sequence[tuple[str, str]], seq_len: int | None = None,
                       min_eos: int = 1, eos_in_answer: bool = True) -> CalibrationSet:
    """Rows of prompt + answer + end-of-text padding (eos id) to a common length, as in LLaDA SFT training.

    The common length is the longest prompt + answer plus `min_eos` end-of-text tokens, or `seq_len`
    when given (rows that do not fit raise ConfigError). The padding is attended (attention_mask 1) like
    in training; with `eos_in_answer` it counts as answer positions (the generation window the prior
    covers), otherwise it gets offset -1.
    """
    if not pairs:
        raise ConfigError("calibration set is empty: set data.n_samples >= 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token: data=tinyreason pads answers with end-of-text")
    enc = [(_encode(tokenizer, p), _encode(tokenizer, a)) for p, a in pairs]
    longest = max(len(p) + len(a) for p, a in enc)
    length = longest + min_eos if seq_len is None else int(seq_len)
    if length < longest + min_eos:
        raise ConfigError(f"data.seq_len={seq_len} is shorter than the longest prompt + answer + {min_eos} eos "
                          f"({longest + min_eos} tokens): raise data.seq_len or set it to null")
    n = len(enc)
    ids = torch.full((n, length), int(eos), dtype=torch.long)
    offset = torch.full((n, length), -1, dtype=torch.long)
    for r, (p, a) in enumerate(enc):
        ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[r, len(p): len(p) + len(a)] = torch.tensor(a, dtype=torch.long)
        end = length if eos_in_answer else len(p) + len(a)
        offset[r, len(p): end] = torch.arange(end - len(p))
    mask = torch.ones((n, length), dtype=torch.long)
    return CalibrationSet(ids, mask, offset, [p for p, _ in pairs])


@register("data", "tinyreason")
def tinyreason_calibration(tokenizer: Any = None, n_samples: int = 128, tasks: Sequence[str] = TASKS,
                           split: str = "calibration", seed: int = 0, seq_len: int | None = None,
                           min_eos: int = 1, eos_in_answer: bool = True, **masking: Any) -> CalibrationSet:
    """The tinyreason calibration split, tasks interleaved round-robin, each row prompt + reference answer + eos."""
    _check_masking_keys("tinyreason", masking)
    _check_tokenizer(tokenizer, "tinyreason")
    _check_count("n_samples", n_samples, 1)
    if seq_len is not None:
        _check_count("seq_len", seq_len, 2)
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ConfigError(f"data.tasks {tasks} invalid: choose from {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"data.split {split!r} unknown; valid: {', '.join(SPLITS)}")
    per_task = [n_samples // len(tasks) + (1 if i < n_samples % len(tasks) else 0) for i in range(len(tasks))]
    pools = {t: examples(t, split, k, seed) for t, k in zip(tasks, per_task) if k}
    rows = []
    for i in range(max(per_task)):  # round robin, so any prefix of the set mixes the tasks
        rows += [(pools[t][i].prompt, pools[t][i].answer) for t in tasks if t in pools and i < len(pools[t])]
    return pack_prompt_answer(tokenizer, rows, seq_len, min_eos, eos_in_answer)


def _read_text(p: Path) -> str:
    """The file as UTF-8 text; a binary or otherwise encoded file is one ConfigError naming it."""
    hint = "point data.path at a UTF-8 .txt or .jsonl corpus (re-encode it with iconv -t UTF-8 if needed)"
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.path {str(p)!r} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}): {hint}") from err
    except OSError as err:
        raise ConfigError(f"data.path {str(p)!r} cannot be read ({err.strerror or err}): {hint}") from err
    if "\x00" in text:
        raise ConfigError(f"data.path {str(p)!r} holds NUL bytes, so it is a binary file, not text: {hint}")
    return text


def read_corpus(path: str | Path, text_field: str = "text", max_chars: int | None = None) -> str:
    """A .txt file as is, or the `text_field` of every .jsonl line joined by blank lines.

    Refused with one line: a missing, binary or non-UTF-8 file, an empty one, a .jsonl line that is not a JSON
    object or whose `text_field` is missing, null or not a string (named by line number), no non-blank text.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"data.path {str(p)!r} does not exist: point data.path at a local .txt or .jsonl file")
    raw = _read_text(p)
    if p.suffix == ".jsonl":
        parts = []
        for num, line in enumerate(raw.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{p}:{num} is not valid JSON ({err.msg})") from err
            if not isinstance(rec, dict):
                raise ConfigError(f"{p}:{num} is a JSON {type(rec).__name__}, not an object with a {text_field!r} "
                                  "field: write one {\"text\": ...} object per line")
            if rec.get(text_field) is None:
                what = "no" if text_field not in rec else "a null"
                raise ConfigError(f"{p}:{num} has {what} {text_field!r} field: give every line a string "
                                  f"{text_field!r}, or set data.text_field to the field that holds the text")
            if not isinstance(rec[text_field], str):
                raise ConfigError(f"{p}:{num}: field {text_field!r} is a {type(rec[text_field]).__name__}, not a "
                                  "string: set data.text_field to the field that holds the text")
            parts.append(rec[text_field])
        text = "\n\n".join(parts)
    else:
        text = raw
    if not text.strip():
        what = "is empty" if not raw.strip() else f"has no non-blank {text_field!r} text"
        raise ConfigError(f"data.path {str(p)!r} {what}: point data.path at a corpus with text in it")
    return text[:max_chars] if max_chars else text


@register("data", "text")
def text_calibration(tokenizer: Any = None, path: str | None = None, n_samples: int = 128, seq_len: int = 2048,
                     seed: int = 0, text_field: str = "text", prompt_len: int = 64,
                     max_chars: int | None = None, **masking: Any) -> CalibrationSet:
    """`n_samples` random windows of `seq_len` tokens from a tokenized local corpus (GPTQ-style calibration).

    The whole window is answer (offset = position in the window); `prompts` are the decoded first
    `prompt_len` tokens of each window, for the Stage I probe.
    """
    _check_masking_keys("text", masking)
    _check_tokenizer(tokenizer, "text")
    if path is None:
        raise ConfigError("data=text needs data.path: a local .txt or .jsonl file")
    _check_count("n_samples", n_samples, 1)
    _check_count("seq_len", seq_len, 2)
    ids = torch.tensor(_encode(tokenizer, read_corpus(path, text_field, max_chars)), dtype=torch.long)
    if ids.numel() < seq_len:
        raise ConfigError(f"data.path {path} has {ids.numel()} tokens, fewer than data.seq_len={seq_len}: "
                          "lower data.seq_len or use a longer corpus")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seq_len) for _ in range(n_samples)]
    input_ids = torch.stack([ids[s: s + seq_len] for s in starts])
    offset = torch.arange(seq_len, dtype=torch.long).expand(n_samples, seq_len).clone()
    prompts = [tokenizer.decode(row[:prompt_len].tolist()) for row in input_ids]
    return CalibrationSet(input_ids, torch.ones_like(input_ids), offset, prompts)
