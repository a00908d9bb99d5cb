"""Streaming a pre-tokenized corpus (lit_icl.data.streaming): `lit-icl data prepare` writes the
in-memory path's windows as litdata shards; StreamingTextDataModule streams exactly those windows,
resumes mid-epoch after kill -9, shards them across DDP ranks, and names a bad path in one line."""

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import lightning.pytorch as pl
import pytest
import torch
from tokenizers import Tokenizer

from lit_icl.cli import main
from lit_icl.data.streaming import StreamingTextDataModule, prepare
from lit_icl.data.text import TextDataModule
from lit_icl.data.tokenizer import checkpoint_tokenizer, tokenizer_sha
from lit_icl.files import load_checkpoint
from tests.conftest import LIT_ICL, ROOT
from tests.textdata import write_corpus

OPTIONS = dict(block_size=16, vocab_size=300, val_fraction=0.1, val_by="tail")


def env():
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 120-paragraph corpus prepared by the command (shards of 40 windows: 12 training chunks),
    and the in-memory TextDataModule of the same options on the same cache."""
    root = tmp_path_factory.mktemp("streaming")
    corpus = write_corpus(root / "corpus.txt")
    options = [arg for name, value in OPTIONS.items() for arg in (f"--{name}", str(value))]
    proc = subprocess.run([str(LIT_ICL), "data", "prepare", str(corpus), "--out", str(root / "shards"), *options,
                           "--cache_dir", str(root / "cache"), "--chunk_tokens", str(40 * 17), "--num_workers", "2"],
                          cwd=root, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {root / 'shards'}: " in proc.stdout
    text = TextDataModule(corpus=str(corpus), cache_dir=str(root / "cache"), **OPTIONS)
    text.setup("fit")
    assert text.built == [], "prepare built the in-memory cache; this module only loads it"
    return root, text


def stream(data_dir, batch_size=16, **kwargs):
    return StreamingTextDataModule(str(data_dir), batch_size=batch_size, **kwargs)


def windows(batches) -> torch.Tensor:
    """Batches back as windows [N, block_size + 1]."""
    return torch.cat([torch.cat([b["input_ids"], b["labels"][:, -1:]], 1) for b in batches])


def rows(t: torch.Tensor) -> list[list[int]]:
    return sorted(t.tolist())


def test_the_stream_is_the_in_memory_windows(prepared, tmp_path):
    root, text = prepared
    dm = stream(root / "shards")
    assert (dm.vocab_size, dm.seq_len, dm.block_size) == (300, 16, 16)
    assert tokenizer_sha(dm.tokenizer) == tokenizer_sha(text.tokenizer), "the in-memory path's tokenizer"
    meta = json.loads((root / "shards" / "meta.json").read_text())
    assert meta["val_held"] == text.val_held == "the last 12 of 120 documents (one contiguous span)"
    assert len(os.listdir(root / "shards" / "train")) > 4, "several chunks, so shuffling and sharding have work"

    blocks = text._blocks["train"][:]["ids"].long()
    loader = dm.train_dataloader()
    first, second = list(loader), list(loader)
    batch = first[0]
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == batch["labels"].shape == (16, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:]), "labels[t] is the next token"
    assert rows(windows(first)) == rows(blocks) == rows(windows(second)), "every epoch is every window once"
    assert not torch.equal(windows(first), windows(second)), "each epoch has its own order"

    val = text._blocks["validation"][:]["ids"].long()
    assert torch.equal(windows(dm.val_dataloader()), val), "validation in corpus order"
    for n in (1, 7, 1000):
        assert torch.equal(dm.heldout_documents(n), text.heldout_documents(n)), n

    # a URL goes through litdata's downloader and cache ("local:" is its scheme for a local copy)
    remote = stream(f"local:{root / 'shards'}", cache_dir=str(tmp_path / "chunks"))
    assert rows(windows(remote.train_dataloader())) == rows(blocks)
    assert torch.equal(remote.heldout_documents(7), text.heldout_documents(7))
    assert any(name.endswith(".bin") for _, _, files in os.walk(tmp_path / "chunks") for name in files)


def test_the_loader_resumes_from_the_data_modules_state(prepared):
    """What a checkpoint keeps (the DataModule's state_dict) puts a new loader at the next batch,
    mid-epoch and at an epoch's end, with 0 or 2 worker processes."""
    root, _ = prepared
    for workers in (0, 2):
        full = stream(root / "shards", num_workers=workers).train_dataloader()
        expected = [b["input_ids"] for b in [*full, *full]]
        killed = stream(root / "shards", num_workers=workers)
        loader = killed.train_dataloader()
        seen = [b["input_ids"] for b in loader]
        ended = killed.state_dict()
        it = iter(loader)
        seen += [next(it)["input_ids"] for _ in range(5)]
        state = killed.state_dict()
        assert state["loader"]["num_samples_yielded"] == 5 * 16 and state["loader"]["current_epoch"] == 2
        resumed = stream(root / "shards", num_workers=workers)
        resumed.load_state_dict(state)
        rest = [b["input_ids"] for b in resumed.train_dataloader()]
        assert len(seen) + len(rest) == len(expected), workers
        assert all(torch.equal(a, b) for a, b in zip(seen + rest, expected)), f"num_workers={workers}"
        at_end = stream(root / "shards", num_workers=workers)
        at_end.load_state_dict(ended)
        assert torch.equal(next(iter(at_end.train_dataloader()))["input_ids"], expected[len(expected) // 2])
    fresh = next(iter(stream(root / "shards").train_dataloader()))["input_ids"]
    assert not torch.equal(fresh, expected[len(seen)]), "without the state a loader starts the first epoch again"


class Batches(pl.Callback):
    """Keeps the input_ids of every training batch."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch["input_ids"])


def test_an_epoch_bounded_run_resumed_at_an_epoch_end_takes_the_next_epochs_order(prepared, tmp_path):
    """From an epoch-end checkpoint of a max_epochs run, Lightning does not hand the loader its
    state back (its fit loop is not "restarting"); the DataModule's state does, so the second
    epoch is the uninterrupted run's second epoch, not the first epoch's order again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_icl.model import TransformerConfig
    from lit_icl.module import LitTransformerLM

    root, _ = prepared

    def run(epochs, name, ckpt_path=None):
        torch.manual_seed(0)
        module = LitTransformerLM(TransformerConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=8, block_size=16))
        batches = Batches()
        trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[batches, ModelCheckpoint(dirpath=tmp_path / name, save_last=True)])
        trainer.fit(module, datamodule=stream(root / "shards", batch_size=64), ckpt_path=ckpt_path)
        return batches.seen

    full = run(2, "full")
    first = run(1, "first")
    resumed = run(2, "resumed", ckpt_path=tmp_path / "first" / "last.ckpt")
    assert len(full) == 2 * len(first) == 2 * len(resumed) == 14
    assert all(torch.equal(a, b) for a, b in zip(first + resumed, full))
    assert not torch.equal(resumed[0], first[0])


def fit_args(root, *extra):
    return [
        "--config", str(ROOT / "configs" / "text_momentum.yaml"), "--seed_everything", "0",
        "--model.config.n_embd", "16", "--model.config.n_head", "2", "--model.config.n_layer", "1",
        "--model.config.block_size", "16", "--model.warmup_steps", "5",
        "--data.class_path", "lit_icl.data.StreamingTextDataModule", "--data.init_args.data_dir", str(root / "shards"),
        "--data.init_args.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger", "false", *extra,
    ]


def fit(args, cwd):
    return subprocess.run([str(LIT_ICL), "fit", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_fit_killed_mid_epoch_resumes_exactly(prepared, tmp_path):
    """kill -9 a streaming run two steps after a checkpoint taken 7 batches into its second epoch
    (28 batches an epoch); resumed with --ckpt_path last it ends with the uninterrupted run's
    weights, bitwise."""
    root, _ = prepared
    steps = ["--trainer.max_steps", "40", "--checkpoint.every_n_train_steps", "5"]
    run = [*steps, "--checkpoint.dirpath", str(tmp_path / "run")]
    kill = '[{"class_path": "tests.faults.KillRankAt", "init_args": {"step": 37, "rank": 0}}]'
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted and the killed run side by side
        full, killed = pool.map(lambda args: fit(fit_args(root, *args), tmp_path), [
            [*steps, "--checkpoint.dirpath", str(tmp_path / "full")], [*run, "--trainer.callbacks", kill]])
    assert full.returncode == 0, full.stderr[-2000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = load_checkpoint(tmp_path / "run" / "last.ckpt")
    position = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # what Lightning saved
    assert saved["global_step"] == 35 and position["current_epoch"] == 2 and position["num_samples_yielded"] == 7 * 16
    assert saved["StreamingTextDataModule"]["loader"] == position, "the DataModule keeps the same position"

    resumed = fit(fit_args(root, *run, "--ckpt_path", "last"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    end, ref = load_checkpoint(tmp_path / "run" / "last.ckpt"), load_checkpoint(tmp_path / "full" / "last.ckpt")
    assert end["global_step"] == ref["global_step"] == 40
    assert all(torch.equal(end["state_dict"][k], ref["state_dict"][k]) for k in ref["state_dict"])
    assert checkpoint_tokenizer(end).to_str() == Tokenizer.from_file(str(root / "shards" / "tokenizer.json")).to_str(), \
        "convert and generate --prompt find the run's tokenizer in its checkpoint"


class RecordBatches(pl.Callback):
    """Writes this rank's training windows and its held-out documents to ``out/rank<r>.json``."""

    def __init__(self, out: str):
        self.out, self.seen = out, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen += torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1).tolist()

    def on_train_end(self, trainer, module):
        record = {"windows": self.seen, "heldout": trainer.datamodule.heldout_documents(5).tolist(),
                  "batches": len(trainer.train_dataloader)}
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


@pytest.mark.slow
def test_two_ddp_ranks_stream_disjoint_windows(prepared, tmp_path):
    root, text = prepared
    record = json.dumps([{"class_path": "tests.test_streaming.RecordBatches", "init_args": {"out": str(tmp_path)}}])
    proc = fit(fit_args(root, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
                        "--trainer.max_steps", "-1", "--trainer.callbacks", record, "--checkpoint.dirpath",
                        str(tmp_path / "ckpt")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen = [{tuple(w) for w in r["windows"]} for r in ranks]
    everything = {tuple(w) for w in text._blocks["train"][:]["ids"].tolist()}
    assert ranks[0]["batches"] == ranks[1]["batches"] and len(ranks[0]["windows"]) == len(ranks[1]["windows"])
    assert len(seen[0]) == len(ranks[0]["windows"]), "no window twice on one rank"
    assert not seen[0] & seen[1], "the ranks' windows are disjoint"
    assert seen[0] | seen[1] <= everything
    kept = len(everything) // (2 * 16) * (2 * 16)  # litdata's drop_last under DDP: whole batches on every rank
    assert len(seen[0] | seen[1]) == kept == 416, "442 windows: 13 batches of 16 a rank, 26 windows left out"
    assert ranks[0]["heldout"] == ranks[1]["heldout"] == text.heldout_documents(5).tolist()


def test_a_bad_path_is_a_one_line_value_error(prepared, tmp_path, capsys, monkeypatch):
    root, text = prepared
    for data_dir, needle in ((tmp_path / "nope", "holds no prepared corpus"),
                             (root / "shards" / "train", "holds no prepared corpus"),
                             (f"local:{tmp_path / 'nope'}", "cannot read")):
        with pytest.raises(ValueError, match=needle) as info:
            StreamingTextDataModule(str(data_dir))
        assert str(data_dir) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="data_dir is required"):
        StreamingTextDataModule()
    with pytest.raises(ValueError, match=f"--out '{root / 'shards'}' exists and is not an empty directory"):
        prepare(text, str(root / "shards"))
    with pytest.raises(ValueError, match="write to a local directory"):
        prepare(text, "s3://bucket/shards")
    random = tmp_path / "random-documents"  # what --val_by document writes: a validation text that is not contiguous
    random.mkdir()
    (random / "tokenizer.json").write_text((root / "shards" / "tokenizer.json").read_text())
    meta = json.loads((root / "shards" / "meta.json").read_text())
    (random / "meta.json").write_text(json.dumps({**meta, "val_held": ""}))
    with pytest.raises(ValueError, match="is random documents of .*--val_by file"):
        stream(random).heldout_documents(4)
    dm = stream(root / "shards")
    state = dm.state_dict()
    other = TextDataModule(corpus=text.corpus, cache_dir=text.cache_dir, **{**OPTIONS, "vocab_size": 280})
    state["tokenizer"] = other.tokenizer.to_str()
    with pytest.raises(ValueError, match="StreamingTextDataModule: the checkpoint was trained with another tokenizer"):
        dm.load_state_dict(state)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-icl"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *fit_args(root), "--data.init_args.data_dir", str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err and str(tmp_path / "nope") in errors[0], err[-2000:]
