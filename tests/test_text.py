"""Real text: the BPE tokenizer, packing, the cached TextDataModule pipeline, checkpoints that
know their tokenizer, the one-line error of a missing corpus, and two DDP processes on one cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from tokenizers import Tokenizer

from lit_icl.cli import main
from lit_icl.data.text import TextDataModule, pack
from lit_icl.data.tokenizer import EOS, read_tokenizer, save_tokenizer, tokenizer_sha, train_bpe
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM
from tests.textdata import write_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def make(corpus, cache, **kwargs) -> TextDataModule:
    args = dict(corpus=str(corpus), block_size=16, vocab_size=300, cache_dir=str(cache), batch_size=4, val_fraction=0.1)
    return TextDataModule(**{**args, **kwargs})


def test_tokenizer_round_trip(corpus, tmp_path):
    tok = train_bpe(corpus.read_text().split("\n\n"), vocab_size=300)
    assert tok.get_vocab_size() == 300 and tok.token_to_id(EOS) == 0
    for text in ("the cat sat", "  leading spaces\tand tabs\n\nnew lines", "naïve café — 🤖 ünïcödé", "x" * 50):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    assert len(tok.encode("the cat sat on a mat").ids) < len("the cat sat on a mat"), "merges were learned"
    save_tokenizer(tok, str(tmp_path / "t.json"))
    assert tokenizer_sha(Tokenizer.from_file(str(tmp_path / "t.json"))) == tokenizer_sha(tok)
    again = train_bpe(corpus.read_text().split("\n\n"), vocab_size=300)
    assert tokenizer_sha(again) == tokenizer_sha(tok), "training is deterministic"
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 257"):
        train_bpe(["abc"], vocab_size=100)


def test_pack_scores_every_next_token_once():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    assert pack(docs, 3) == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 10]]
    assert pack(docs, 4) == [[1, 2, 3, 4, 5], [5, 6, 7, 8, 9]], "the tail shorter than a window is dropped"
    assert pack([[1, 2]], 4) == []


def test_pipeline_builds_once_then_loads(corpus, tmp_path):
    first = make(corpus, tmp_path / "cache")
    first.prepare_data()
    assert first.built == ["tokenizer", "train-tokens", "train-blocks16", "validation-tokens", "validation-blocks16"]
    dm = make(corpus, tmp_path / "cache")
    dm.setup("fit")
    assert dm.built == [], "a second process loads everything from the cache"
    assert tokenizer_sha(dm.tokenizer) == tokenizer_sha(first.tokenizer) and dm.vocab_size == 300
    docs = dm._documents()
    assert len(docs["validation"]) == 12 and len(docs["train"]) == 108
    assert not set(docs["train"]["text"]) & set(docs["validation"]["text"])
    eos = dm.tokenizer.token_to_id(EOS)
    stream = [t for d in docs["train"]["text"] for t in dm.tokenizer.encode(d).ids + [eos]]
    blocks = [row["ids"].tolist() for row in dm._blocks["train"]]
    assert all(len(b) == 17 for b in blocks)
    rebuilt = blocks[0] + [t for b in blocks[1:] for t in b[1:]]
    assert rebuilt == stream[: len(rebuilt)] and len(stream) - len(rebuilt) < 16, "blocks tile the token stream"
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16) and batch["labels"].dtype == torch.long
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:]), "labels[t] is the next token"
    other = make(corpus, tmp_path / "cache", block_size=8)
    other.setup("fit")
    assert other.built == ["train-blocks8", "validation-blocks8"], "same tokenizer and tokens, new blocks"
    with open(corpus, "a") as f:
        f.write("\n\na changed corpus\n")
    changed = make(corpus, tmp_path / "cache")
    changed.setup("fit")
    assert "tokenizer" in changed.built, "a changed file is a new cache entry"


def test_jsonl_parquet_and_directory_sources(tmp_path):
    rows = [{"content": f"document {i} " + "words " * (i % 7 + 5), "id": i} for i in range(60)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:50]))
    (split / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[50:]))
    for source in (jsonl, tmp_path / "docs.parquet", split):
        dm = make(source, tmp_path / "cache", text_field="content")
        dm.setup("fit")
        val = dm._documents()["validation"]["content"]
        assert len(val) == (10 if source == split else 6), source
        assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 16)
    with pytest.raises(ValueError, match="no field 'text'"):
        make(jsonl, tmp_path / "cache").setup("fit")


def test_checkpoint_knows_its_tokenizer(corpus, tmp_path):
    dm = make(corpus, tmp_path / "cache")
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=CSVLogger(tmp_path / "logs"), callbacks=[ckpt], enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    sha = tokenizer_sha(dm.tokenizer)
    assert tokenizer_sha(Tokenizer.from_file(os.path.join(trainer.log_dir, "tokenizer.json"))) == sha, "next to the run"
    last = str(tmp_path / "ckpt" / "last.ckpt")
    assert tokenizer_sha(read_tokenizer(last)) == sha
    state = torch.load(last, weights_only=True)["TextDataModule"]
    reused = make(corpus, tmp_path / "other-cache", tokenizer_path=last)
    reused.load_state_dict(state)
    assert "tokenizer" not in reused.built and tokenizer_sha(reused.tokenizer) == sha
    different = make(corpus, tmp_path / "cache", vocab_size=280)
    with pytest.raises(ValueError, match="another tokenizer"):
        different.load_state_dict(state)
    bare = torch.load(last, weights_only=True)
    del bare["TextDataModule"]
    torch.save(bare, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="holds no data module tokenizer"):
        read_tokenizer(str(tmp_path / "bare.ckpt"))


def test_missing_corpus_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-icl"])  # LightningCLI reads only the args given
    for extra, needle in (([], "corpus is required"), (["--data.init_args.corpus", "nope.txt"], "no file matches")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(ROOT / "configs" / "text_momentum.yaml"), *extra])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and needle in errors[0] and errors[0].startswith("lit-icl: error:"), errors


@pytest.mark.slow
def test_two_ddp_processes_share_one_cache_without_racing(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "text_ddp_worker.py"), "2", str(corpus), str(tmp_path / "cache"), str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert "tokenizer" in ranks[0]["built"] and ranks[1]["built"] == [], "rank 0 builds, rank 1 only loads"
    assert ranks[0]["sha"] == ranks[1]["sha"] and ranks[0]["train_blocks"] == ranks[1]["train_blocks"]
    assert ranks[0]["first"] != ranks[1]["first"], "each rank trains on its own share of the blocks"
    entries = os.listdir(tmp_path / "cache" / "text")
    assert len([e for e in entries if not e.endswith(".lock")]) == 1
    files = os.listdir(tmp_path / "cache" / "text" / next(e for e in entries if not e.endswith(".lock")))
    assert sorted(files) == ["tokenizer.json", "train-blocks16.arrow", "train-tokens.arrow",
                             "validation-blocks16.arrow", "validation-tokens.arrow"], "no stray temporary files"


def batches(loader, n=None):
    """The input_ids of the next ``n`` batches of ``loader`` (all of one epoch when ``None``)."""
    it = iter(loader)
    return [b["input_ids"] for b in (it if n is None else (next(it) for _ in range(n)))]


def test_a_resumed_training_loader_continues_the_batch_sequence(corpus, tmp_path):
    dm = make(corpus, tmp_path / "cache")
    dm.setup("fit")
    full = dm.train_dataloader()
    epoch_len = len(full)
    expected = batches(full) + batches(full)  # two epochs, uninterrupted
    assert len(expected) == 2 * epoch_len and epoch_len > 4
    blocks = dm._blocks["train"][:]["ids"]
    first = torch.cat(expected[:epoch_len])
    assert sorted(first.tolist()) == sorted(blocks[:, :-1].tolist()), "an epoch is every block once"
    assert not torch.equal(first, torch.cat(expected[epoch_len:])), "each epoch has its own order"
    torch.manual_seed(99)  # the order comes from (seed, epoch) alone, not the global RNG
    assert torch.equal(batches(make(corpus, tmp_path / "cache").train_dataloader(), 1)[0], expected[0])
    assert not torch.equal(batches(make(corpus, tmp_path / "cache", seed=7).train_dataloader(), 1)[0], expected[0])

    killed = dm.train_dataloader()  # one epoch, then 3 batches of the next, then a checkpoint
    seen = batches(killed) + batches(killed, 3)
    state = killed.state_dict()
    assert {k: state[k] for k in ("epoch", "batches")} == {"epoch": 1, "batches": 3}
    for workers in (0, 2):
        resumed = make(corpus, tmp_path / "cache", num_workers=workers).train_dataloader()
        resumed.load_state_dict(state)
        rest = batches(resumed) + batches(resumed)  # the rest of epoch 1, then epoch 2 in full
        assert len(seen) + len(rest) == 3 * epoch_len
        assert all(torch.equal(a, b) for a, b in zip(seen + rest, expected)), f"num_workers={workers}"
    ended = dm.train_dataloader()
    batches(ended)
    assert {k: ended.state_dict()[k] for k in ("epoch", "batches")} == {"epoch": 1, "batches": 0}, "an epoch's end"
    with pytest.raises(ValueError, match="seed 1234, this run 7"):
        make(corpus, tmp_path / "cache", seed=7).train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=4; this run has batch_size=8"):
        make(corpus, tmp_path / "cache", batch_size=8).train_dataloader().load_state_dict(state)


def test_ddp_ranks_take_their_own_shards_and_resume_their_own_position(corpus, tmp_path):
    """World size 4 simulated in one process: each rank's share, and a resume from rank 0's
    state (the only one Lightning writes to the checkpoint) puts every rank at its own place."""
    from lit_icl.data.batches import ResumableBatches

    dm = make(corpus, tmp_path / "cache")
    dm.setup("fit")
    world, data, collate = 4, dm._blocks["train"], dm.train_dataloader().fetch.collate

    def loader(rank):
        return ResumableBatches(data, 4, seed=dm.seed, collate=collate, rank=rank, world_size=world)

    ranks = [loader(r) for r in range(world)]
    assert len({len(r) for r in ranks}) == 1, "every rank runs the same number of steps"
    shares = [r.indices(0) for r in ranks]
    union = torch.cat(shares)
    assert len(union) == world * len(shares[0]) < data.num_rows + world
    assert set(union.tolist()) == set(range(data.num_rows)), "together the ranks cover every block"
    assert len(set(union.tolist())) == data.num_rows and len(union) - data.num_rows == (-data.num_rows) % world
    for rank, r in enumerate(ranks):
        got = torch.cat(batches(r))
        assert torch.equal(got, data[shares[rank].tolist()]["ids"][:, :-1]), f"rank {rank} trains on its share"

    uninterrupted = [batches(loader(r), 7) for r in range(world)]
    killed = [loader(r) for r in range(world)]
    seen = [batches(k, 5) for k in killed]
    state = killed[0].state_dict()
    assert all(k.state_dict() == state for k in killed), "the saved position is the same on every rank"
    for rank in range(world):
        resumed = loader(rank)
        resumed.load_state_dict(state)
        rest = batches(resumed, 2)
        assert all(torch.equal(a, b) for a, b in zip(seen[rank] + rest, uninterrupted[rank])), f"rank {rank}"
    with pytest.raises(ValueError, match="world_size=4; this run has world_size=1"):
        dm.train_dataloader().load_state_dict(state)
    with pytest.raises(ValueError, match="rank=4, world_size=4"):
        ResumableBatches(data, 4, rank=4, world_size=4)


BAD_BYTES = b"ok line\n\xff\xfe bad bytes \xc3\x28\nmore\n"  # 0xff 0xfe at offsets 8-9, a cut 0xc3 at 21


def test_invalid_utf8_stops_with_one_line_naming_file_offset_and_option(capsys, tmp_path, monkeypatch):
    (tmp_path / "bad.txt").write_bytes(BAD_BYTES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-icl"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "text_momentum.yaml"), "--data.init_args.corpus",
              str(tmp_path / "bad.txt"), "--data.init_args.cache_dir", str(tmp_path / "cache"),
              "--trainer.accelerator", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert f"{tmp_path / 'bad.txt'} is not valid utf-8: 3 invalid byte(s), the first at byte offset 8" in errors[0]
    assert "--data.init_args.encoding_errors replace" in errors[0]


def test_invalid_utf8_replaced_and_reported(corpus, tmp_path):
    from lit_icl.data.load import check_encoding

    with open(corpus, "ab") as f:
        f.write(BAD_BYTES)
    offset = corpus.stat().st_size - len(BAD_BYTES) + 8
    assert check_encoding([str(corpus)], errors="replace") == {str(corpus): (3, offset)}
    assert check_encoding([str(corpus)], errors="ignore") == {str(corpus): (3, offset)}
    dm = make(corpus, tmp_path / "cache", encoding_errors="replace", val_by="tail")
    dm.prepare_data()
    assert "\ufffd\ufffd bad bytes \ufffd(" in dm._documents()["validation"][-1]["text"]  # the last document
    with pytest.raises(ValueError, match=r"invalid byte\(s\), the first at byte offset"):
        make(corpus, tmp_path / "cache2").prepare_data()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café naïve\n".encode("cp1252"))
    with pytest.raises(ValueError, match="byte offset 3"):
        check_encoding([str(latin)])
    assert check_encoding([str(latin)], encoding="cp1252") == {}
    with pytest.raises(ValueError, match="not a Python codec"):
        check_encoding([str(latin)], encoding="nope")
