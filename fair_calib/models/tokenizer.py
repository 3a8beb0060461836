"""Character-level Hugging Face tokenizer for the shipped tiny models (built with `tokenizers`)."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOT, MASK, UNK = "<|pad|>", "<|eot|>", "<|mask|>", "<|unk|>"
SPECIALS = (PAD, EOT, MASK, UNK)
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """Specials get ids 0..3 (pad, eot, mask, unk), then one id per printable ASCII char and newline."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} characters needed")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own pre-token; decoding concatenates without spaces
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOT, mask_token=MASK, unk_token=UNK,
        model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    return tok
