"""Sharded training: the ``fsdp2`` strategy preset, the whole model of a sharded one, and
sharded checkpoints turned into single files.

``--trainer.strategy fsdp2`` is Lightning's ``ModelParallelStrategy`` with every process in one
data-parallel group (no tensor parallelism): ``LitTransformerLM.configure_model`` applies
``torch.distributed.fsdp.fully_shard`` (FSDP2) to every block and then to the root (embedding,
final norm, head), so each process holds ``1 / world_size`` of the weights, gradients and AdamW
state, and gathers one block's weights at a time in the forward and backward passes. Checkpoints
are folders written by ``torch.distributed.checkpoint`` (one file per process plus Lightning's
``meta.pt``); ``--ckpt_path last`` resumes them and :func:`consolidate_checkpoint` (``lit-icl
consolidate``) writes the usual single ``.ckpt`` file for ``convert``, ``generate`` and
``LitTransformerLM.load_from_checkpoint``.

Lightning's own ``fsdp`` is FSDP1 (``FSDPStrategy``), which refuses the CPU and wraps modules in
a way the ICL measures cannot use; the measures refuse it and name this preset.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

__all__ = ["FSDP2Strategy", "consolidate_checkpoint", "is_sharded", "is_sharded_checkpoint", "whole_model"]

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with ``data_parallel_size`` = every process of every node and
    ``tensor_parallel_size=1``: plain fully sharded data parallelism (Zhao et al. 2023, "PyTorch
    FSDP"), what ``--trainer.strategy fsdp2`` names. ``ModelParallelStrategy``'s own ``"auto"``
    sizes are data parallel across nodes and tensor parallel within one, which this model does
    not implement."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        super().__init__(data_parallel_size=1, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard) over every process, "
                          "with distributed checkpoints", override=True)


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` (or a submodule) is sharded by FSDP2's fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def whole_model(model: nn.Module) -> nn.Module:
    """`model` itself, or for an FSDP2-sharded model an unsharded copy on the same device with the
    full weights (every rank gathers them: a collective, so every rank must call this). The ICL
    measures run on it: under sharding every forward of `model` is a collective, which would
    force every rank through the same number of calls with equal shapes; on the copy each rank
    runs its own share of episodes, as under DDP, and the figures equal DDP's. The cost is one
    copy of the weights per process while the measure runs (not the gradients or the optimizer
    state), so a model whose weights fit one device can be measured however it trains."""
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    first = next(iter(full.values()))
    copy = _copies.get(model)
    if copy is None:
        with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave training's RNG alone
            copy = type(model)(model.config)
        _copies[model] = copy = copy.to(device=first.device, dtype=first.dtype)
    copy.load_state_dict(full)
    return copy.train(model.training)


_copies: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()  # one copy per model


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by a sharded run (torch.distributed.checkpoint)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and (path / ".metadata").is_file()


def consolidate_checkpoint(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the sharded checkpoint folder `path` as one ``.ckpt`` file `out` (what a DDP run
    writes: ``state_dict`` with the full weights, hyper-parameters, loops and callbacks; not the
    optimizer state, which stays sharded: resume a sharded run from its folder), readable by
    ``LitTransformerLM.load_from_checkpoint``, ``lit-icl convert`` and ``generate``. Runs in one process, on the CPU; ValueError when `path` is not one."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, out = Path(path), Path(out)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"{path} is not a sharded checkpoint (a folder with {META_FILE} and .metadata, written by "
                         "--trainer.strategy fsdp2)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tensors")
    dcp_to_torch_save(path, tmp)
    tensors = torch.load(tmp, map_location="cpu", weights_only=True)
    tmp.unlink()
    checkpoint = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = tensors["state_dict"]
    torch.save(checkpoint, out)
    return out
