"""ResumableBatches: the training stream of a map-style tensor dataset, which Lightning can
checkpoint and resume mid-epoch, sharded across DDP ranks.

Epoch e visits a permutation drawn from (seed, e) only, so the order is reproducible without
any global RNG. Each rank takes the strided share perm[rank::world] (padded by wrapping, like
DistributedSampler, so every rank runs the same number of steps and no collective waits
forever). `state_dict()` / `load_state_dict()` make Lightning store the position in every
checkpoint and restore it on `fit(ckpt_path=...)`, so a resumed run sees exactly the batches
an uninterrupted one would have seen.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableBatches:
    """Batches {name: tensor[idx]} of equally long tensors, shuffled per epoch from `seed`.

    Each `iter()` is one epoch. The position Lightning saves is the number of batches this
    iterator has handed out in the current epoch: Lightning's fit loop asks for batch b + 1
    only after the checkpoints of step b are written (tests/test_faults.py checks a killed and
    resumed run against an uninterrupted one, bitwise).
    """

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int = 0, shuffle: bool = True):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors must have one length, got {sorted(lengths)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.tensors, self.batch_size, self.seed, self.shuffle = tensors, batch_size, seed, shuffle
        self.size = lengths.pop()
        self.next_epoch, self.start = 0, 0  # where the next iter() begins
        self.epoch, self.handed_out = 0, 0  # the epoch being iterated and its batches so far

    def __len__(self) -> int:
        _, world = _rank_world()
        return math.ceil(math.ceil(self.size / world) / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for `epoch`."""
        rank, world = _rank_world()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(self.size)
        per_rank = math.ceil(self.size / world)
        order = order.repeat(math.ceil(per_rank * world / self.size))[: per_rank * world]
        return order[rank::world]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.epoch, first = self.next_epoch, self.start
        self.next_epoch, self.start, self.handed_out = self.epoch + 1, 0, first
        index = self.indices(self.epoch)
        for b in range(first, len(self)):
            self.handed_out = b + 1
            idx = index[b * self.batch_size : (b + 1) * self.batch_size]
            yield {name: t[idx] for name, t in self.tensors.items()}

    def state_dict(self) -> dict[str, int]:
        """Where a resumed run continues: the epoch, and the batches already consumed in it."""
        if self.handed_out >= len(self):
            return {"epoch": self.epoch + 1, "batches": 0, "seed": self.seed}
        return {"epoch": self.epoch, "batches": self.handed_out, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint data stream has seed {state['seed']}, this run {self.seed}")
        self.next_epoch, self.start = int(state["epoch"]), int(state["batches"])
