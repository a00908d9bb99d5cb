"""LitTransformerLM: the LightningModule that trains a TransformerLM on next-token targets."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import asdict
from functools import partial
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from lit_icl.data.batches import IGNORE_INDEX
from lit_icl.model import BakedContext, TransformerConfig, TransformerLM
from lit_icl.sources import model_directory
from lit_icl.strategies import is_sharded

__all__ = ["LitTransformerLM", "lr_lambda"]

RUNTIME_FIELDS = ("dropout", "chunk_size")  # change no weight: a pretrained model takes them from `config`


def lr_lambda(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``.

    ``(step + 1) / warmup_steps`` while ``step < warmup_steps``; afterwards
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clamped to ``[0, 1]``.
    With ``total_steps=None`` (unknown length) the multiplier stays 1 after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrained_config(given: TransformerConfig | Mapping, loaded: TransformerConfig) -> TransformerConfig:
    """The config of a module built from a pretrained checkpoint whose config is `loaded`, given
    the module's `config` argument. A dict names the fields it sets; a TransformerConfig (what
    the CLI builds, with the data's vocab_size linked in) sets vocab_size and the fields that
    differ from their defaults. Runtime fields (dropout, chunk_size) are taken; vocab_size may
    be smaller than the checkpoint's (the data uses the first ids); any other field set must
    equal the checkpoint's, else ValueError naming it."""
    if isinstance(given, TransformerConfig):
        defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
        given = {k: v for k, v in asdict(given).items() if k == "vocab_size" or v != defaults[k]}
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    updates = {}
    for name, value in given.items():
        if name not in known:
            raise ValueError(f"config.{name} is not a TransformerConfig field")
        have = getattr(loaded, name)
        if name in RUNTIME_FIELDS:
            updates[name] = value
        elif name == "vocab_size" and value > have:
            raise ValueError(f"config.vocab_size={value} (the data's) exceeds the pretrained model's vocabulary of {have}")
        elif name != "vocab_size" and value != have:
            raise ValueError(f"config.{name}={value!r} conflicts with the pretrained checkpoint's {name}={have!r}")
    return dataclasses.replace(loaded, **updates)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class LitTransformerLM(pl.LightningModule):
    """Trains :class:`~lit_icl.model.TransformerLM` with cross-entropy on ``labels`` (``-100`` ignored).

    A batch is ``dict(input_ids=[B, T], labels=[B, T])`` (optionally ``attention_mask``), where
    ``labels[t]`` is the target of the prediction at position ``t``. The model config is stored
    in ``hparams`` as a plain dict, so ``LitTransformerLM.load_from_checkpoint(path)`` rebuilds it.

    Args:
        config: the model's :class:`~lit_icl.model.TransformerConfig` (a dict of its fields is
            accepted too). May be omitted with ``pretrained``; see :func:`pretrained_config`.
        pretrained: a local Hugging Face directory (``model_type`` gpt2, llama, qwen2, gemma3_text or gemma3) whose weights
            the model starts from (:meth:`TransformerLM.from_hf`). The hparams keep it and the
            whole config, so ``load_from_checkpoint`` (which passes ``pretrained=None``) rebuilds
            the model without the directory; ``lit-icl validate --ckpt_path`` (whose data's
            vocabulary is linked into the config) reads the directory again.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay of the parameters with ``dim >= 2``.
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup.
        min_lr_ratio: final learning rate as a fraction of ``lr`` after the cosine decay.
        on_nonfinite: ``"stop"`` (raise NonFiniteLossError naming the step, before the update)
            or ``"skip"`` (drop that step) when the training loss is NaN or infinite.
        compile: compile the model's forward with ``torch.compile`` for training, validation and
            the loss (``nn.Module.compile``: the weights keep their names, checkpoints are
            unchanged). The ICL measures call ``model.run`` and stay eager (their shapes vary
            with every prompt). The first steps pay the compilation (tens of seconds on a CPU).
        activation_checkpointing: recompute each block's activations in the backward pass instead
            of keeping them (``torch.distributed._composable.checkpoint``: parameter names and
            checkpoints unchanged; gradients identical), trading about one more forward per step
            for activation memory of one block. Composes with fsdp2, DDP and compile.
        meta_init: build the model on the meta device (no memory) and draw its weights in
            :meth:`configure_model`, after sharding under fsdp2 (each process draws only its
            shards, so a model larger than one process's memory never exists whole) or on the
            training device otherwise. Same scheme as the default, other draws: the initial
            weights differ from ``meta_init=False``'s for the same seed. Not with ``pretrained``.
        loss_chunk_size: rows of the output head and the loss computed at a time
            (`lit_icl.loss.chunked_cross_entropy`, Wijmans et al. 2025): the [B, T, vocab] logits,
            their softmax and gradient never exist. None: `lit_icl.loss.chunk_rows` (64 MiB of
            float32 logits a chunk, 1024 rows at vocabulary 16,384); 0: the full logits and
            F.cross_entropy (the reference).

    Under ``--trainer.strategy fsdp2`` (:mod:`lit_icl.strategies`) :meth:`configure_model` shards
    every block and then the root with FSDP2's ``fully_shard``.
    """

    def __init__(
        self,
        config: TransformerConfig = {},  # noqa: B006 (never mutated; a dict default keeps --model.config.* options)
        pretrained: str | None = None,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        on_nonfinite: str = "stop",
        compile: bool = False,
        activation_checkpointing: bool = False,
        loss_chunk_size: int | None = None,
        meta_init: bool = False,
    ) -> None:
        super().__init__()
        if pretrained is None and isinstance(config, Mapping):
            if "vocab_size" not in config:
                raise TypeError("LitTransformerLM needs a config (with vocab_size) unless pretrained is given")
            config = TransformerConfig(**config)
        if not isinstance(config, (TransformerConfig, Mapping)):
            raise TypeError(f"config must be a TransformerConfig or a dict of its fields, got {type(config).__name__}")
        if lr <= 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"need lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got lr={lr}, "
                f"warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}"
            )
        if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or loss_chunk_size < 0):
            raise ValueError(f"loss_chunk_size={loss_chunk_size!r}; allowed: None (automatic), 0 (full logits) or "
                             "a positive number of rows")
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; allowed: 'stop', 'skip'")
        if meta_init and pretrained is not None:
            raise ValueError("meta_init=True builds a fresh model; pretrained weights are loaded whole (drop one)")
        self.save_hyperparameters()
        if pretrained is None:
            with torch.device("meta") if meta_init else contextlib.nullcontext():
                self.model = TransformerLM(config)
        else:
            self.model = TransformerLM.from_hf(model_directory(pretrained)).train()
            cfg = pretrained_config(config, self.model.config)
            if cfg != self.model.config:
                tuned = TransformerLM(cfg)
                tuned.load_state_dict(self.model.state_dict())
                self.model = tuned
        self._checkpointed = False  # activation checkpointing applied (configure_model)
        self.hparams["config"] = asdict(self.model.config)  # a plain dict: checkpoints hold no custom class
        # One sequence (at most 256 tokens) for the model summary's FLOPs column.
        self.example_input_array = torch.zeros(1, min(self.model.config.block_size, 256), dtype=torch.long)
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({"loss": MeanMetric(), "acc": MeanMetric()}) for stage in ("val", "test")}
        )

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any) -> "LitTransformerLM":
        """Lightning's ``load_from_checkpoint`` with ``pretrained=None`` unless given: the
        checkpoint holds the weights and the whole config, not the directory."""
        kwargs.setdefault("pretrained", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    @property
    def config(self) -> TransformerConfig:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of the wrapped model."""
        if attention_mask is None:
            return self.model(input_ids)
        return self.model(input_ids, attention_mask=attention_mask)

    def _loss_and_predictions(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean cross-entropy on the labelled positions and the argmax prediction [B, T]:
        the head and the loss in chunks (`lit_icl.loss`) unless loss_chunk_size=0."""
        chunk = self.hparams.get("loss_chunk_size")
        if chunk == 0:  # the reference: full logits
            logits = self(batch["input_ids"], batch.get("attention_mask"))
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the loss in float32
            loss = F.cross_entropy(wide.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
            return loss, logits.argmax(dim=-1)
        return self.model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                          loss_chunk_size=chunk)

    def configure_model(self) -> None:
        """Shard the model when the strategy has a device mesh (``fsdp2``): ``fully_shard`` on
        every block, then on the root (embeddings, final norm and head, tied or not), over the
        data-parallel mesh (after activation checkpointing, when set); compile it when ``compile``
        is set. Lightning calls this on every
        ``fit``/``validate``/``test``; a model already sharded or compiled is left as it is."""
        if self.hparams.get("activation_checkpointing") and not self._checkpointed:
            from torch.distributed._composable import checkpoint

            for block in self.model.blocks:
                checkpoint(block)
            self._checkpointed = True
        mesh = self.device_mesh
        if mesh is not None and not is_sharded(self.model):
            from torch.distributed.fsdp import fully_shard

            if mesh.ndim > 1 and mesh["tensor_parallel"].size() > 1:
                raise ValueError(f"tensor_parallel_size={mesh['tensor_parallel'].size()}: the model has no tensor "
                                 "parallelism; use --trainer.strategy fsdp2 (data parallel only)")
            data_parallel = mesh["data_parallel"] if mesh.ndim > 1 else mesh
            for block in self.model.blocks:
                fully_shard(block, mesh=data_parallel)
            fully_shard(self.model, mesh=data_parallel)
        if any(p.is_meta for p in self.model.parameters()):  # meta_init: draw the weights where they live
            swap = torch.__future__.get_swap_module_params_on_conversion()
            torch.__future__.set_swap_module_params_on_conversion(True)  # keeps parameter objects: a tied head stays tied
            try:
                self.model.to_empty(device=self.trainer.strategy.root_device if self._trainer else "cpu")
            finally:
                torch.__future__.set_swap_module_params_on_conversion(swap)
            with torch.no_grad():
                self.model.init_weights()
        if self.hparams.get("compile") and getattr(self.model, "_compiled_call_impl", None) is None:
            self.model.compile()

    def setup(self, stage: str) -> None:
        """Fail in seconds, not after a cluster hour: sequences must fit the model."""
        length = getattr(self.trainer.datamodule, "seq_len", None) if self.trainer else None
        if length is not None and length > self.config.block_size:
            raise ValueError(
                f"the data's sequences have {length} tokens, more than model.config.block_size="
                f"{self.config.block_size}"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """Cross-entropy on the labelled positions. A non-finite loss (on any rank: the ranks
        agree through one collective) stops training before the update with
        NonFiniteLossError naming the step, or with on_nonfinite="skip" skips the step."""
        loss, _ = self._loss_and_predictions(batch)
        if self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False):
            if self.hparams.on_nonfinite == "skip":
                rank_zero_warn(f"non-finite training loss at step {self.global_step}: step skipped")
                return None
            raise NonFiniteLossError(
                f"non-finite training loss ({float(loss)}) at step {self.global_step}: training stopped "
                "before the update; the checkpoints on disk hold the last good weights"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        loss, predicted = self._loss_and_predictions(batch)
        labelled = batch["labels"] != IGNORE_INDEX
        n = int(labelled.sum())
        if n == 0:
            return
        correct = (predicted == batch["labels"])[labelled].float()
        self.metrics[stage]["loss"].update(loss.detach(), weight=n)
        self.metrics[stage]["acc"].update(correct)

    def _eval_epoch_end(self, stage: str) -> None:
        """Log ``{stage}/loss``, ``{stage}/ppl = exp(loss)`` and ``{stage}/acc``, token-weighted.

        The MeanMetrics reduce across processes themselves (torchmetrics), so every rank logs
        the global value; ``sync_dist=True`` keeps Lightning's bookkeeping consistent.
        """
        metrics = self.metrics[stage]
        if metrics["loss"].update_count == 0:
            return
        loss, acc = metrics["loss"].compute(), metrics["acc"].compute()
        self.log_dict(
            {f"{stage}/loss": loss, f"{stage}/ppl": torch.exp(loss), f"{stage}/acc": acc},
            prog_bar=stage == "val",
            sync_dist=True,
        )
        for metric in metrics.values():
            metric.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A baked checkpoint (`lit-icl convert --bake`) carries context buffers under
        model.context.*: install a context of their shapes so the state dict loads."""
        prefix = "model.context."  # (a sharded checkpoint has no state_dict here: fsdp2 loads it in place)
        if any(k.startswith(prefix) for k in checkpoint.get("state_dict", ())):
            self.model.context = BakedContext.from_state_dict(checkpoint["state_dict"], prefix, self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with weight decay on ``dim >= 2`` parameters only; LambdaLR (:func:`lr_lambda`) per step."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        # With max_steps known, never ask for estimated_stepping_batches: it builds the training
        # loader before the checkpoint's loop state is restored, and Lightning then drops the
        # loader's saved position (Lightning issue #20550), so a resumed run would not be exact.
        max_steps = self.trainer.max_steps
        total = max_steps if max_steps is not None and max_steps > 0 else self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            rank_zero_warn("training length unknown (no max_steps / max_epochs): no cosine decay after warmup")
            total = None
        schedule = partial(
            lr_lambda,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=None if total is None else int(total),
            min_lr_ratio=self.hparams.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
