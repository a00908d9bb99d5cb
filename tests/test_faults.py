"""Faults a long run must survive: kill -9 then resume, non-finite loss, a dying DDP rank."""
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_icl.files import load_checkpoint
from tests.conftest import LIT_ICL, ROOT

FAST = [  # a tiny quickstart: ~100 steps/s, checkpoint every 20 steps
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.config.n_layer", "1",
    "--data.init_args.num_train", "640", "--data.init_args.num_val", "16", "--data.init_args.batch_size", "8",
    "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "0",
    "--trainer.max_time", "null", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.callbacks", "[]", "--checkpoint.every_n_train_steps", "20", "--trainer.logger", "false",
]


def env():
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def fit(args, cwd, **kw):
    return subprocess.run([str(LIT_ICL), "fit", *FAST, *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=300, **kw)


def weights(path):
    return load_checkpoint(path)["state_dict"]


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = ["--trainer.max_steps", "400"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = fit(steps, tmp_path / "a")
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen([str(LIT_ICL), "fit", *FAST, *steps], cwd=tmp_path / "b", env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "b" / "checkpoints" / "version_0" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.2))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    for ckpt in (tmp_path / "b" / "checkpoints" / "version_0").glob("*.ckpt"):  # nothing on disk is corrupt
        load_checkpoint(ckpt)
    killed_at = load_checkpoint(last)["global_step"]
    assert 20 <= killed_at < 400

    resumed = fit([*steps, "--ckpt_path", "last"], tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end = load_checkpoint(last)
    assert end["global_step"] == 400
    # deterministic run (seeded, no dropout, data order from (seed, epoch) only): bitwise equal
    ref = weights(tmp_path / "a" / "checkpoints" / "version_0" / "last.ckpt")
    assert all(torch.equal(end["state_dict"][k], ref[k]) for k in ref)


def poisoned(tmp_path, mode):
    from lit_icl.data import AssociativeRecallDataModule
    from lit_icl.model import TransformerConfig
    from lit_icl.module import LitTransformerLM
    from tests.faults import PoisonWeightsAt

    dm = AssociativeRecallDataModule(n_pairs=2, n_keys=4, n_values=4, n_queries=2, num_train=64, num_val=8, batch_size=8)
    torch.manual_seed(0)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=1, n_head=2, n_embd=8,
                                                block_size=16), on_nonfinite=mode)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=6, max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[ckpt, PoisonWeightsAt(3)], default_root_dir=tmp_path)
    return trainer, module, dm


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from lit_icl.module import NonFiniteLossError

    trainer, module, dm = poisoned(tmp_path, "stop")
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        trainer.fit(module, datamodule=dm)
    good = load_checkpoint(tmp_path / "last.ckpt")
    assert good["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values() if t.is_floating_point())


def test_nonfinite_loss_skip_mode_skips_the_step(tmp_path):
    """One NaN loss at step 3 with on_nonfinite="skip": no update there, training goes on."""
    trainer, module, dm = poisoned(tmp_path, "skip")
    trainer.callbacks = [c for c in trainer.callbacks if type(c).__name__ != "PoisonWeightsAt"]
    real, snapshots = module._logits_and_loss, {}

    def flaky(batch):
        logits, loss = real(batch)
        snapshots[trainer.global_step] = module.model.wte.weight.detach().clone()
        return logits, loss * float("nan") if trainer.global_step == 3 else loss

    module._logits_and_loss = flaky
    with pytest.warns(UserWarning, match="non-finite training loss at step 3: step skipped"):
        trainer.fit(module, datamodule=dm)
    assert torch.equal(snapshots[3], snapshots[4]), "the NaN step made no update"
    assert not torch.equal(snapshots[4], snapshots[5]), "training went on"
    assert torch.isfinite(module.model.wte.weight).all()


def test_nonfinite_loss_on_the_command_line(tmp_path):
    proc = fit(["--trainer.max_steps", "30", "--trainer.callbacks",
                '[{"class_path": "tests.faults.PoisonWeightsAt", "init_args": {"step": 25}}]'], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "lit-icl: error: non-finite training loss (nan) at step 25" in proc.stderr
    assert load_checkpoint(tmp_path / "checkpoints" / "version_0" / "last.ckpt")["global_step"] == 20


@pytest.mark.slow
def test_a_dying_ddp_rank_ends_the_job_promptly(tmp_path):
    start = time.time()
    proc = fit(["--trainer.max_steps", "400", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                "--trainer.accelerator", "cpu", "--trainer.callbacks",
                '[{"class_path": "tests.faults.KillRankAt", "init_args": {"step": 10, "rank": 1}}]'], tmp_path)
    assert proc.returncode != 0
    assert time.time() - start < 90, "the job hung instead of ending when rank 1 died"
