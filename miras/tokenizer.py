"""Tokenizers: a byte-level one that needs no download, and AutoTokenizer for anything else."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BYTE_TOKENIZER = "byte"
END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"


class TokenizerError(ValueError):
    """A tokenizer name or path that cannot be loaded (offline, misspelled, missing files)."""


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2's byte-to-unicode alphabet), <|endoftext|> (id 256, also BOS) and <|pad|> (257).

    Built from `tokenizers` in memory, saved with a checkpoint like any other tokenizer, and
    reloaded offline by AutoTokenizer. Padding is on the left, as generation of a batch needs; the pad
    token is its own, so a padded batch never reads as end-of-text. (Checkpoints saved before <|pad|>
    existed keep their 257-token tokenizer, pad = end-of-text, and their vocabulary size.)
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    vocab[END_OF_TEXT] = len(vocab)
    vocab[PAD] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([END_OF_TEXT, PAD])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, pad_token=PAD, padding_side="left"
    )


def prepare_for_checkpoints(tokenizer: PreTrainedTokenizerBase, seq_len: int) -> PreTrainedTokenizerBase:
    """What a checkpoint's tokenizer says: left padding (generation continues from the last token of each row)
    and model_max_length = the training window, not transformers' 1e30 placeholder (lm-eval and pipelines
    size their windows by it; the recurrent model itself has no hard limit)."""
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = seq_len
    return tokenizer


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+n."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(char)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`byte` for the built-in byte tokenizer, else a hub name or local path through AutoTokenizer."""
    if name == BYTE_TOKENIZER:
        return byte_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as error:  # transformers raises OSError, ValueError or hub errors depending on the miss
        where = "path" if Path(name).exists() else "name"
        raise TokenizerError(
            f"--tokenizer {name!r}: cannot load this tokenizer {where} ({type(error).__name__}); "
            f"offline, use --tokenizer {BYTE_TOKENIZER} or a local folder saved with save_pretrained"
        ) from None
    if tokenizer.eos_token_id is None:
        raise TokenizerError(f"--tokenizer {name!r} has no end-of-text token: documents could not be separated")
    return tokenizer
