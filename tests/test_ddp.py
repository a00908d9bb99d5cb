"""Data-parallel training on CPU: two DDP processes (gloo) through the lit-icl command line."""

import time

import pytest
import torch

from lit_icl.module import LitTransformerLM


@pytest.mark.slow
def test_cli_fit_ddp_two_cpu_processes(run_cli, quickstart_tiny, tmp_path):
    start = time.monotonic()
    proc = run_cli(
        ["fit", *quickstart_tiny, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.max_steps", "6"],
        cwd=tmp_path,
    )  # returns once both ranks closed the inherited output pipes, i.e. both processes ended
    # (max_steps is a multiple of val_check_interval=2, so last.ckpt is saved after the final step)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in proc.stderr + proc.stdout
    last = tmp_path / "checkpoints" / "version_0" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert LitTransformerLM.load_from_checkpoint(last).config.n_embd == 32
    assert time.monotonic() - start < 60
