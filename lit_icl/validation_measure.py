"""ValidationMeasure: what the in-context learning callbacks share, the contract of a measure
taken at the end of validation (`lit_icl.callbacks.ICLConversionCallback` on task episodes,
`lit_icl.text_icl.TextICLCallback` on held-out text).

- Fail fast: `prepare(trainer, pl_module)` builds and checks the held-out data once, at the
  start of fit, validate and test alike, so a setting that cannot work stops the run there
  with one line instead of at the first validation.
- Schedule: it runs at the 1st validation and every `every_n_validations`-th after it (the
  sanity check does not count).
- No training lost: during `fit`, an exception inside `measure` is reported in one line,
  `<prefix>/failed` = 1 is logged for that validation and training goes on (the validation's
  checkpoint is written as usual); in `validate` / `test`, or with LIT_ICL_DEBUG=1, it is raised.
- Sharded training (``--trainer.strategy fsdp2``): every rank gathers the full weights into an
  unsharded copy (`lit_icl.strategies.whole_model`) and measures its share on it, as under DDP;
  the figures equal DDP's. FSDP1 and DeepSpeed are refused at start.
- DDP: every rank measures its share; whether any rank failed is decided by one collective
  outside the part that can fail, so no rank waits in a metric's sync for a rank whose
  measurement failed; `publish` (which computes, and so syncs, the metrics) runs on all ranks
  or on none.

Several measures can run in one Trainer: each keeps its own schedule and its own `failed` tag.
"""
from __future__ import annotations

import abc
import logging
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lit_icl.errors import first_line
from lit_icl.model import TransformerLM
from lit_icl.strategies import FSDP2Strategy, whole_model

log = logging.getLogger("lightning.pytorch")

__all__ = ["ValidationMeasure"]


class ValidationMeasure(Callback, abc.ABC):
    """Base of a measure taken at validation end (see the module docstring). Subclasses set
    `prefix` (of the logged names) and `needs` (why the whole model is needed on every rank),
    and implement `prepare`, `measure` and `publish`."""

    prefix = "icl"
    needs = "it runs the model on held-out data"

    def __init__(self, every_n_validations: int = 1):
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations={every_n_validations} must be >= 1")
        self.every_n_validations = every_n_validations
        self.validations = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if ("FSDP" in name and not isinstance(trainer.strategy, FSDP2Strategy)) or "DeepSpeed" in name:
            raise ValueError(f"{type(self).__name__} needs the whole model on every rank ({self.needs}), but "
                             f"strategy {name} shards it in a way it cannot gather; use --trainer.strategy fsdp2 "
                             "(FSDP2, lit_icl.strategies) or ddp")

    @abc.abstractmethod
    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build and check the held-out data; ValueError with one line naming what cannot work."""

    @abc.abstractmethod
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: TransformerLM) -> Any:
        """This rank's share of the measurement on `model` (pl_module's model, or its unsharded
        copy under sharding; may fail; must not sync across ranks)."""

    @abc.abstractmethod
    def publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: Any, start: float) -> None:
        """Reduce `result` across ranks and log it (`start`: time.perf_counter() when the
        measurement began)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":  # fit prepared in on_fit_start
            self.prepare(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.prepare(trainer, pl_module)

    def due(self, trainer: pl.Trainer) -> bool:
        """Count this validation; whether the measure runs at it."""
        if trainer.sanity_checking:
            return False
        self.validations += 1
        return (self.validations - 1) % self.every_n_validations == 0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer):
            return
        start = time.perf_counter()
        model = whole_model(pl_module.model)  # a collective when sharded: outside the part that may fail
        failure, result = None, None
        try:
            result = self.measure(trainer, pl_module, model)
        except Exception as err:  # noqa: BLE001 -- any failure of the measurement, reported below
            if trainer.state.fn != "fit" or os.environ.get("LIT_ICL_DEBUG"):
                raise
            failure = err
        if trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
            cause = f"{type(failure).__name__}: {first_line(failure)}" if failure else "failed on another rank"
            log.warning(f"{self.prefix}: the evaluation at step {trainer.global_step} failed ({cause}); training goes "
                        f"on and {self.prefix}/failed=1 is logged (LIT_ICL_DEBUG=1 raises instead)")
            pl_module.log(f"{self.prefix}/failed", 1.0, sync_dist=False)
            return
        self.publish(trainer, pl_module, result, start)
