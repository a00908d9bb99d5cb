"""The text measures of in-context learning (lit_icl.text_icl): the per-position loss, the ICL
score, prefix conversion on documents for every attention kind, and TextICLCallback in a real
Trainer (TensorBoard event files, fail-fast checks, a failure that costs no training, the
task comparison beside it, and two DDP processes giving the one-process figures)."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.data import AssociativeRecallDataModule
from lit_icl.data.text import TextDataModule
from lit_icl.module import LitTransformerLM
from lit_icl.text_icl import (TextICLCallback, TextICLMetrics, converted_losses, default_positions, icl_score,
                              log_bins, token_losses)
from tests.conftest import HYBRIDS, exact_grid, model_config, setting_id, tiny_model
from tests.textdata import write_corpus

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def documents(vocab: int = 40, n: int = 3, length: int = 21, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", exact_grid(), ids=setting_id)
def test_converted_prefix_loses_nothing_float64(kw):
    """The loss of a document's rest on its converted prefix is its loss in the whole document."""
    model, docs = tiny_model(torch.float64, **kw), documents()
    with torch.no_grad():
        whole = token_losses(model, docs)
        for prefix in (1, 7, 19):
            rest = converted_losses(model, docs, prefix)
            assert rest.shape == (3, 20 - prefix)
            torch.testing.assert_close(rest, whole[:, prefix:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ["linear", "softmax", "gla", "deltanet", *HYBRIDS], ids=setting_id)
def test_converted_prefix_float32(attention):
    model, docs = tiny_model(torch.float32, attention=attention, momentum=0.5, position="rope"), documents()
    with torch.no_grad():
        torch.testing.assert_close(converted_losses(model, docs, 9), token_losses(model, docs)[:, 9:],
                                   rtol=1e-5, atol=1e-5)


def test_approximate_modes_lose_information():
    """ICLAA's prf and taylor states are not the KV prefix: their rest loss differs visibly."""
    model, docs = tiny_model(torch.float64, attention="softmax"), documents()
    for block in model.blocks:  # scores of order one, where exp is not its Taylor expansion
        block.attn.q_proj.weight.data *= 20
        block.attn.k_proj.weight.data *= 20
    with torch.no_grad():
        whole = token_losses(model, docs)[:, 10:]
        for mode in ("taylor", "prf"):
            gap = (converted_losses(model, docs, 10, mode=mode, num_features=64) - whole).abs().max()
            assert gap > 1e-3, mode


def test_bins_positions_and_score():
    assert log_bins(256) == [(1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255), (256, 256)]
    assert log_bins(300)[-1] == (256, 300) and log_bins(5) == [(1, 1), (2, 3), (4, 5)]
    assert default_positions(1024) == (50, 500) and default_positions(500) == (50, 500)
    assert default_positions(256) == (25, 256) and default_positions(5) == (1, 5)
    assert icl_score(torch.tensor([5.0, 4.0, 3.0, 2.5]), 2, 4) == pytest.approx(-1.5)
    loss = torch.arange(1.0, 301.0)  # loss t at position t
    assert icl_score(loss, 10, 100, window=0.1) == pytest.approx(90.0)  # 9..11 and 90..110, both centred
    assert icl_score(loss, 10, 300, window=0.1) == pytest.approx(285.0 - 10.0)  # 270..300: cut at the end
    assert icl_score(loss, 10, 300, window=0.05) == pytest.approx(292.5 - 10.0)  # 285..300; 10 alone


def test_metric_sums_do_not_depend_on_batching():
    model, docs = tiny_model(torch.float64), documents(n=6)
    whole, rest = token_losses(model, docs).detach(), converted_losses(model, docs, 5).detach()
    one, two = TextICLMetrics(20, ["converted"]), TextICLMetrics(20, ["converted"])
    one.update(whole, {"converted": rest})
    for sl in (slice(0, 2), slice(2, 6)):
        two.update(whole[sl], {"converted": rest[sl]})
    a, b = one.compute(), two.compute()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a["loss_at"], whole.mean(0))
    assert float(a["converted_max"]) < 1e-10


class RecallWithDocuments(AssociativeRecallDataModule):
    """Associative recall episodes (for the task comparison) plus held-out documents (for the
    text measures): any DataModule joins the text measures through heldout_documents."""

    def heldout_documents(self, num_documents: int) -> torch.Tensor:
        return documents(self.vocab_size, num_documents, 33, seed=1)


def recall_run(tmp_path, callbacks, steps=4, logger=False):
    dm = RecallWithDocuments(n_pairs=4, n_keys=8, n_values=8, n_queries=2, num_train=64, num_val=16,
                             num_heldout=16, batch_size=16)
    torch.manual_seed(0)
    module = LitTransformerLM(model_config(dm.vocab_size, block_size=32, chunk_size=32, attention=["linear", "softmax"]))
    trainer = pl.Trainer(max_steps=steps, val_check_interval=2, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path, callbacks=callbacks)
    return trainer, module, dm


def test_with_the_task_comparison_in_one_run(tmp_path):
    text = TextICLCallback(num_documents=6, batch_size=4, positions=(2, 30), window=0.2)
    tasks = ICLConversionCallback(shots=[0, 2])
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer, module, dm = recall_run(tmp_path, [text, tasks], logger=logger)
    trainer.fit(module, datamodule=dm)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("icl/text/score", "icl/text/loss_at/16", "icl/text/converted_loss_diff",
                "icl/text/converted_taylor_loss_diff", "icl/prompted_acc/k=2", "icl/failed", "icl/text/failed"):
        assert len(acc.Scalars(tag)) == 2, tag
    assert {"icl/text/loss_vs_position", "icl/accuracy_vs_shots"} <= set(tags["images"])
    r = text.results
    assert abs(r["converted_loss_diff"]) < 1e-5 and r["converted_max_abs_diff"] < 1e-4  # float32, exact mode
    assert r["score"] == pytest.approx(r["loss_late"] - r["loss_early"])
    assert len(text.history) == 2 and len(text.history[-1][1]) == 32


def test_fails_fast(tmp_path):
    with pytest.raises(ValueError, match=r"positions \(2, 40\) do not fit .* 32 positions"):
        trainer, module, dm = recall_run(tmp_path, [TextICLCallback(positions=(2, 40))])
        trainer.fit(module, datamodule=dm)
    with pytest.raises(ValueError, match="prefix=32 leaves no token"):
        trainer, module, dm = recall_run(tmp_path, [TextICLCallback(prefix=32)])
        trainer.fit(module, datamodule=dm)
    plain = AssociativeRecallDataModule(n_pairs=4, n_keys=8, n_values=8, num_train=32, num_val=8, batch_size=8)
    trainer, module, _ = recall_run(tmp_path, [TextICLCallback()])
    with pytest.raises(ValueError, match="needs a DataModule with heldout_documents"):
        trainer.fit(module, datamodule=plain)
    for bad in (dict(positions=(5, 5)), dict(num_documents=0), dict(prefix=0), dict(approximate_modes=["exp"]),
                dict(window=1.0)):
        with pytest.raises(ValueError):
            TextICLCallback(**bad)


def test_a_failing_measurement_costs_no_training(tmp_path, caplog):
    """Out-of-vocabulary documents before the second measurement: a real failure of the model,
    reported in one line; training and the other measurements go on."""
    text = TextICLCallback(num_documents=4, positions=(2, 30), approximate_modes=[])
    failed = []

    class Break(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            failed.append(float(trainer.callback_metrics["icl/text/failed"]))
            if len(failed) == 1:
                text.documents = text.documents + 10_000
            elif len(failed) == 2:
                text.documents = text.documents - 10_000

    trainer, module, dm = recall_run(tmp_path, [text, Break()], steps=6)
    with caplog.at_level(logging.WARNING):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6 and failed == [0.0, 1.0, 0.0] and len(text.history) == 2
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("icl/text: the evaluation at step 4 failed (")


def test_text_datamodule_holds_out_contiguous_text(tmp_path):
    (tmp_path / "works").mkdir()
    for i in range(3):
        write_corpus(tmp_path / "works" / f"w{i}.txt", paragraphs=60, seed=i)
    args = dict(corpus=str(tmp_path / "works" / "*.txt"), block_size=16, vocab_size=300,
                cache_dir=str(tmp_path / "cache"), val_fraction=0.3)
    dm = TextDataModule(**args, val_by="file")
    docs = dm.heldout_documents(5)
    assert docs.shape == (5, 17) and dm.val_held.startswith("whole files: w")
    held = (tmp_path / "works" / dm.val_held.removeprefix("whole files: ")).read_text()
    text = dm.tokenizer.decode(docs[0].tolist(), skip_special_tokens=True)
    assert text.split()[1] in held  # a span of the held-out work
    assert TextDataModule(**args, val_by="auto").heldout_documents(3).shape == (3, 17)
    tail = TextDataModule(**args, val_by="tail")
    assert tail.heldout_documents(2).shape == (2, 17) and tail.val_held.startswith("the last ")
    with pytest.raises(ValueError, match="random 0.3 of its documents.*val_by file"):
        TextDataModule(**args).heldout_documents(2)
    with pytest.raises(ValueError, match="val_by: file needs a corpus of several local files"):
        TextDataModule(**{**args, "corpus": str(tmp_path / "works" / "w0.txt")}, val_by="file").heldout_documents(2)


def test_lit_icl_fit_on_the_corpus_config_writes_the_measures(tmp_path, run_cli):
    """configs/text_momentum.yaml has the text measures on: `lit-icl fit` on a corpus writes them
    to TensorBoard at each validation, with no extra flag."""
    for i in range(2):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        write_corpus(tmp_path / "corpus" / f"part{i}.txt", paragraphs=80, seed=i)
    proc = run_cli(["fit", "--config", ROOT / "configs" / "text_momentum.yaml",
                    "--data.init_args.corpus", str(tmp_path / "corpus" / "*.txt"), "--data.init_args.vocab_size", "300",
                    "--data.init_args.block_size", "32", "--model.config.block_size", "32",
                    "--data.init_args.cache_dir", tmp_path / "cache", "--model.config.n_layer", "2",
                    "--model.config.n_embd", "16", "--model.config.n_head", "2", "--data.init_args.batch_size", "4",
                    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                    "--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu", "--run_name", "t", "--checkpoint.dirpath", tmp_path / "ckpt",
                    "--trainer.logger.init_args.save_dir", tmp_path / "runs"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = EventAccumulator(str(tmp_path / "runs" / "t"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for tag in ("icl/text/score", "icl/text/loss_at/1", "icl/text/loss_at/16", "icl/text/converted_loss",
                "icl/text/prompted_loss", "icl/text/converted_loss_diff", "icl/text/seconds"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 3], tag
    assert len(acc.Images("icl/text/loss_vs_position")) == 2
    assert "ICL score is loss(32) - loss(3)" in proc.stderr  # the default positions, said
    for tag in ("throughput/tokens_per_s", "throughput/mfu"):  # the config's ThroughputCallback
        assert acc.Scalars(tag) and all(e.value > 0 for e in acc.Scalars(tag)), tag


@pytest.mark.slow
def test_ddp_two_processes_give_the_one_process_figures(tmp_path):
    out = {}
    for devices in (1, 2):
        path = tmp_path / f"text_{devices}.json"
        proc = subprocess.run([sys.executable, str(HERE / "text_icl_ddp_worker.py"), str(devices), str(path)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[devices] = json.loads(path.read_text())
    assert out[1].keys() == out[2].keys() and "converted_prf_loss" in out[1]
    assert out[1]["documents"] == out[2]["documents"] == 7  # each document measured once
    for name, value in out[1].items():
        if name == "seconds":
            continue
        # float64: a conversion difference is rounding itself (about 1e-16), which depends on batch shapes
        tol = 1e-12 if "diff" in name else 1e-9
        assert out[2][name] == pytest.approx(value, rel=1e-9, abs=tol), name
