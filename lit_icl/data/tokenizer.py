"""Tokenizers: the byte-level BPE tokenizer that text runs train with HF ``tokenizers``, and
reading a model's tokenizer wherever it is kept.

Training (:func:`train_bpe`), GPT-2 style: the ByteLevel pre-tokenizer maps every byte to a
visible symbol and splits words (a space attaches to the word after it), so any string
round-trips exactly through ``encode`` and ``decode``, and the alphabet is the 256 byte symbols
(always in the vocabulary) plus the special ``<|endoftext|>`` (id 0), which separates documents
in packed training text.

Reading (:func:`read_tokenizer`): a ``tokenizer.json``, a Hugging Face model directory holding
one, a named model of :mod:`lit_icl.sources` (``smollm2-135m``, fetched on first use), or a
Lightning checkpoint of a run whose TextDataModule saved its tokenizer in the checkpoint
(:func:`checkpoint_tokenizer` also finds a pretrained model's own tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_icl.files import atomic_path, load_checkpoint
from lit_icl.sources import SOURCES, model_directory

__all__ = ["CHECKPOINT_KEYS", "EOS", "MIN_VOCAB_SIZE", "checkpoint_tokenizer", "read_tokenizer", "save_tokenizer",
           "tokenizer_file", "tokenizer_sha", "train_bpe"]

EOS = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS
CHECKPOINT_KEYS = ("TextDataModule", "StreamingTextDataModule")  # where Lightning keeps their state_dict()


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(tokenizer.to_str(pretty=True))


def tokenizer_file(spec: str) -> str:
    """The tokenizer file ``spec`` names: a named model's ``tokenizer.json`` (fetched on first
    use), a directory's ``tokenizer.json``, or the file itself (``tokenizer.json`` or ``.ckpt``)."""
    path = model_directory(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer={spec!r}: {path} is not a file; give a tokenizer.json, a model directory "
                         f"holding one, a checkpoint or a named model {sorted(SOURCES)}")
    return path


def checkpoint_tokenizer(checkpoint: dict) -> Tokenizer | None:
    """The tokenizer a loaded checkpoint's run used: the one its TextDataModule (or
    StreamingTextDataModule) saved in it, else the pretrained model's own (``tokenizer.json``
    beside its weights), else None."""
    for key in CHECKPOINT_KEYS:
        state = checkpoint.get(key)
        if state and "tokenizer" in state:
            return Tokenizer.from_str(state["tokenizer"])
    pretrained = checkpoint.get("hyper_parameters", {}).get("pretrained")
    return Tokenizer.from_file(tokenizer_file(pretrained)) if pretrained else None


def read_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` names: a ``tokenizer.json``, a model directory holding one, a named
    model, or a checkpoint (``.ckpt``, loaded without running pickled code) that carries one."""
    path = tokenizer_file(spec)
    if not path.endswith(".ckpt"):
        return Tokenizer.from_file(path)
    tokenizer = checkpoint_tokenizer(load_checkpoint(path))
    if tokenizer is None:
        raise ValueError(f"checkpoint {path!r} holds no data module tokenizer ({' or '.join(CHECKPOINT_KEYS)}) and names no pretrained model")
    return tokenizer
