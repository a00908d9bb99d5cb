"""Faults a long run must survive: kill -9 then resume, non-finite loss, a dying DDP rank."""
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
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


def fit(args, cwd, config=FAST, **kw):
    return subprocess.run([str(LIT_ICL), "fit", *config, *args], cwd=cwd, env=env(), capture_output=True,
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
    real, snapshots = module._loss_and_predictions, {}

    def flaky(batch):
        loss, predicted = real(batch)
        snapshots[trainer.global_step] = module.model.wte.weight.detach().clone()
        return loss * float("nan") if trainer.global_step == 3 else loss, predicted

    module._loss_and_predictions = flaky
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


def text_fast(tmp_path):
    """A tiny text run: a 1-layer momentum LM on a 40-paragraph corpus the test writes, 16-token
    blocks, batches of 16 (about 9 steps an epoch), a checkpoint every 5 steps."""
    from tests.textdata import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=40)
    return [
        "--config", str(ROOT / "configs" / "text_momentum.yaml"), "--seed_everything", "0",
        "--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.config.n_layer", "1",
        "--model.config.block_size", "16", "--model.warmup_steps", "5",
        "--data.init_args.corpus", str(corpus), "--data.init_args.cache_dir", str(tmp_path / "cache"),
        "--data.init_args.block_size", "16", "--data.init_args.vocab_size", "300",
        "--data.init_args.val_fraction", "0.1", "--data.init_args.batch_size", "16",
        "--trainer.accelerator", "cpu", "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.logger", "false", "--checkpoint.every_n_train_steps", "5",
    ]


@pytest.mark.slow
def test_text_run_killed_mid_epoch_resumes_exactly(tmp_path):
    """kill -9 a text run two steps after a checkpoint taken in the middle of an epoch; resumed
    with --ckpt_path last it ends with the uninterrupted run's weights, bitwise."""
    config, steps = text_fast(tmp_path), ["--trainer.max_steps", "30"]
    run = [*steps, "--checkpoint.dirpath", str(tmp_path / "run")]
    kill = '[{"class_path": "tests.faults.KillRankAt", "init_args": {"step": 17, "rank": 0}}]'
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted and the killed run side by side
        full, killed = pool.map(lambda args: fit(args, tmp_path, config), [
            [*steps, "--checkpoint.dirpath", str(tmp_path / "full")], [*run, "--trainer.callbacks", kill]])
    assert full.returncode == 0, full.stderr[-2000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = load_checkpoint(tmp_path / "run" / "last.ckpt")
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # what Lightning saved
    assert saved["global_step"] == 15 and position["epoch"] >= 1 and position["batches"] > 0, position

    resumed = fit([*run, "--ckpt_path", "last"], tmp_path, config)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end, ref = load_checkpoint(tmp_path / "run" / "last.ckpt"), weights(tmp_path / "full" / "last.ckpt")
    assert end["global_step"] == 30
    assert all(torch.equal(end["state_dict"][k], ref[k]) for k in ref)
