"""TemplateDataModule: template tasks with a given tokenizer and no corpus: the same episodes as
TemplateEpisodes, validation batches of formatted examples (next-token labels, -100 at padding,
truncation), the tokenizer given as a file, a model directory or a checkpoint, its errors, and
`lit-icl validate` with the ICL callback on a model that never trained."""

import sys

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.cli import main
from lit_icl.data import TemplateDataModule
from lit_icl.data.templates import TemplateEpisodes, TemplateTask
from lit_icl.data.tokenizer import EOS, save_tokenizer, train_bpe
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM
from tests.textdata import WORDS, write_classification

TEMPLATE = "Review: {text}\nSentiment: {label}\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tdm")
    tokenizer = train_bpe([" ".join(WORDS)] * 20 + ["Review: Sentiment: cat dog"] * 5, vocab_size=300)
    save_tokenizer(tokenizer, str(root / "model" / "tokenizer.json"))
    return {"data": write_classification(root / "toy"), "model": root / "model", "tokenizer": tokenizer}


def tasks(files):
    common = dict(source=str(files["data"]), text_field="sentence", template=TEMPLATE)
    return [dict(name="toy", verbalizer={0: "cat", 1: "dog"}, **common),
            dict(name="flipped", verbalizer={0: "dog", 1: "cat"}, **common)]


def make(files, **kwargs) -> TemplateDataModule:
    args = dict(templates=tasks(files), tokenizer=str(files["model"] / "tokenizer.json"), num_heldout=6,
                batch_size=5, cache_dir=str(files["model"].parent / "cache"))
    return TemplateDataModule(**{**args, **kwargs})


def test_episodes_are_the_template_episodes(files):
    dm = make(files, tokenizer=str(files["model"]))  # a model directory holding tokenizer.json
    assert dm.vocab_size == files["tokenizer"].get_vocab_size() and dm.heldout_tasks() == ["toy", "flipped"]
    ep = dm.heldout_episodes(2, task="flipped")
    direct = TemplateEpisodes(TemplateTask(**tasks(files)[1])).episodes(files["tokenizer"], 2, 6, pad_id=dm.pad_id)
    assert ep.equals(direct)
    assert dm.heldout_episodes(2, task="flipped") is ep, "built once"
    assert len(dm.heldout_episodes(1, num_episodes=9)) == 9 and dm.pad_id == files["tokenizer"].token_to_id(EOS)


def test_validation_batches_are_formatted_examples(files):
    dm = make(files)
    examples = dm.tasks.examples("toy")
    batches = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == 2 * len(examples.eval_texts), "both tasks' examples"
    first = batches[0]
    for i in range(len(first["input_ids"])):
        n = int((first["labels"][i] != -100).sum())
        ids = first["input_ids"][i, :n].tolist() + [int(first["labels"][i, n - 1])]
        assert first["labels"][i, : n - 1].tolist() == ids[1:n], "labels are the next tokens"
        text = files["tokenizer"].decode(ids)
        assert text == examples.format(examples.eval_texts[i], examples.eval_labels[i]), text
        assert text.endswith("Sentiment: " + {"0": "cat", "1": "dog"}[examples.eval_labels[i]] + "\n")
    short = make(files, block_size=4)
    assert max(len(r) for r in short.validation_rows()) == 5, "truncated to block_size + 1 tokens"


def test_errors(files, tmp_path):
    with pytest.raises(ValueError, match="templates are required"):
        TemplateDataModule(tokenizer=str(files["model"]))
    with pytest.raises(ValueError, match="tokenizer is required"):
        TemplateDataModule(templates=tasks(files))
    with pytest.raises(ValueError, match="is not a file"):
        make(files, tokenizer=str(tmp_path)).vocab_size
    with pytest.raises(ValueError, match="'mr' names a classification source, not a model"):
        make(files, tokenizer="mr").vocab_size
    with pytest.raises(ValueError, match="must be distinct"):
        make(files, templates=tasks(files)[:1] * 2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make(files, batch_size=0)


def test_validate_without_a_corpus(files, tmp_path):
    dm = make(files, block_size=64)
    torch.manual_seed(0)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                                block_size=128, momentum=0.5))
    callback = ICLConversionCallback(shots=[0, 2], batch_size=6)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    metrics = trainer.validate(module, datamodule=dm)[0]
    assert metrics["val/loss"] > 0 and set(callback.results) == {0, 2}
    assert callback.results[2]["max_abs_logit_diff"] < 1e-4


def test_lit_icl_validate_with_template_data(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-icl"])
    config = {"seed_everything": 0, "trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False},
              "model": {"config": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64}},
              "data": {"class_path": "lit_icl.data.TemplateDataModule",
                       "init_args": {"templates": tasks(files)[:1], "tokenizer": str(files["model"]),
                                     "batch_size": 4, "block_size": 64}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(tmp_path / "c.yaml")])
    assert "val/loss" in capsys.readouterr().out, "the formatted validation examples were scored"
