"""Callbacks that inject faults into a real training run (used by tests/test_faults.py)."""
import os
import signal

import lightning.pytorch as pl
import torch


class PoisonWeightsAt(pl.Callback):
    """Fill one weight with NaN before training step `step`: the loss turns non-finite there."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.wte.weight.fill_(float("nan"))


class KillRankAt(pl.Callback):
    """SIGKILL this process at `step` when it is rank `rank` (a DDP worker dying mid-run)."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)
