"""ThroughputCallback in a real Trainer fit: the throughput/ scalars in the TensorBoard event files,
MFU = tokens/s x FLOPs per token / peak, FLOPs per token as FlopCounterMode counts a training
step, validation left out of the rates, and the totals summed over two DDP processes."""
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.flop_counter import FlopCounterMode

from lit_icl.data import AssociativeRecallDataModule
from lit_icl.module import LitTransformerLM
import lit_icl.throughput
from lit_icl.throughput import ThroughputCallback, compute_dtype, matmul_flops
from tests.conftest import model_config

NAMES = ("tokens_per_s", "tokens_per_s_total", "mfu", "mfu_total", "flops_per_token", "peak_flops")
PAUSE = 1000.0  # seconds a validation seems to take


class SlowValidation(pl.Callback):
    """Each validation in training takes PAUSE seconds on the callback's clock (not in fact)."""

    def __init__(self, clock):
        self.clock = clock

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.clock.offset += PAUSE


class Clock:
    def __init__(self):
        self.offset, self.real = 0.0, lit_icl.throughput.perf_counter

    def __call__(self):
        return self.real() + self.offset


def fit(tmp_path, callback, max_steps, monkeypatch, emitted=None, **trainer_kw):
    """Fit a tiny model with `callback` and read back the throughput/ scalars; `emitted`: a list
    to receive every dict of throughput/ metrics the callback logs (before the logger)."""
    dm = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=128, num_val=16,
                                     num_heldout=8, batch_size=16)
    torch.manual_seed(0)
    module = LitTransformerLM(model_config(dm.vocab_size, block_size=32))
    if emitted is not None:
        log_dict = module.log_dict
        monkeypatch.setattr(module, "log_dict", lambda metrics, **kw: (
            emitted.append(metrics) if "throughput/tokens_per_s" in metrics else None, log_dict(metrics, **kw)))
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    clock = Clock()
    monkeypatch.setattr(lit_icl.throughput, "perf_counter", clock)
    pl.Trainer(max_steps=max_steps, val_check_interval=2, log_every_n_steps=1, logger=logger, accelerator="cpu",
               devices=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback, SlowValidation(clock)], **trainer_kw).fit(module, datamodule=dm)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload()
    scalars = {name: [e.value for e in acc.Scalars(f"throughput/{name}")] for name in NAMES
               if f"throughput/{name}" in acc.Tags()["scalars"]}
    return module, dm, scalars


def counted_flops_per_token(module: LitTransformerLM, dm) -> float:
    """FLOPs of forward, loss and backward on one training batch, by FlopCounterMode, per token."""
    batch = next(iter(dm.train_dataloader()))
    counter = FlopCounterMode(display=False)
    with counter:
        logits = module.model(batch["input_ids"])
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["input_ids"].numel()


def test_scalars_mfu_and_flops_with_a_given_peak(tmp_path, monkeypatch):
    module, dm, s = fit(tmp_path, ThroughputCallback(peak_flops=1e9), max_steps=5, monkeypatch=monkeypatch)
    assert set(s) == set(NAMES)
    assert all(len(v) == 4 for v in s.values()), s  # steps 2..5: the first step counts the FLOPs
    assert all(x > 0 for v in s.values() for x in v)
    assert s["peak_flops"] == [1e9] * 4 and s["tokens_per_s_total"] == s["tokens_per_s"]  # one process
    assert s["flops_per_token"][0] == pytest.approx(counted_flops_per_token(module, dm), rel=1e-6)
    for tps, mfu, total, fpt in zip(s["tokens_per_s"], s["mfu"], s["mfu_total"], s["flops_per_token"]):
        assert mfu == pytest.approx(tps * fpt / 1e9, rel=1e-5) and total == pytest.approx(mfu, rel=1e-5)
    # the windows across the validations (each PAUSE s long on the callback's clock) leave them out:
    # with them, a step's rate would be at most one batch of tokens per PAUSE seconds
    batch_tokens = 16 * next(iter(dm.train_dataloader()))["input_ids"].shape[1]
    assert min(s["tokens_per_s"]) > 100 * batch_tokens / PAUSE, (s["tokens_per_s"], batch_tokens)


def test_measured_peak_is_the_matmul_rate(tmp_path, monkeypatch):
    _, _, s = fit(tmp_path, ThroughputCallback(matmul_size=256), max_steps=3, monkeypatch=monkeypatch)
    assert len(s["peak_flops"]) == 2 and len(set(s["peak_flops"])) == 1  # measured once
    assert 1e8 < s["peak_flops"][0] < 1e14  # a CPU's GFLOP/s, whatever the load
    for tps, mfu, fpt, peak in zip(s["tokens_per_s"], s["mfu"], s["flops_per_token"], s["peak_flops"]):
        assert mfu == pytest.approx(tps * fpt / peak, rel=1e-5)


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path, monkeypatch):
    emitted = []
    module, dm, s = fit(tmp_path, ThroughputCallback(peak_flops=1e9), max_steps=3, monkeypatch=monkeypatch,
                        emitted=emitted, accumulate_grad_batches=2)
    # batch 1 (half of step 1) is counted, then one point per optimizer step: batches 2, 4, 6
    assert len(emitted) == 3 and [len(v) for v in s.values()] == [3] * len(NAMES)
    assert s["flops_per_token"][0] == pytest.approx(counted_flops_per_token(module, dm), rel=1e-6)


def test_helpers():
    assert [compute_dtype(p) for p in ("32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", 32)] == [
        torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.bfloat16, torch.float32]
    assert matmul_flops("cpu", torch.float32, n=128, reps=2) > 0
    with pytest.raises(ValueError, match="peak_flops"):
        ThroughputCallback(peak_flops=0)


@pytest.mark.slow
def test_ddp_totals_sum_the_processes(run_cli, quickstart_tiny, tmp_path):
    """Two DDP processes (gloo) through the command line: the totals are sums over the ranks."""
    proc = run_cli(["fit", *quickstart_tiny, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                    "--trainer.callbacks",  # this callback instead of the config's (ICL measures: slow)
                    '[{"class_path": "lit_icl.throughput.ThroughputCallback", "init_args": {"peak_flops": 1e9}}]'],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (events,) = (tmp_path / "lightning_logs").glob("*/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0}).Reload()
    s = {name: [e.value for e in acc.Scalars(f"throughput/{name}")] for name in NAMES}
    assert len(s["tokens_per_s"]) == 3
    for tps, total, mfu, mfu_total, fpt in zip(s["tokens_per_s"], s["tokens_per_s_total"], s["mfu"],
                                               s["mfu_total"], s["flops_per_token"]):
        assert total > 1.2 * tps  # rank 0's rate plus rank 1's
        assert mfu == pytest.approx(tps * fpt / 1e9, rel=1e-5)
        assert mfu_total == pytest.approx(total * fpt / 2e9, rel=1e-5)  # both ranks' FLOPs / both peaks
