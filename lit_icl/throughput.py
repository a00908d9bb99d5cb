"""ThroughputCallback: training tokens per second and model FLOPs utilisation in TensorBoard.

Logged at the trainer's logging steps (`log_every_n_steps`), each a rate over the window since the
previous logged step (from a validation's start to the next training batch excluded):

- ``throughput/tokens_per_s``: tokens (``input_ids.numel()``: padding included) per second of
  this process (rank 0's in the logger);
- ``throughput/tokens_per_s_total``: the sum over the processes (one all-reduce per logged step;
  about world size x the first);
- ``throughput/mfu``: this process's model FLOPs per second / its peak FLOP/s;
- ``throughput/mfu_total``: all processes' FLOPs per second / the sum of their peaks;
- ``throughput/flops_per_token`` and ``throughput/peak_flops``: the two constants of the MFU.

FLOPs per token are counted, not estimated: torch.utils.flop_counter.FlopCounterMode wraps the
first training step (forward, loss, backward and optimizer step, all of what the model runs) and
its count is divided by that batch's tokens. 6 x parameters x tokens would miss what differs
between the attention kinds (the chunked forms' within-chunk products, softmax's T^2 terms, the
recurrent forms' gates) and a tied embedding's lookup is no matmul. What the counter counts:
matmuls, attention (the full T x T product, causal or not) and convolutions; elementwise work
(norms, activations, the optimizer) counts zero, as in the usual MFU. A batch of another length
is scaled by its tokens. The counting step is left out of the timing (it is also the warm-up).

The peak is `peak_flops` (FLOP/s of one device: the vendor's figure, e.g. 989e12 for an H100's
dense bf16) or, when not given, the large-matmul rate measured once at fit start on this
process's device: the median over a few torch.mm of two n x n matrices in the precision's compute
dtype (bf16 for bf16-mixed/true, fp16 for 16-*, float64 for 64-true, else float32; n = 2048 on
the CPU, 8192 on an accelerator). A measured peak is what this machine really reaches on a large
matmul (on a shared CPU: under its current load), so an MFU against it says how close the step
comes to the machine's best matmul, not to a datasheet.

What runs is what counts: a recomputed forward (activation checkpointing, the chunked loss's
recompute=True) adds its FLOPs, so the figure is then strictly a hardware FLOPs utilisation. A
torch.compile'd model is counted too (the counter sees the compiled graph's matmuls); should a
step count nothing, only tokens/s are logged (with a warning).

Works under DDP: every process counts and times itself, the totals are all-reduced (sum). With
gradient accumulation the rates are logged at optimizer steps only.
"""
from __future__ import annotations

import statistics
from time import perf_counter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["ThroughputCallback", "matmul_flops", "compute_dtype"]


def compute_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string ("bf16-mixed" -> bfloat16, ...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def matmul_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, n: int | None = None,
                 reps: int = 5) -> float:
    """FLOP/s of torch.mm of two n x n matrices on `device` (median of `reps` after a warm-up)."""
    device = torch.device(device)
    n = n or (2048 if device.type == "cpu" else 8192)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(reps + 1):
        sync()
        start = perf_counter()
        torch.mm(a, b)
        sync()
        if i:  # the first call is the warm-up
            times.append(perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


class ThroughputCallback(pl.Callback):
    """Log tokens/s and MFU under ``throughput/`` (see the module docstring for the names).

    Args:
        peak_flops: FLOP/s of one device to divide by; None: measure the large-matmul rate once at
            fit start on this device (`matmul_flops`).
        matmul_size: n of that measurement (None: 2048 on the CPU, 8192 on an accelerator).
    """

    def __init__(self, peak_flops: float | None = None, matmul_size: int | None = None) -> None:
        if peak_flops is not None and not peak_flops > 0:
            raise ValueError(f"peak_flops={peak_flops!r} must be a positive number of FLOP/s, or None to measure it")
        self.peak_flops = peak_flops
        self.matmul_size = matmul_size
        self.peak: float | None = None
        self.flops_per_token: float | None = None
        self._counter: FlopCounterMode | None = None
        self._window_start: float | None = None  # start of the window; None before the first timed step
        self._paused_at: float | None = None
        self._tokens = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.peak_flops is not None:
            self.peak, how = float(self.peak_flops), "given"
        else:
            dtype = compute_dtype(trainer.precision)
            self.peak = matmul_flops(pl_module.device, dtype, self.matmul_size)
            how = f"measured: torch.mm {str(dtype).removeprefix('torch.')} on {pl_module.device.type}"
        rank_zero_info(f"throughput: peak {self.peak / 1e9:,.1f} GFLOP/s per process ({how}); "
                       "MFU = model FLOPs/s / peak")
        self.flops_per_token, self._window_start, self._paused_at, self._tokens = None, None, None, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._paused_at is not None:  # validation (and what ran after it) is no training time
            self._window_start += perf_counter() - self._paused_at
            self._paused_at = None
        if self.flops_per_token is None and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = batch["input_ids"].numel()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            flops, self._counter = self._counter.get_total_flops(), None
            if outputs is None:  # a skipped step (no backward): count the next one
                return
            self.flops_per_token = flops / tokens
            if not flops:
                rank_zero_warn("throughput: no FLOPs counted in the first training step (a compiled model?); "
                               "tokens/s only, no MFU")
            self._window_start = perf_counter()
            return
        if self._window_start is None:
            return
        self._tokens += tokens
        accumulating = getattr(trainer.fit_loop, "_should_accumulate", lambda: False)()
        connector = getattr(trainer, "_logger_connector", None)  # Lightning's own test of a logging step
        if accumulating or (connector is not None and not connector.should_update_logs):
            return
        now = perf_counter()
        rate = self._tokens / (now - self._window_start)
        self._window_start, self._tokens = now, 0
        flops = rate * self.flops_per_token
        total = [rate, flops, self.peak]
        if trainer.world_size > 1:  # every process reaches this step's log: one all-reduce
            local = torch.tensor(total, dtype=torch.float64, device=pl_module.device)
            total = trainer.strategy.reduce(local, reduce_op="sum").tolist()
        metrics = {"throughput/tokens_per_s": rate, "throughput/tokens_per_s_total": total[0]}
        if self.flops_per_token:
            metrics.update({"throughput/mfu": flops / self.peak, "throughput/mfu_total": total[1] / total[2],
                            "throughput/flops_per_token": self.flops_per_token, "throughput/peak_flops": self.peak})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window_start is not None and self._paused_at is None:
            self._paused_at = perf_counter()  # until the next training batch starts

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:  # never leave the dispatch mode on after a failed step
            self._counter.__exit__(None, None, None)
            self._counter = None
