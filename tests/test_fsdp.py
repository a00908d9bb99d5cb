"""Sharded training (--trainer.strategy fsdp2, lit_icl.strategies) on 2 CPU processes: the same
training and the same ICL figures as DDP, sharded checkpoints that resume after kill -9 and
consolidate into the usual file; bf16-mixed and a compiled model end to end."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_icl.files import load_checkpoint
from lit_icl.module import LitTransformerLM
from lit_icl.strategies import consolidate_checkpoint, is_sharded_checkpoint
from tests.conftest import LIT_ICL
from tests.test_faults import FAST, env, fit

HERE = Path(__file__).parent


def worker(strategy: str, precision: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "fsdp_worker.py"), "2", strategy, precision, str(out), *extra],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_sharded_training_and_measures_equal_ddp(tmp_path):
    """Float64: 4 steps of AdamW and then the task comparison and the text measures (on each
    rank's unsharded copy of the sharded weights) give DDP's weights and figures to rounding;
    the sharded run also recomputes its activations (activation checkpointing)."""
    ddp = worker("ddp", "64-true", tmp_path / "ddp.pt")
    sharded = worker("fsdp2", "64-true", tmp_path / "fsdp2.pt", "ac")
    assert ddp["weights"].keys() == sharded["weights"].keys()
    for name, w in ddp["weights"].items():
        assert sharded["weights"][name].dtype == torch.float64
        torch.testing.assert_close(sharded["weights"][name], w, rtol=1e-12, atol=1e-13, msg=name)
    assert ddp["icl"].keys() == sharded["icl"].keys() == {0, 2, 4}
    for k, row in ddp["icl"].items():
        for name, v in row.items():
            assert sharded["icl"][k][name] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), (k, name)
    assert ddp["icl"][4]["max_abs_logit_diff"] < 1e-12  # converted = prompted on the copy too
    for name, v in ddp["text"].items():
        if name != "seconds":
            assert sharded["text"][name] == pytest.approx(v, rel=1e-9, abs=1e-12), name


SHARDED = ["--trainer.devices", "2", "--trainer.strategy", "fsdp2"]


@pytest.mark.slow
def test_sharded_run_killed_resumes_exactly_and_consolidates(tmp_path):
    """kill -9 rank 1 of a 2-process sharded run after a checkpoint; --ckpt_path last resumes it
    from the checkpoint folder and ends with the uninterrupted run's weights, bitwise. The folder
    consolidates into one file that loads, converts and generates like a DDP run's."""
    steps = ["--trainer.max_steps", "40"]  # a multiple of the checkpoint interval (20): last.ckpt holds step 40
    kill = '[{"class_path": "tests.faults.KillRankAt", "init_args": {"step": 30, "rank": 1}}]'
    full = fit([*SHARDED, *steps, "--checkpoint.dirpath", str(tmp_path / "full")], tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    run = [*SHARDED, *steps, "--checkpoint.dirpath", str(tmp_path / "run")]
    killed = fit([*run, "--trainer.callbacks", kill], tmp_path)
    assert killed.returncode != 0, "the run finished before it could be killed"
    last = tmp_path / "run" / "last.ckpt"
    assert is_sharded_checkpoint(last) and load_checkpoint(last)["global_step"] == 20
    resumed = fit([*run, "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end, ref = load_checkpoint(last), load_checkpoint(tmp_path / "full" / "last.ckpt")
    assert end["global_step"] == ref["global_step"] == 40 and end["state_dict"].keys() == ref["state_dict"].keys()
    assert all(torch.equal(end["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])

    one = consolidate_checkpoint(last, tmp_path / "one.ckpt")
    module = LitTransformerLM.load_from_checkpoint(one)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in ref["state_dict"].items())
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        consolidate_checkpoint(one, tmp_path / "again.ckpt")
    gen = subprocess.run([str(LIT_ICL), "generate", "--ckpt", str(last), "--input_ids", "[1, 2, 3]",
                          "--max_new_tokens", "2"], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_bf16_mixed_end_to_end(tmp_path, run_cli, quickstart_tiny):
    """bf16-mixed trains (autocast), the ICL comparison runs (outside autocast: in float32, so the
    conversion stays exact to float32 rounding), the checkpoint keeps float32 weights."""
    proc = run_cli(["fit", *quickstart_tiny, "--trainer.precision", "bf16-mixed",
                    "--trainer.callbacks.init_args.num_episodes", "16"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    assert len(logged["icl/prompted_acc/k=4"]) == 2 and max(logged["icl/rel_logit_err/k=4"]) < 1e-5
    assert len(logged["val/loss"]) == 2 and all(0 < v < 10 for v in logged["val/loss"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "version_0" / "last.ckpt")
    assert ckpt["global_step"] == 4 and all(v.dtype == torch.float32 for v in ckpt["state_dict"].values()
                                            if v.is_floating_point())


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """--model.compile true: the model's forward is compiled (torch.compile) for training, the
    weights keep their names, and 3 steps end near the eager run's weights (float32)."""
    steps = ["--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "3"]
    eager = fit([*steps, "--checkpoint.dirpath", str(tmp_path / "eager")], tmp_path)
    compiled = fit([*steps, "--model.compile", "true", "--checkpoint.dirpath", str(tmp_path / "compiled")], tmp_path)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-3000:]
    a, b = (load_checkpoint(tmp_path / d / "last.ckpt") for d in ("eager", "compiled"))
    assert b["hyper_parameters"]["compile"] is True and a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_strategy_refusals(tmp_path):
    """Sharded strategies the measures cannot gather are refused at setup, naming fsdp2."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lit_icl.callbacks import ICLConversionCallback

    class FakeTrainer:
        strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)

    with pytest.raises(ValueError, match="fsdp2"):
        ICLConversionCallback(shots=[0]).setup(FakeTrainer(), None, "fit")
    assert "fsdp2" in pl.strategies.StrategyRegistry


@pytest.mark.slow
def test_meta_init_draws_each_shard_where_it_lives(tmp_path):
    """meta_init under fsdp2: the model is built without memory and each process draws its own
    shards after sharding; the head stays tied, the shards differ, training and the exact
    conversion work as usual."""
    run = worker("fsdp2", "32-true", tmp_path / "meta.pt", "meta")
    assert run["tied"] and 0 < run["val_loss"] < 10
    wte = run["weights"]["wte.weight"]
    half = wte.shape[0] // 2
    assert not torch.allclose(wte[:half], wte[half : 2 * half], atol=1e-3), "the two ranks drew different shards"
    assert 0.01 < float(wte.std()) < 0.05  # normal(0, 0.02) after 4 small steps
    assert run["icl"][4]["rel_logit_err"] < 1e-5


def test_meta_init_on_one_process(tiny_config, tiny_data):
    import lightning.pytorch as pl

    module = LitTransformerLM(tiny_config, meta_init=True)
    assert all(p.is_meta for p in module.parameters())
    from lit_icl.callbacks import ICLConversionCallback

    icl = ICLConversionCallback(shots=[0, 2], num_episodes=8, untrained_baseline=True)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, val_check_interval=2, limit_val_batches=1, callbacks=[icl])
    trainer.fit(module, datamodule=tiny_data)
    assert icl.results[2]["rel_logit_err"] < 1e-5 and "prompted_acc_untrained" in icl.results[2]
    assert not any(p.is_meta for p in module.parameters()) and all(torch.isfinite(p).all() for p in module.parameters())
    assert module.model.lm_head.weight is module.model.wte.weight
    with pytest.raises(ValueError, match="meta_init"):
        LitTransformerLM(tiny_config, pretrained="smollm2-135m", meta_init=True)
