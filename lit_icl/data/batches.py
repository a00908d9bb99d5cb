"""Batches: what a batch holds, and ResumableBatches, the training stream of a map-style dataset,
which Lightning can checkpoint and resume mid-epoch, sharded across DDP ranks.

A batch is ``{"input_ids": [B, T], "labels": [B, T]}``, ``labels[b, t]`` the target of the
prediction at position ``t`` and :data:`IGNORE_INDEX` where nothing is scored;
:func:`next_token_batch` makes one from token rows (text blocks, formatted examples).

Epoch e visits a permutation drawn from (seed, e) only, so the order is reproducible without
any global RNG. Each rank takes the strided share perm[rank::world] (padded by wrapping, like
DistributedSampler, so every rank runs the same number of steps and no collective waits
forever). `state_dict()` / `load_state_dict()` make Lightning store the position in every
checkpoint and restore it on `fit(ckpt_path=...)`, so a resumed run sees exactly the batches
an uninterrupted one would have seen.

How Lightning (2.2+) keeps the position: the fit loop's `on_save_checkpoint` stores
`[loader.state_dict() for every loader that has state_dict/load_state_dict]` under
`loops.fit_loop.combined_loader`, and on resume hands the list back to `load_state_dict` before
the first batch. Only global rank 0 writes the checkpoint file, so every rank is restored from
rank 0's state; that is exact here because the state holds no rank-specific value: all ranks
run the same number of batches per epoch, in lockstep, and each rank derives its own shard
from (seed, epoch, rank, world size). Lightning wraps only `torch.utils.data.DataLoader`s in a
DistributedSampler, so it leaves this iterable alone.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader

__all__ = ["IGNORE_INDEX", "Columns", "ResumableBatches", "next_token_batch"]

IGNORE_INDEX = -100  # a label that no loss or accuracy scores (cross_entropy's ignore_index)


def next_token_batch(rows: Tensor | list[list[int]], pad_id: int = 0) -> dict[str, Tensor]:
    """Token rows as next-token pairs, ``input_ids = row[:-1]`` and ``labels = row[1:]``.

    ``rows`` is a ``[B, T + 1]`` tensor, or a list of token lists of any lengths (at least 2),
    right-padded to the longest: ``pad_id`` in ``input_ids`` and :data:`IGNORE_INDEX` in
    ``labels`` at padding (a causal model's earlier positions do not see it)."""
    if isinstance(rows, Tensor):
        ids = rows.long()
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    labels = ids[:, 1:].masked_fill(torch.arange(width - 1) >= (lengths - 1)[:, None], IGNORE_INDEX)
    return {"input_ids": ids[:, :-1], "labels": labels}


class Indexable(Protocol):
    """A map-style dataset that returns a whole batch for a list of indices, such as a
    torch-formatted Hugging Face ``datasets.Dataset``."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: list[int]) -> Any: ...


class Columns:
    """Equally long tensors as an :class:`Indexable`: ``columns[idx] == {name: t[idx]}``."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors must have one length, got {sorted(lengths)}")
        self.tensors, self.length = dict(tensors), lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, indices: list[int]) -> dict[str, Tensor]:
        return {name: t[indices] for name, t in self.tensors.items()}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Fetch:
    """``collate(data[indices])``: what a worker process runs (a picklable callable)."""

    def __init__(self, data: Indexable, collate: Callable[[Any], Any] | None):
        self.data, self.collate = data, collate

    def __call__(self, indices: list[int]) -> Any:
        batch = self.data[indices]
        return batch if self.collate is None else self.collate(batch)


class ResumableBatches:
    """Batches ``collate(data[idx])`` of a map-style dataset, shuffled per epoch from `seed`.

    Each `iter()` is one epoch. The position Lightning saves is the number of batches this
    iterator has handed out in the current epoch: because it has a length, Lightning's fit loop
    prefetches nothing and asks for batch b + 1 only after the checkpoints of step b are written
    (tests/test_faults.py checks killed and resumed runs against uninterrupted ones, bitwise).

    Args:
        data: a mapping of equally long tensors (a batch is ``{name: t[idx]}``), or any
            :class:`Indexable` (e.g. a torch-formatted Hugging Face ``Dataset``).
        batch_size: samples per batch (per rank); the last batch of an epoch may be shorter.
        seed: seed of the per-epoch permutations.
        shuffle: ``False``: every epoch in index order.
        collate: maps ``data[idx]`` to the batch handed out (``None``: as it is).
        num_workers: ``> 0``: fetch batches in that many worker processes (in order; the
            position still counts the batches handed out to the training loop).
        rank, world_size: this process's shard; ``None``: from ``torch.distributed`` (0 and 1
            when it is not initialized).
    """

    def __init__(self, data: Mapping[str, Tensor] | Indexable, batch_size: int, seed: int = 0, shuffle: bool = True,
                 collate: Callable[[Any], Any] | None = None, num_workers: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: give both, 0 <= rank < world_size, or neither")
        self.data = Columns(data) if isinstance(data, Mapping) else data
        self.fetch = _Fetch(self.data, collate)
        self.batch_size, self.seed, self.shuffle, self.num_workers = batch_size, seed, shuffle, num_workers
        self._shard = None if rank is None else (rank, world_size)
        self.size = len(self.data)
        if self.size == 0:
            raise ValueError("data is empty: nothing to train on")
        self.next_epoch, self.start = 0, 0  # where the next iter() begins
        self.epoch, self.handed_out = 0, 0  # the epoch being iterated and its batches so far

    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)`` of this process."""
        return self._shard or _rank_world()

    def __len__(self) -> int:
        _, world = self.shard()
        return math.ceil(math.ceil(self.size / world) / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for `epoch`."""
        rank, world = self.shard()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(self.size)
        per_rank = math.ceil(self.size / world)
        order = order.repeat(math.ceil(per_rank * world / self.size))[: per_rank * world]
        return order[rank::world]

    def __iter__(self) -> Iterator[Any]:
        self.epoch, first = self.next_epoch, self.start
        self.next_epoch, self.start, self.handed_out = self.epoch + 1, 0, first
        index = self.indices(self.epoch)
        batches = [index[b * self.batch_size : (b + 1) * self.batch_size].tolist() for b in range(first, len(self))]
        if self.num_workers == 0:
            stream = map(self.fetch, batches)
        else:  # one index list per item, batch_size=None: each worker fetches whole batches, in order
            stream = DataLoader(batches, batch_size=None, collate_fn=self.fetch, num_workers=self.num_workers)
        for b, batch in enumerate(stream, start=first):
            self.handed_out = b + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where a resumed run continues: the epoch and the batches already consumed in it,
        plus the seed, batch size and world size that give those numbers their meaning."""
        _, world = self.shard()
        done = self.handed_out >= len(self)
        return {"epoch": self.epoch + done, "batches": 0 if done else self.handed_out, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state``'s position (the same on every rank: each takes its own shard).

        Raises ``ValueError`` for another seed, and for another batch size or world size when
        the checkpoint stopped mid-epoch (the consumed samples would not be one prefix of every
        rank's shard); at an epoch boundary those may change."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint data stream has seed {state['seed']}, this run {self.seed}")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        ours = {"batch_size": self.batch_size, "world_size": self.shard()[1]}
        changed = {k: (state[k], v) for k, v in ours.items() if k in state and state[k] != v}
        if changed and batches > 0:
            raise ValueError(
                f"the checkpoint stopped at batch {batches} of epoch {epoch} with "
                + ", ".join(f"{k}={theirs}" for k, (theirs, _) in changed.items()) + "; this run has "
                + ", ".join(f"{k}={mine}" for k, (_, mine) in changed.items())
                + ": resume mid-epoch with the same values (they may change at an epoch boundary)"
            )
        self.next_epoch, self.start = epoch, batches
