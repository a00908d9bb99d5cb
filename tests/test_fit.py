"""Training end to end: Trainer.fit on a tiny model, and the lit-icl command line."""

import math

import lightning.pytorch as pl
import torch

from lit_icl.module import LitTransformerLM


class _RecordLoss(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_fit_smoke_loss_decreases(tiny_config, tiny_data, make_trainer):
    pl.seed_everything(0)
    record = _RecordLoss()
    module = LitTransformerLM(tiny_config, lr=1e-2, warmup_steps=5)
    trainer = make_trainer(max_steps=40, limit_train_batches=10, limit_val_batches=2, callbacks=[record])
    trainer.fit(module, tiny_data)
    assert trainer.global_step == 40 and len(record.losses) == 40
    assert all(math.isfinite(x) for x in record.losses)
    first, last = sum(record.losses[:5]) / 5, sum(record.losses[-5:]) / 5
    assert last < first - 0.3, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    assert math.isfinite(trainer.callback_metrics["val/loss"])


def test_cli_fit_writes_last_checkpoint(run_cli, quickstart_tiny, tmp_path):
    proc = run_cli(["fit", *quickstart_tiny], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "version_0" / "last.ckpt"
    assert last.is_file()
    assert (tmp_path / "lightning_logs" / "version_0" / "config.yaml").is_file()
    module = LitTransformerLM.load_from_checkpoint(last)
    assert (module.config.vocab_size, module.config.n_embd, module.config.n_head) == (65, 32, 2)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    proc = run_cli(["validate", *quickstart_tiny, "--ckpt_path", last], cwd=tmp_path)
    assert proc.returncode == 0 and "val/acc" in proc.stdout, proc.stderr[-3000:]


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert all(n in errors[0] for n in needles), errors[0]


def test_cli_bad_model_value_is_a_one_line_error(run_cli, quickstart_tiny, tmp_path):
    proc = run_cli(["fit", *quickstart_tiny, "--model.config.n_head", "3"], cwd=tmp_path)
    _assert_one_line_error(proc, "lit-icl: error:", "n_head=3")
    assert not (tmp_path / "checkpoints").exists()


def test_cli_bad_data_value_is_a_one_line_error(run_cli, quickstart_tiny, tmp_path):
    proc = run_cli(["fit", *quickstart_tiny, "--data.init_args.n_pairs", "40"], cwd=tmp_path)
    _assert_one_line_error(proc, "lit-icl: error:", "n_pairs=40 exceeds n_keys=32")


def test_cli_parse_error_is_a_one_line_error(run_cli, quickstart_tiny, tmp_path):
    proc = run_cli(["fit", *quickstart_tiny, "--model.config.n_layer", "two"], cwd=tmp_path)
    _assert_one_line_error(proc, "n_layer")
