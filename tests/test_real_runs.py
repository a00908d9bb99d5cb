"""Real runs never lose work: ICL settings that cannot work stop the run before training, a
failing ICL evaluation costs no trained steps, and every run has its own checkpoint folder."""

import logging
import time

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_icl import evaluation as evaluation_module
from lit_icl.callbacks import ICLConversionCallback
from lit_icl.cli import main
from lit_icl.data.episodes import Episodes
from lit_icl.files import load_checkpoint
from lit_icl.module import LitTransformerLM
from tests.conftest import ROOT, TINY_OVERRIDES
from tests.textdata import write_classification, write_corpus


def template_config(tmp_path, block_size: int, shots: list[int], too_long: str = "error"):
    """configs/templates.yaml on a corpus and a task written here, shrunk to a tiny model."""
    config = yaml.safe_load((ROOT / "configs" / "templates.yaml").read_text())
    callback = config["trainer"]["callbacks"][0]["init_args"]
    callback.update(shots=shots, num_episodes=8, batch_size=8, too_long=too_long)
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False)
    config["model"]["config"].update(n_layer=1, n_head=2, n_embd=16, block_size=block_size)
    config["model"]["warmup_steps"] = 1
    data = config["data"]["init_args"]
    data.update(corpus=str(write_corpus(tmp_path / "corpus.txt")), block_size=16, vocab_size=300, batch_size=4,
                cache_dir=str(tmp_path / "cache"), val_fraction=0.1, num_heldout=8)
    data["templates"][0].update(name="toy", source=str(write_classification(tmp_path / "task", train=60)),
                                config_name=None, verbalizer={0: "cat", 1: "dog"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_too_long_prompt_stops_the_run_before_training(tmp_path, run_cli):
    config = template_config(tmp_path, block_size=128, shots=[0, 8])
    start = time.perf_counter()
    proc = run_cli(["fit", "--config", config, "--trainer.logger", "false"], cwd=tmp_path)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1]
    assert lines[0].startswith("lit-icl: error: ICLConversionCallback: task 'toy', 8 shots: "
                                                    "the longest prompt is "), proc.stderr
    assert "more than block_size=128" in lines[0] and "too_long: drop" in lines[0]
    assert not list(tmp_path.glob("checkpoints/*/*.ckpt")), "nothing was trained"
    assert seconds < 120  # start-up and the check; a few seconds on an idle 2-core machine


def test_drop_longest_keeps_order_and_fits():
    demos = [[[1, 2], [3, 4, 5, 6], [7]], [[8]]]
    episodes = Episodes.from_lists(demos, [[9, 9], [9]], [10, 11], [10, 11], pad_id=0)
    assert episodes.prompt_lengths.tolist() == [9, 2]
    fitted, dropped = episodes.drop_longest(6)
    assert dropped == 1 and fitted.prompt_lengths.tolist() == [5, 2]
    assert fitted.demo_ids[0, -3:].tolist() == [1, 2, 7] and fitted.demonstrations()[0].shape == (2, 2, 2)
    assert episodes.drop_longest(9) == (episodes, 0)
    with pytest.raises(ValueError, match=r"a query of 2 tokens \(and its answer\) alone is longer than 1 tokens"):
        episodes.drop_longest(1)


def test_too_long_drop_evaluates_within_block_size(tmp_path, caplog):
    from lit_icl.data import TextDataModule

    config = yaml.safe_load(template_config(tmp_path, block_size=128, shots=[0, 8], too_long="drop").read_text())
    dm = TextDataModule(**{k: v for k, v in config["data"]["init_args"].items()})
    dm.setup("validate")
    callback = ICLConversionCallback(shots=[0, 8], num_episodes=8, batch_size=8, too_long="drop")
    with caplog.at_level(logging.INFO):
        callback.prepare(dm, block_size=128)
    (task,) = dm.heldout_tasks()  # one task: keyed by its name, logged without it
    assert callback.dropped[(task, 8)] > 0 and not callback.name_tasks
    assert int(callback.episodes[(task, 8)].prompt_lengths.max()) <= 128
    assert f"dropped {callback.dropped[(task, 8)]} of 64 demonstrations" in caplog.text


class DuplicateCandidates(pl.LightningDataModule):
    """A user's DataModule whose two label words begin with the same token."""

    def heldout_episodes(self, n_shots, num_episodes=None):
        return Episodes.from_lists([[[1, 2]] * n_shots] * 2, [[3], [3]], [5, 5], [5, 5])


def test_duplicate_candidates_and_missing_shots_are_refused(tiny_data):
    with pytest.raises(ValueError, match=r"candidate answers \[5, 5\] are not distinct tokens"):
        ICLConversionCallback(shots=[1]).prepare(DuplicateCandidates(), block_size=32)
    with pytest.raises(ValueError, match="ICLConversionCallback: task 'recall', 9 shots: heldout_episodes: n_shots"):
        ICLConversionCallback(shots=[2, 9]).prepare(tiny_data, block_size=32)
    with pytest.raises(ValueError, match="needs a DataModule with heldout_episodes"):
        ICLConversionCallback().prepare(pl.LightningDataModule(), block_size=32)


def test_failing_evaluation_costs_no_training(tmp_path, tiny_data, tiny_config, monkeypatch, caplog):
    """The second of three evaluations raises: training goes on, every checkpoint is written,
    icl/failed is 1 for that validation and 0 for the others, and the user reads one line."""
    real = evaluation_module.EpisodeRuns
    calls = []

    def flaky(model, episodes, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the first group of the second evaluation (4 shot counts each)
            raise RuntimeError("injected failure")
        return real(model, episodes, *args, **kwargs)

    monkeypatch.setattr(evaluation_module, "EpisodeRuns", flaky)
    failed = []

    class Watch(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            failed.append(float(trainer.callback_metrics["icl/failed"]))

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)
    callback = ICLConversionCallback(shots=[0, 1, 2, 3], batch_size=64)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, val_check_interval=2, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[callback, checkpoint, Watch()])
    with caplog.at_level(logging.WARNING):
        trainer.fit(LitTransformerLM(tiny_config), datamodule=tiny_data)
    assert trainer.global_step == 6 and failed == [0.0, 1.0, 0.0]
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert load_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"))["global_step"] == 6
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert lines == ["icl: the evaluation at step 4 failed (RuntimeError: injected failure); training goes on "
                     "and icl/failed=1 is logged (LIT_ICL_DEBUG=1 raises instead)"]


def test_failing_evaluation_is_raised_by_validate(tiny_data, tiny_config, make_trainer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(evaluation_module, "EpisodeRuns", broken)
    trainer = make_trainer(callbacks=[ICLConversionCallback(shots=[1])], limit_val_batches=1)
    with pytest.raises(RuntimeError, match="injected failure"):
        trainer.validate(LitTransformerLM(tiny_config), datamodule=tiny_data)


def cli(args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def test_each_run_has_its_own_folder_and_resumes_its_own_last(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--config", ROOT / "configs" / "quickstart.yaml", *TINY_OVERRIDES]
    assert cli(["fit", *tiny]) == 0
    assert cli(["fit", *tiny, "--run_name", "mine", "--trainer.max_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "lit-icl: run version_0: checkpoints in " in out and "lit-icl: run mine: checkpoints in " in out
    runs = {p.name: sorted(c.name for c in p.iterdir()) for p in (tmp_path / "checkpoints").iterdir()}
    assert runs == {"version_0": ["epoch=0-step=4.ckpt", "last.ckpt"], "mine": ["epoch=0-step=2.ckpt", "last.ckpt"]}
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["mine", "version_0"]

    # Each resume continues its own run, in its own folder, and nothing else changes.
    assert cli(["fit", *tiny, "--run_name", "version_0", "--ckpt_path", "last", "--trainer.max_steps", "6"]) == 0
    assert load_checkpoint(str(tmp_path / "checkpoints/version_0/last.ckpt"))["global_step"] == 6
    assert load_checkpoint(str(tmp_path / "checkpoints/mine/last.ckpt"))["global_step"] == 2
    assert cli(["fit", *tiny, "--ckpt_path", "last", "--trainer.max_steps", "8"]) == 0  # the newest: version_0
    assert load_checkpoint(str(tmp_path / "checkpoints/version_0/last.ckpt"))["global_step"] == 8
    assert cli(["fit", *tiny, "--run_name", "mine", "--ckpt_path", "last", "--trainer.max_steps", "4"]) == 0
    assert load_checkpoint(str(tmp_path / "checkpoints/mine/last.ckpt"))["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["mine", "version_0"]
    capsys.readouterr()

    # A new run never writes beside another run's files.
    assert cli(["fit", *tiny, "--run_name", "mine"]) == 2
    assert "run 'mine' already has checkpoints in checkpoints/mine/" in capsys.readouterr().err
    assert cli(["fit", *tiny, "--run_name", "other", "--ckpt_path", "last"]) == 2
    assert "run 'other' has no checkpoints/other/last.ckpt to resume" in capsys.readouterr().err
    assert cli(["fit", *tiny]) == 0 and (tmp_path / "checkpoints/version_1/last.ckpt").is_file()


def test_progress_bar_title_of_a_step_bounded_run():
    from lit_icl.cli import StepsProgressBar

    if StepsProgressBar is None:
        pytest.skip("rich is not installed: Lightning's TQDM bar is used and titles 'Epoch N' itself")
    bar = StepsProgressBar()
    bar._trainer = pl.Trainer(max_steps=10, logger=False, enable_checkpointing=False, callbacks=[bar])
    assert bar._get_train_description(0).strip() == "Epoch 0"
    bar._trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, callbacks=[StepsProgressBar()])
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_model_summary_counts_flops(tiny_config):
    from lightning.pytorch.utilities.model_summary import ModelSummary

    module = LitTransformerLM(tiny_config)
    assert module.example_input_array.shape == (1, tiny_config.block_size)
    assert ModelSummary(module).total_flops > 0
    torch.testing.assert_close(module(module.example_input_array), module.model(module.example_input_array))
