"""Synthetic ICL tasks (zero-shot at chance, so in-context learning is measurable on a CPU):
the DataModule machinery every task shares.

A task generates fixed-length token sequences whose labels are already shifted (``labels[t]`` is
the target of the prediction at position ``t``, ``-100`` where nothing is scored) and held-out
:class:`~lit_icl.data.episodes.Episodes`. Every random draw comes from a generator seeded by
``SeedSequence([seed, stream])``; the streams are TRAIN 0, VAL 1, HELDOUT 2, TEST 3, so the
held-out episodes (fresh maps) are never seen in training, and every process of a DDP run
generates the same data (the training stream, :class:`~lit_icl.data.batches.ResumableBatches`,
then takes each rank's share; the ICL callback shards the held-out episodes itself with
:meth:`Episodes.shard`).

:class:`MapRecallDataModule` is the common core of associative recall and label mapping: each
sequence draws a random key->value map, shows ``k ~ U{1..n_pairs}`` of its pairs as slots, then
asks shown keys in the remaining query slots. A task only chooses the slot layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_icl.data.batches import IGNORE_INDEX, ResumableBatches
from lit_icl.data.episodes import Episodes

__all__ = ["HELDOUT", "MapRecallDataModule", "SyntheticICLDataModule", "TEST", "TRAIN", "VAL", "check_at_least",
           "stream_generator"]

TRAIN, VAL, HELDOUT, TEST = 0, 1, 2, 3


def stream_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for ``stream`` (one or more ints) of ``seed``, from
    ``SeedSequence([seed, *stream])``; distinct streams give independent draws."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def check_at_least(owner: str, bounds: Sequence[tuple[str, int, int]]) -> None:
    """Raise ``ValueError("<owner>: <name> must be >= <least>, got <value>")`` for the first
    ``(name, value, least)`` with ``value < least``."""
    for name, value, least in bounds:
        if value < least:
            raise ValueError(f"{owner}: {name} must be >= {least}, got {value}")


def _stack_pairs(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch of ``(input_ids, labels)`` rows whose labels are already shifted (and masked)."""
    input_ids, labels = zip(*rows)
    return {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels)}


class SyntheticICLDataModule(pl.LightningDataModule, ABC):
    """Fixed train / validation / test sequences of one synthetic task, plus held-out episodes.

    Subclasses set ``task_name`` and implement ``vocab_size``, ``seq_len``, ``max_shots``,
    ``sequences(n, stream)`` and ``_episodes(n_shots, num_episodes, task)``. They take their own
    arguments and forward ``**kwargs`` (the arguments below) here; LightningCLI (jsonargparse)
    follows the forwarding, so a config sets these under the subclass's ``init_args``. The
    hyperparameters of the whole chain are saved here (``save_hyperparameters`` collects every
    ``__init__`` frame of the class hierarchy), minus the names in ``hparams_ignore``.

    Args:
        num_train: training sequences, generated once in ``setup``.
        num_val: validation (and test) sequences.
        num_heldout: default number of held-out episodes of ``heldout_episodes``.
        batch_size: sequences per batch (per process under DDP).
        num_workers: DataLoader worker processes.
        seed: root seed of every stream.
    """

    task_name = ""
    hparams_ignore: tuple[str, ...] = ()  # constructor arguments that are not hyperparameters

    def __init__(self, num_train: int = 20000, num_val: int = 512, num_heldout: int = 256, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 1234) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        check_at_least(type(self).__name__, [
            ("num_train", num_train, 1), ("num_val", num_val, 1), ("num_heldout", num_heldout, 1),
            ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
        ])
        self.num_train, self.num_val, self.num_heldout = num_train, num_val, num_heldout
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._splits: dict[int, TensorDataset] = {}

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids are ``0..vocab_size - 1`` (``0`` is padding)."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Tokens per training sequence."""

    @property
    @abstractmethod
    def max_shots(self) -> int:
        """The largest ``n_shots`` that ``heldout_episodes`` accepts."""

    @abstractmethod
    def sequences(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``stream`` as ``(input_ids, labels)``, both ``[n, seq_len]`` long."""

    @abstractmethod
    def _episodes(self, n_shots: int, num_episodes: int, task: str) -> Episodes:
        """The held-out episodes of ``heldout_episodes``, arguments checked, ``task`` resolved."""

    def heldout_tasks(self) -> list[str]:
        """The names ``heldout_episodes(..., task=name)`` accepts: this task's own."""
        return [self.task_name]

    def heldout_episodes(self, n_shots: int, num_episodes: int | None = None, task: str | None = None) -> Episodes:
        """Held-out ICL episodes with ``n_shots`` demonstrations each, from the HELDOUT stream.

        The same on every call; episodes of different ``n_shots`` share their draws (more shots
        of the same episodes).

        Args:
            n_shots: demonstrations per episode, in ``0..max_shots`` (0: the query alone).
            num_episodes: number of episodes; ``num_heldout`` when ``None``.
            task: one of :meth:`heldout_tasks`; ``None``: the first.
        """
        num_episodes = self.num_heldout if num_episodes is None else num_episodes
        if task is not None and task not in self.heldout_tasks():
            raise ValueError(f"heldout_episodes: task={task!r}; allowed: {self.heldout_tasks()}")
        if not 0 <= n_shots <= self.max_shots:
            raise ValueError(
                f"heldout_episodes: n_shots must be in 0..{self.max_shots} for {type(self).__name__}, got {n_shots}"
            )
        if num_episodes < 1:
            raise ValueError(f"heldout_episodes: num_episodes must be >= 1, got {num_episodes}")
        return self._episodes(n_shots, num_episodes, task or self.heldout_tasks()[0])

    def setup(self, stage: str | None = None) -> None:
        """Generate the fixed train / validation / test sets (once)."""
        for stream, n in ((TRAIN, self.num_train), (VAL, self.num_val), (TEST, self.num_val)):
            if stream not in self._splits:
                self._splits[stream] = TensorDataset(*self.sequences(n, stream))

    def _loader(self, stream: int, shuffle: bool = False) -> DataLoader:
        self.setup()
        return DataLoader(
            self._splits[stream],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_stack_pairs,
        )

    def train_dataloader(self) -> ResumableBatches:
        """Shuffled per epoch from (seed, epoch) alone, resumable mid-epoch from a checkpoint,
        sharded across DDP ranks (see `lit_icl.data.batches`)."""
        self.setup()
        input_ids, labels = self._splits[TRAIN].tensors
        return ResumableBatches({"input_ids": input_ids, "labels": labels}, self.batch_size, seed=self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(VAL)

    def test_dataloader(self) -> DataLoader:
        return self._loader(TEST)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(TEST)


class MapRecallDataModule(SyntheticICLDataModule):
    """A random key->value map shown slot by slot, then its keys asked (recall, label mapping).

    A slot is ``slot_layout`` with ``"k"`` replaced by the key, ``"v"`` by the value and any int
    kept as that token (a delimiter). Key ids are ``key_base .. key_base + n_keys - 1``, value ids
    ``value_base .. value_base + n_values - 1``; ``0`` is padding.

    A training sequence has ``n_pairs + n_queries`` slots: it draws a map over ``n_pairs``
    distinct keys and a shot count ``k ~ U{1..n_pairs}``; the first ``k`` slots show the pairs,
    every later slot asks a key drawn uniformly from the shown ones, followed by its value. The
    label is set only at the token just before ``"v"`` in a query slot and equals the value, so the
    loss measures recall alone, and the answer is only in the context (zero-shot is at chance).

    A held-out episode shows the first ``n_shots`` pairs of a fresh map (``shot_index`` = slot),
    its query is a shown key's slot up to the value (the value is predicted at its last token),
    the answer that value, and the candidates every value token.
    """

    slot_layout: tuple[str | int, ...] = ("k", "v")
    key_base = 1
    value_base = 2
    hparams_ignore = ("names",)

    def __init__(self, n_pairs: int, n_keys: int, n_values: int, n_queries: int, names: Sequence[str],
                 **kwargs) -> None:
        """``names``: how the arguments ``n_pairs, n_keys, n_values, n_queries`` are called in
        the subclass's signature (so that error messages name them); ``kwargs``: the
        :class:`SyntheticICLDataModule` arguments."""
        owner = type(self).__name__
        check_at_least(owner, [(name, v, 1) for name, v in zip(names, (n_pairs, n_keys, n_values, n_queries))])
        if n_pairs > n_keys:
            raise ValueError(
                f"{owner}: {names[0]}={n_pairs} exceeds {names[1]}={n_keys} (the keys of a map are distinct)"
            )
        super().__init__(**kwargs)
        self.n_pairs, self.n_keys, self.n_values, self.n_queries = n_pairs, n_keys, n_values, n_queries

    @property
    def seq_len(self) -> int:
        """``len(slot_layout) * (n_pairs + n_queries)``."""
        return len(self.slot_layout) * (self.n_pairs + self.n_queries)

    @property
    def max_shots(self) -> int:
        return self.n_pairs

    @property
    def value_ids(self) -> torch.Tensor:
        """``[n_values]`` long: every value token (the candidates of an episode)."""
        return torch.arange(self.value_base, self.value_base + self.n_values)

    def _draw_maps(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random maps as ``(keys, values)``, each ``[n, n_pairs]``; keys distinct per row."""
        keys = torch.rand(n, self.n_keys, generator=gen).argsort(dim=1)[:, : self.n_pairs] + self.key_base
        values = torch.randint(self.value_base, self.value_base + self.n_values, (n, self.n_pairs), generator=gen)
        return keys, values

    def _slots(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Slots ``[n, S, len(slot_layout)]`` of keys and values ``[n, S]``."""
        parts = [key if c == "k" else value if c == "v" else torch.full_like(key, c) for c in self.slot_layout]
        return torch.stack(parts, dim=2)

    def sequences(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sequences of ``stream`` as ``(input_ids, labels)``, both ``[n, seq_len]`` long."""
        gen = stream_generator(self.seed, stream)
        keys, values = self._draw_maps(n, gen)
        slots = self.n_pairs + self.n_queries
        shots = torch.randint(1, self.n_pairs + 1, (n, 1), generator=gen)
        slot = torch.arange(slots).expand(n, slots)
        asked = (torch.rand(n, slots, generator=gen) * shots).long()  # uniform over the shown pairs
        is_query = slot >= shots
        pair = torch.where(is_query, asked, slot)
        key, value = keys.gather(1, pair), values.gather(1, pair)
        width, answer_at = len(self.slot_layout), self.slot_layout.index("v") - 1
        input_ids = self._slots(key, value).reshape(n, width * slots)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, answer_at::width] = torch.where(is_query, value, IGNORE_INDEX)
        return input_ids, labels

    def _episodes(self, n_shots: int, num_episodes: int, task: str) -> Episodes:
        gen = stream_generator(self.seed, HELDOUT)
        keys, values = self._draw_maps(num_episodes, gen)
        asked = (torch.rand(num_episodes, 1, generator=gen) * max(n_shots, 1)).long()
        width, query_len = len(self.slot_layout), self.slot_layout.index("v")
        demos = self._slots(keys[:, :n_shots], values[:, :n_shots]).reshape(num_episodes, width * n_shots)
        query = self._slots(keys.gather(1, asked), values.gather(1, asked))[:, 0, :query_len]
        return Episodes(
            demo_ids=demos,
            query_ids=query,
            answers=values.gather(1, asked).squeeze(1),
            candidates=self.value_ids,
            shot_index=(torch.arange(width * n_shots) // width).expand(num_episodes, width * n_shots),
        )
