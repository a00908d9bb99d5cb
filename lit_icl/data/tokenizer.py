"""The byte-level BPE tokenizer of text runs, trained with HF ``tokenizers``.

GPT-2 style: the ByteLevel pre-tokenizer maps every byte to a visible symbol and splits words
(a space attaches to the word after it), so any string round-trips exactly through ``encode`` and
``decode``, and the alphabet is the 256 byte symbols (always in the vocabulary) plus the special
``<|endoftext|>`` (id 0), which separates documents in packed training text.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["EOS", "MIN_VOCAB_SIZE", "save_tokenizer", "tokenizer_sha", "train_bpe"]

EOS = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS


def train_bpe(texts: Iterable[str] | Iterator[list[str]], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` (strings or batches of strings).

    Args:
        texts: the training text, e.g. batches of a dataset's text column.
        vocab_size: the largest vocabulary (bytes + EOS + merges), ``>= MIN_VOCAB_SIZE``; a small
            corpus may end with fewer merges.
        min_frequency: least count of a pair to be merged.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} must be >= {MIN_VOCAB_SIZE} (256 byte symbols + {EOS})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def tokenizer_sha(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's JSON: equal hashes, equal tokenization."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
    """Write ``tokenizer`` as JSON to ``path`` atomically (a temporary file, then a rename), so a
    concurrent reader sees either no file or the whole file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        f.write(tokenizer.to_str(pretty=True))
    os.replace(f.name, path)
