"""TextDataModule: a text corpus, a BPE tokenizer trained on it, packed next-token blocks.

Pipeline (every step cached under ``cache_dir/text/<key>/``, ``key`` a hash of the corpus, its
local files' sizes and modification times, the split and tokenizer settings):

1. ``load_source(corpus)`` (:mod:`lit_icl.data.load`): local text / JSONL / parquet files or a
   hub dataset, through ``datasets.load_dataset``. Validation is the corpus's ``val_split`` if it
   has one, else ``val_fraction`` of the training documents held out as ``val_by`` says: a seeded
   random choice of documents (``document``, the default), whole files (``file``: a seeded choice
   of the local files, e.g. whole works of ``shakespeare``) or the last documents in corpus order
   (``tail``: one contiguous span).
2. A byte-level BPE tokenizer (:mod:`lit_icl.data.tokenizer`) trained on the training split,
   once: ``tokenizer.json`` (or the one ``tokenizer_path`` names).
3. ``Dataset.map`` tokenizes every document and appends ``<|endoftext|>`` (``num_proc``
   processes), then packs the token stream into windows of ``block_size + 1`` tokens with stride
   ``block_size`` (consecutive windows share one token), so every next-token target of the
   stream is scored exactly once; a batch is ``dict(input_ids=w[:, :-1], labels=w[:, 1:])``.
   The tail of each map batch of 1000 documents shorter than a window is dropped.

Processes: ``prepare_data`` (local rank 0 of each node) builds everything, ``setup`` (every rank)
loads it; both hold a file lock on the cache entry while they build or load, so no two processes
write the same file, even across nodes sharing a file system. Every process then has the same
blocks. Training batches come from :class:`~lit_icl.data.batches.ResumableBatches`: shuffled per
epoch from ``(seed, epoch)``, each DDP rank its own strided share, and the position saved in every
checkpoint, so a run killed mid-epoch resumes at the next batch (validation batches come from a
plain DataLoader, which Lightning's DistributedSampler shards). The tokenizer is also written next
to the run (``<log_dir>/tokenizer.json``) and into every checkpoint (``state_dict``), and a
checkpoint can be given back as ``tokenizer_path`` (read by :mod:`lit_icl.data.tokenizer`). The
held-out episodes are the template tasks' (:class:`~lit_icl.data.templates.TemplateHeldout`).

Held-out documents for the text measures (``heldout_documents``, the protocol of
:mod:`lit_icl.text_icl`) are validation blocks of ``block_size + 1`` tokens, spread evenly over
the validation split. They measure in-context learning only if the validation text is contiguous
(a corpus's own validation split, ``val_by: file`` or ``tail``): with ``val_by: document`` a
block of a paragraph-per-document corpus holds unrelated paragraphs, and they are refused. A
block is contiguous text of one file, but for the rare block that straddles two held-out files.

Local text files are decoded with ``encoding``; an undecodable byte stops the run with one line
naming the file and the byte offset (``encoding_errors: strict``), or is replaced / dropped and
reported per file (``replace`` / ``ignore``), see :func:`lit_icl.data.load.check_encoding`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from datasets import DatasetDict, Features, Value
from datasets import Sequence as ListOf
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lit_icl.data.batches import ResumableBatches, next_token_batch
from lit_icl.data.load import load_source, local_files
from lit_icl.data.synthetic import check_at_least
from lit_icl.data.templates import TemplateHeldout, TemplateTask
from lit_icl.data.tokenizer import EOS, MIN_VOCAB_SIZE, read_tokenizer, save_tokenizer, tokenizer_sha, train_bpe
from lit_icl.sources import default_cache_dir, named_path

__all__ = ["TextDataModule", "check_checkpoint_tokenizer", "pack", "save_run_tokenizer", "spread"]

VAL_BY = ("document", "file", "tail", "auto")
MAP_BATCH = 1000  # documents per Dataset.map batch (packing works within a batch)
CACHE_VERSION = 1  # part of every cache key: bump it when the pipeline's output changes


def pack(token_lists: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate ``token_lists`` and cut windows of ``block_size + 1`` tokens, stride
    ``block_size``; the tail shorter than a window is dropped."""
    flat = [t for ids in token_lists for t in ids]
    return [flat[i : i + block_size + 1] for i in range(0, len(flat) - block_size, block_size)]


def spread(count: int, num: int) -> np.ndarray:
    """Up to ``num`` indices of ``range(count)`` spread evenly from the first to the last (the
    held-out documents' picks)."""
    return np.unique(np.linspace(0, count - 1, min(num, count)).round().astype(int))


def save_run_tokenizer(trainer: pl.Trainer | None, tokenizer: Tokenizer) -> None:
    """Write ``tokenizer.json`` into the run's log directory (global rank 0; needs a logger)."""
    if trainer is not None and trainer.loggers:
        log_dir = trainer.log_dir  # on every rank: it is a collective call
        if trainer.is_global_zero and log_dir:
            save_tokenizer(tokenizer, os.path.join(log_dir, "tokenizer.json"))


def check_checkpoint_tokenizer(state: dict[str, Any], tokenizer: Tokenizer, owner: str, fix: str) -> None:
    """ValueError (naming ``owner`` and how to ``fix`` it) when a data module's checkpoint
    ``state`` holds another tokenizer than ``tokenizer`` (token ids would be misread)."""
    if tokenizer_sha(Tokenizer.from_str(state["tokenizer"])) != tokenizer_sha(tokenizer):
        raise ValueError(f"{owner}: the checkpoint was trained with another tokenizer than this run's; {fix}")


def _tokenize(batch: dict, tokenizer: Tokenizer, text_field: str, eos_id: int) -> dict:
    texts = [t for t in batch[text_field] if t and t.strip()]
    return {"ids": [e.ids + [eos_id] for e in tokenizer.encode_batch(texts)]}


def _pack(batch: dict, block_size: int) -> dict:
    return {"ids": pack(batch["ids"], block_size)}


def _blocks(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Blocks of ``block_size + 1`` tokens, as columns ``{"ids": [B, block_size + 1]}`` (from
    ResumableBatches) or as rows (from a DataLoader), as next-token pairs."""
    ids = batch["ids"] if isinstance(batch, dict) else torch.stack([row["ids"] for row in batch])
    return next_token_batch(ids)


class TextDataModule(TemplateHeldout, pl.LightningDataModule):
    """Language modelling on a text corpus, with template-based ICL episodes for evaluation.

    Args:
        corpus: required: a local text/JSONL/parquet file, glob or directory, or a hub dataset
            name (see :mod:`lit_icl.data.sources`). ``None`` raises ``ValueError``.
        corpus_config: the hub dataset's configuration (e.g. ``wikitext-103-raw-v1``).
        text_field: the column holding the text (``text`` for text files).
        train_split: the corpus split to train on.
        val_split: the corpus split to validate on, when the corpus has it.
        val_fraction: otherwise the fraction of training documents held out (seeded).
        block_size: tokens per training sequence (at most the model's ``block_size``).
        vocab_size: the model's vocabulary; the BPE tokenizer is trained up to this size.
        min_frequency: least count of a pair the BPE trainer merges.
        tokenizer_path: use this tokenizer instead of training one: a ``tokenizer.json`` or a
            checkpoint of a run with a TextDataModule.
        cache_dir: where the tokenizer, tokens and blocks are cached; ``None``: ``$LIT_ICL_CACHE``
            or ``~/.cache/lit_icl``.
        num_proc: processes of ``load_dataset`` and ``Dataset.map`` (``None``: one).
        batch_size: sequences per batch (per process under DDP).
        num_workers: worker processes that fetch batches.
        seed: seed of the validation split and of the per-epoch training order.
        val_by: without a ``val_split``, what ``val_fraction`` holds out: ``document`` (a seeded
            random choice of documents), ``file`` (a seeded choice of whole local files, at least
            one), ``tail`` (the last documents, one contiguous span) or ``auto`` (``file`` for a
            glob or named source of several files, else ``tail``); not ``document`` for the text
            measures, which need contiguous held-out text.
        encoding: of local text files.
        encoding_errors: ``strict`` (an undecodable byte stops with one line), ``replace``
            (decoded as U+FFFD) or ``ignore`` (dropped); replacements are reported per file.
        templates: template-based classification tasks for ``heldout_episodes``.
        num_heldout: default number of held-out episodes per task.
    """

    def __init__(
        self,
        corpus: str | None = None,
        corpus_config: str | None = None,
        text_field: str = "text",
        train_split: str = "train",
        val_split: str = "validation",
        val_fraction: float = 0.01,
        block_size: int = 256,
        vocab_size: int = 8192,
        min_frequency: int = 2,
        tokenizer_path: str | None = None,
        cache_dir: str | None = None,
        num_proc: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 1234,
        templates: Sequence[TemplateTask] = (),
        num_heldout: int = 256,
        val_by: str = "document",
        encoding: str = "utf-8",
        encoding_errors: str = "strict",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not corpus:
            raise ValueError(
                f"{owner}: corpus is required: pass --data.init_args.corpus with a text/JSONL/parquet file, "
                "glob or directory, or a hub dataset name"
            )
        local_files(corpus)  # a missing local file fails here, not after the model is built
        check_at_least(owner, [("block_size", block_size, 1), ("vocab_size", vocab_size, MIN_VOCAB_SIZE),
                               ("min_frequency", min_frequency, 1), ("batch_size", batch_size, 1),
                               ("num_workers", num_workers, 0), ("num_heldout", num_heldout, 1)])
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{owner}: val_fraction must be in (0, 1), got {val_fraction}")
        if val_by not in VAL_BY:
            raise ValueError(f"{owner}: val_by={val_by!r}; allowed: {', '.join(VAL_BY)}")
        if encoding_errors not in ("strict", "replace", "ignore"):
            raise ValueError(f"{owner}: encoding_errors={encoding_errors!r}; allowed: strict, replace, ignore")
        if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
            raise ValueError(f"{owner}: tokenizer_path {tokenizer_path!r} is not a file")
        self.cache_dir = cache_dir or default_cache_dir()
        self.save_hyperparameters(ignore=["templates"])
        self._set_tasks(templates, self.cache_dir)
        self.templates = self.tasks.tasks
        self.corpus, self.corpus_config, self.text_field = corpus, corpus_config, text_field
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.block_size, self._vocab_size, self.min_frequency = block_size, vocab_size, min_frequency
        self.tokenizer_path, self.num_proc, self.seed = tokenizer_path, num_proc, seed
        self.batch_size, self.num_workers, self.num_heldout = batch_size, num_workers, num_heldout
        self.val_by, self.encoding, self.encoding_errors = val_by, encoding, encoding_errors
        self.val_held = ""  # what the validation split is, said in the log and by heldout_documents
        self.built: list[str] = []  # what this process built rather than loaded from the cache
        self._tokenizer: Tokenizer | None = None
        self._blocks: dict[str, Any] = {}

    @property
    def vocab_size(self) -> int:
        """The configured vocabulary size (the tokenizer's is at most this)."""
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        """Tokens per training sequence: ``block_size``."""
        return self.block_size

    @property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer (built or loaded from the cache on first use)."""
        if self._tokenizer is None:
            self._build()
        return self._tokenizer


    def _key(self, given: Tokenizer | None) -> str:
        """The cache entry's name: a hash of everything the blocks depend on, but ``block_size``
        (which names the block files instead)."""
        files = local_files(self.corpus)
        spec = {
            "version": CACHE_VERSION,
            "corpus": self.corpus if files is None else None,
            "files": None if files is None else [
                (os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files],
            "tokenizer": tokenizer_sha(given) if given is not None else (self._vocab_size, self.min_frequency),
            **{n: getattr(self, n) for n in ("corpus_config", "text_field", "train_split", "val_split",
                                             "val_fraction", "seed", "val_by", "encoding", "encoding_errors")},
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _val_mode(self, files: list[str] | None) -> str:
        """``val_by`` with ``auto`` resolved: ``file`` for several local files named by a file or a
        glob (a directory may name its splits), else ``tail``."""
        if self.val_by != "auto":
            return self.val_by
        several = files is not None and len(files) > 1 and not os.path.isdir(os.path.expanduser(named_path(self.corpus)))
        return "file" if several else "tail"

    def _validation_files(self) -> list[str]:
        """With ``val_by: file``, the seeded choice of whole local files held out (else none)."""
        files = local_files(self.corpus)
        if self._val_mode(files) != "file":
            return []
        if files is None or len(files) < 2:
            raise ValueError(f"TextDataModule: val_by: file needs a corpus of several local files; {self.corpus!r} "
                             f"has {0 if files is None else len(files)}; use val_by: tail (the last documents)")
        order = np.random.default_rng(self.seed).permutation(len(files))
        held = min(len(files) - 1, max(1, round(self.val_fraction * len(files))))
        return [files[i] for i in sorted(order[:held])]

    def _documents(self) -> DatasetDict:
        """The corpus as ``train`` and ``validation`` splits of the text column alone."""
        held_files = self._validation_files()
        splits = load_source(self.corpus, self.corpus_config, os.path.join(self.cache_dir, "hf"), self.num_proc,
                             self.encoding, self.encoding_errors, held_files)
        if self.train_split not in splits:
            raise ValueError(f"TextDataModule: no split {self.train_split!r} in {self.corpus!r}; it has {list(splits)}")
        train = splits[self.train_split]
        if self.text_field not in train.column_names:
            raise ValueError(
                f"TextDataModule: no field {self.text_field!r} in {self.corpus!r}; it has {train.column_names}"
            )
        if held_files:
            val = splits["validation"]
            self.val_held = "whole files: " + ", ".join(os.path.basename(f) for f in held_files)
        elif self.val_split in splits:
            val = splits[self.val_split]
            self.val_held = f"the corpus's {self.val_split!r} split"
        else:
            held = max(1, round(self.val_fraction * len(train)))  # indices kept in memory: no cache file
            if self._val_mode(local_files(self.corpus)) == "tail":
                order = np.arange(len(train))[::-1]
                self.val_held = f"the last {held} of {len(train)} documents (one contiguous span)"
            else:
                order = np.random.default_rng(self.seed).permutation(len(train))
                self.val_held = ""  # random documents: not contiguous
            val = train.select(np.sort(order[:held]), keep_in_memory=True)
            train = train.select(np.sort(order[held:]), keep_in_memory=True)
        if self.val_held:
            rank_zero_info(f"TextDataModule: validation text: {self.val_held}")
        return DatasetDict(train=train.select_columns([self.text_field]), validation=val.select_columns([self.text_field]))

    def heldout_documents(self, num_documents: int) -> torch.Tensor:
        """Up to ``num_documents`` validation blocks [N, block_size + 1] of contiguous text, spread
        evenly over the validation split (the text measures' documents, :mod:`lit_icl.text_icl`);
        ValueError when the validation split is random documents (``val_by: document``)."""
        if not self._blocks:
            self._build()
        if not self.val_held:
            raise ValueError(
                f"the validation text of {self.corpus!r} is a random {self.val_fraction:g} of its documents, so a "
                "validation block joins unrelated documents and its late positions measure nothing; set "
                "--data.init_args.val_by file (whole files held out) or tail (the last documents)")
        blocks = self._blocks["validation"]
        return torch.stack([blocks[int(i)]["ids"] for i in spread(len(blocks), num_documents)]).long()

    def _build(self) -> None:
        """Load, or build and cache, the tokenizer and the packed blocks (under the entry's lock)."""
        given = None if self.tokenizer_path is None else read_tokenizer(self.tokenizer_path)
        key = self._key(given)
        entry = os.path.join(self.cache_dir, "text", key)
        os.makedirs(entry, exist_ok=True)
        with FileLock(entry + ".lock"):
            documents = self._documents()
            path = os.path.join(entry, "tokenizer.json")
            if given is not None:
                tokenizer = given
            elif os.path.exists(path):
                tokenizer = Tokenizer.from_file(path)
            else:
                start = time.perf_counter()
                train = documents["train"]
                batches = (b[self.text_field] for b in train.iter(batch_size=MAP_BATCH))
                tokenizer = train_bpe(batches, self._vocab_size, self.min_frequency)
                save_tokenizer(tokenizer, path)
                self.built.append("tokenizer")
                rank_zero_info(f"TextDataModule: trained a {tokenizer.get_vocab_size()}-token BPE tokenizer on "
                               f"{len(train)} documents in {time.perf_counter() - start:.1f} s -> {path}")
            if tokenizer.get_vocab_size() > self._vocab_size or tokenizer.token_to_id(EOS) is None:
                raise ValueError(
                    f"TextDataModule: the tokenizer has {tokenizer.get_vocab_size()} tokens (EOS id "
                    f"{tokenizer.token_to_id(EOS)}); vocab_size={self._vocab_size} and {EOS} are required"
                )
            blocks = {split: self._blocks_of(docs, tokenizer, entry, split, key) for split, docs in documents.items()}
        for split, data in blocks.items():
            if len(data) == 0:
                raise ValueError(f"TextDataModule: the {split} split has fewer than block_size + 1 = "
                                 f"{self.block_size + 1} tokens per {MAP_BATCH} documents")
        self._tokenizer, self._blocks = tokenizer, {s: d.with_format("torch") for s, d in blocks.items()}

    def _blocks_of(self, documents, tokenizer: Tokenizer, entry: str, split: str, key: str):
        """``documents`` tokenized then packed, through two cached ``Dataset.map`` calls."""
        ids = Features({"ids": ListOf(Value("int32"))})
        steps = [
            ("tokens", _tokenize, dict(tokenizer=tokenizer, text_field=self.text_field,
                                       eos_id=tokenizer.token_to_id(EOS))),
            (f"blocks{self.block_size}", _pack, dict(block_size=self.block_size)),
        ]
        data = documents
        for name, function, kwargs in steps:
            file = os.path.join(entry, f"{split}-{name}.arrow")
            if not glob.glob(file[: -len(".arrow")] + "*.arrow"):
                self.built.append(f"{split}-{name}")
            data = data.map(
                function, batched=True, batch_size=MAP_BATCH, remove_columns=data.column_names, fn_kwargs=kwargs,
                features=ids, cache_file_name=file, new_fingerprint=f"{key}-{split}-{name}", num_proc=self.num_proc,
                desc=f"{split}: {name}",
            )
        return data

    def prepare_data(self) -> None:
        """Build the cache (local rank 0 of each node): corpus, tokenizer, tokens, blocks; and
        load the template tasks' datasets (a hub dataset downloads here)."""
        self._build()
        self.load_tasks()

    def setup(self, stage: str | None = None) -> None:
        """Load the cache (built by ``prepare_data``), and write ``tokenizer.json`` into the
        run's log directory (global rank 0; needs a logger)."""
        self._build()
        save_run_tokenizer(self.trainer, self._tokenizer)

    def _loader(self, split: str) -> DataLoader:
        if not self._blocks:
            self._build()
        return DataLoader(self._blocks[split], batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=_blocks)

    def train_dataloader(self) -> ResumableBatches:
        """Shuffled per epoch from (seed, epoch) alone, resumable mid-epoch from a checkpoint,
        sharded across DDP ranks (see :mod:`lit_icl.data.batches`)."""
        if not self._blocks:
            self._build()
        return ResumableBatches(self._blocks["train"], self.batch_size, seed=self.seed, collate=_blocks,
                                num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def state_dict(self) -> dict[str, Any]:
        """``{"tokenizer": <its JSON>}``: saved in every checkpoint by Lightning."""
        return {"tokenizer": self.tokenizer.to_str()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that the checkpoint's tokenizer is this run's (token ids would be misread)."""
        check_checkpoint_tokenizer(state_dict, self.tokenizer, "TextDataModule",
                                   "pass the checkpoint as --data.init_args.tokenizer_path to use its tokenizer")
