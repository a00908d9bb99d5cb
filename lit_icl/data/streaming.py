"""A text corpus tokenized once into litdata shards, then streamed: :func:`prepare` and
:class:`StreamingTextDataModule`.

``lit-icl data prepare CORPUS --out DIR`` (:func:`prepare`) runs :class:`TextDataModule`'s
pipeline once (loading, the validation hold-out, BPE training, tokenization, packing into windows
of ``block_size + 1`` tokens) and writes its windows with ``litdata.optimize`` as token chunks::

    DIR/train/        litdata chunks + index.json: the training windows
    DIR/validation/   the validation windows, in corpus order (the held-out documents)
    DIR/tokenizer.json
    DIR/meta.json     block_size, vocab_size, what the validation text is; written last

Every window is written whole and read back with ``TokensLoader(block_size + 1)``, so the stream
holds exactly the in-memory path's windows (consecutive windows share one token, as there).

:class:`StreamingTextDataModule` streams DIR from anywhere litdata reads (a local directory,
``s3://``, ``gs://``, ``azure://``, ...; remote chunks are cached in ``cache_dir``) with
``litdata.StreamingDataset`` and ``StreamingDataLoader``: shuffled per epoch from ``seed``, each
DDP rank its own chunks (litdata reads the world size and rank from ``torch.distributed``, so the
datasets are made in ``train_dataloader``, after the process group exists; under DDP every rank
gets the same whole number of batches, so up to ``world_size * batch_size - 1`` windows of an
epoch are left out). A batch is ``dict(input_ids=w[:, :-1], labels=w[:, 1:])``.

Resuming mid-epoch: Lightning (2.2+) saves the ``state_dict()`` of every training loader that has
one into each checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back before
the first batch, but only when its fit loop is "restarting": always for step-bounded runs
(``max_steps``), and for epoch-bounded runs only from a checkpoint taken inside an epoch. From an
epoch-end checkpoint of an epoch-bounded run it would start the loader at epoch 1 again, and
litdata would repeat the first epoch's order. So the DataModule also keeps the loader's state in
its own ``state_dict`` (saved in every checkpoint) and gives it to the loader it makes on resume;
loading the same state twice (this, then Lightning's) is the same as once. The state holds
samples consumed per rank, the epoch and litdata's seed; every rank is restored from rank 0's
(Lightning writes one file), which is exact because all ranks consume the same number.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from tokenizers import Tokenizer

from lit_icl.data.batches import next_token_batch
from lit_icl.data.synthetic import check_at_least
from lit_icl.data.text import TextDataModule, check_checkpoint_tokenizer, save_run_tokenizer, spread
from lit_icl.data.tokenizer import save_tokenizer, tokenizer_sha
from lit_icl.errors import first_line
from lit_icl.files import atomic_path

__all__ = ["StreamingTextDataModule", "prepare"]

FORMAT = "lit_icl.streaming/1"  # meta.json's "format": what this module writes and reads
URL_PREFIXES = ("s3://", "gs://", "r2://", "azure://", "hf://", "local:")  # read by litdata's downloaders


class _Windows:
    """``optimize``'s function: the windows ``[start, stop)`` of ``blocks`` as one flat int32
    array (read through Arrow: no torch in litdata's worker processes)."""

    def __init__(self, blocks):
        self.blocks = blocks.with_format("arrow")

    def __call__(self, span: tuple[int, int]) -> np.ndarray:
        return self.blocks[span[0] : span[1]]["ids"].combine_chunks().flatten().to_numpy()


def prepare(text: TextDataModule, out: str, num_workers: int = 1, chunk_tokens: int = 2**24) -> dict[str, Any]:
    """Build ``text``'s windows (its cache) and write them under the local directory ``out`` as
    litdata token chunks of about ``chunk_tokens`` tokens (whole windows; 2**24 int32 tokens are
    litdata's suggested 64 MB), with ``tokenizer.json`` and ``meta.json``; returns the meta.

    The training windows are written by ``num_workers`` processes, the validation windows by one,
    so they stay in corpus order. The processes are forked (spawned ones would import lit_icl
    again, seconds each; litdata sets the start method for the whole process). ``out`` must be
    new or empty (a stopped run leaves no meta.json: remove the directory and run again)."""
    from litdata import TokensLoader, optimize

    if out.startswith(URL_PREFIXES):
        raise ValueError(f"--out {out!r}: write to a local directory, then copy it to the bucket "
                         "(e.g. aws s3 cp --recursive DIR s3://...); the data module streams from there")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out!r} exists and is not an empty directory; choose a new one")
    check_at_least("prepare", [("num_workers", num_workers, 1), ("chunk_tokens", chunk_tokens, 1)])
    text.prepare_data()
    window = text.block_size + 1
    per_chunk = max(1, chunk_tokens // window)
    windows = {}
    for split, workers in (("train", num_workers), ("validation", 1)):
        blocks = text._blocks[split]
        spans = [(a, min(a + per_chunk, len(blocks))) for a in range(0, len(blocks), per_chunk)]
        optimize(fn=_Windows(blocks), inputs=spans, output_dir=os.path.join(os.path.abspath(out), split),
                 chunk_size=per_chunk * window, item_loader=TokensLoader(), num_workers=min(workers, len(spans)),
                 reorder_files=False, start_method="fork", verbose=False)
        windows[split] = len(blocks)
    save_tokenizer(text.tokenizer, os.path.join(out, "tokenizer.json"))
    meta = {"format": FORMAT, "corpus": text.corpus, "block_size": text.block_size, "vocab_size": text.vocab_size,
            "tokenizer_sha": tokenizer_sha(text.tokenizer), "val_held": text.val_held, "windows": windows}
    with atomic_path(os.path.join(out, "meta.json")) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _windows(items: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """A batch of streamed windows [B, block_size + 1] as next-token pairs."""
    return next_token_batch(torch.from_numpy(np.stack(items)))


class StreamingTextDataModule(pl.LightningDataModule):
    """Language modelling on a corpus prepared by ``lit-icl data prepare``, streamed with litdata.

    Args:
        data_dir: required: the ``--out`` directory of ``lit-icl data prepare``, local or a URL
            litdata reads (``s3://bucket/dir``, ``gs://``, ``azure://``, ``r2://``, ``hf://``).
        batch_size: sequences per batch (per process under DDP).
        num_workers: DataLoader worker processes (the resumed position is exact for any number,
            as long as it is the one the checkpoint was taken with).
        seed: seed of litdata's per-epoch shuffle of chunks and of windows within them.
        shuffle: ``False``: training windows in the order they were written.
        cache_dir: where remote chunks (and meta.json, tokenizer.json) are cached; ``None``:
            litdata's (``$LITDATA_CACHE_DIR`` or ``~/.lightning/chunks``). A local ``data_dir``
            is read in place.

    Attributes (the prepared corpus's, from ``meta.json``, as :class:`TextDataModule` offers them,
    so the model's ``vocab_size`` link and ``seq_len`` check work): ``vocab_size``, ``block_size``
    (= ``seq_len``, tokens per training sequence), ``tokenizer`` (``data_dir/tokenizer.json``).
    """

    def __init__(self, data_dir: str | None = None, batch_size: int = 16, num_workers: int = 0, seed: int = 1234,
                 shuffle: bool = True, cache_dir: str | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if not data_dir:
            raise ValueError(f"{owner}: data_dir is required: pass --data.init_args.data_dir with a directory made "
                             "by `lit-icl data prepare CORPUS --out DIR` (local, or s3://... where it was copied)")
        check_at_least(owner, [("batch_size", batch_size, 1), ("num_workers", num_workers, 0)])
        self.save_hyperparameters()
        self.data_dir, self.batch_size, self.num_workers = data_dir, batch_size, num_workers
        self.seed, self.shuffle, self.cache_dir = seed, shuffle, cache_dir
        with open(self._file("meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{owner}: {data_dir}/meta.json has format {meta.get('format')!r}, not {FORMAT!r}; "
                             "prepare the corpus again with this version of lit-icl")
        self.meta, self.vocab_size, self.val_held = meta, meta["vocab_size"], meta["val_held"]
        self.block_size = self.seq_len = meta["block_size"]
        self.tokenizer = Tokenizer.from_file(self._file("tokenizer.json"))
        self._train_loader = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's loader state, for the next loader
        self._heldout = None

    def _file(self, name: str) -> str:
        """A local path of ``data_dir/name``: the file itself, or a copy fetched into the cache by
        litdata's downloader for the URL's scheme. ValueError naming the path if it is missing."""
        path = f"{self.data_dir.rstrip('/')}/{name}"
        if not self.data_dir.startswith(URL_PREFIXES):
            if not os.path.isfile(path):
                raise ValueError(f"{type(self).__name__}: data_dir {self.data_dir!r} holds no prepared corpus ({path} "
                                 "is not a file); make one with `lit-icl data prepare CORPUS --out DIR`")
            return path
        from litdata.streaming.downloader import get_downloader
        from litdata.utilities.dataset_utilities import get_default_cache_dir

        local = os.path.join(self.cache_dir or get_default_cache_dir(), "lit_icl",
                             hashlib.sha256(self.data_dir.encode()).hexdigest()[:16], name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        try:
            get_downloader(self.data_dir, os.path.dirname(local), []).download_file(path, local)
        except Exception as err:  # each scheme fails its own way (boto, obstore, a missing file)
            raise ValueError(f"{type(self).__name__}: cannot read {path} ({first_line(err)}); data_dir must be a "
                             "directory made by `lit-icl data prepare` (or a copy of one)") from None
        return local

    def _dataset(self, split: str, shuffle: bool):
        """``data_dir/split`` as a StreamingDataset of windows [block_size + 1] (made after the
        process group is initialized: litdata reads the rank and world size here)."""
        from litdata import StreamingDataset, TokensLoader

        return StreamingDataset(f"{self.data_dir.rstrip('/')}/{split}", cache_dir=self.cache_dir, shuffle=shuffle,
                                seed=self.seed, item_loader=TokensLoader(block_size=self.block_size + 1))

    def _loader(self, split: str, shuffle: bool):
        from litdata import StreamingDataLoader

        return StreamingDataLoader(self._dataset(split, shuffle), batch_size=self.batch_size,
                                   num_workers=self.num_workers, collate_fn=_windows)

    def setup(self, stage: str | None = None) -> None:
        """Write ``tokenizer.json`` into the run's log directory, as TextDataModule does."""
        save_run_tokenizer(self.trainer, self.tokenizer)

    def train_dataloader(self):
        """One StreamingDataLoader for the whole run (its epoch count sets the shuffle), resumed
        at a checkpoint's position when one was loaded."""
        if self._train_loader is None:
            self._train_loader = self._loader("train", self.shuffle)
        if self._pending is not None:
            self._train_loader.load_state_dict(self._pending)
            self._pending = None
        return self._train_loader

    def val_dataloader(self):
        return self._loader("validation", False)

    def test_dataloader(self):
        return self._loader("validation", False)

    def heldout_documents(self, num_documents: int) -> torch.Tensor:
        """Up to ``num_documents`` validation windows [N, block_size + 1], spread evenly over the
        validation split as TextDataModule picks them (:mod:`lit_icl.text_icl`); ValueError when the
        validation text is random documents (prepared with ``--val_by document``)."""
        if not self.val_held:
            raise ValueError(
                f"the validation text of {self.data_dir!r} is random documents of {self.meta['corpus']!r}, so a "
                "validation window joins unrelated documents and its late positions measure nothing; prepare it "
                "again with `lit-icl data prepare ... --val_by file` (whole files held out) or tail (the last documents)")
        if self._heldout is None:
            self._heldout = self._dataset("validation", False)
        picks = spread(self.meta["windows"]["validation"], num_documents)  # len() would be this rank's share
        return torch.from_numpy(np.stack([self._heldout[int(i)] for i in picks])).long()

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer's JSON and the training loader's position (once it exists)."""
        state = {"tokenizer": self.tokenizer.to_str()}
        if self._train_loader is not None:
            state["loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check the checkpoint's tokenizer is this corpus's; keep its loader position for
        ``train_dataloader``."""
        check_checkpoint_tokenizer(state_dict, self.tokenizer, type(self).__name__,
                                   "prepare the corpus with the run's tokenizer (lit-icl data prepare ... --tokenizer_path "
                                   "<its log dir>/tokenizer.json)")
        self._pending = state_dict.get("loader")
