"""Every YAML in configs/ parses through the lit-icl LightningCLI and builds its model and data."""

import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from lit_icl.cli import build_cli
from lit_icl.module import LitTransformerLM
from tests.textdata import write_corpus

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:")
NEEDS_CORPUS = {"text_momentum.yaml", "templates.yaml", "real_tasks.yaml"}  # required, or a named source (no download in tests)


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "momentum.yaml", "softmax.yaml", "induction.yaml",
                                        "label_mapping.yaml", "mixture.yaml", "text_momentum.yaml", "templates.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default logger / checkpoint dirs are relative
    monkeypatch.setattr(sys, "argv", ["lit-icl"])  # parse only the args given below
    extra = ["--data.init_args.corpus", str(write_corpus(tmp_path / "corpus.txt"))] if path.name in NEEDS_CORPUS else []
    cli = build_cli(["--config", str(path), *extra], run=False)
    assert isinstance(cli.model, LitTransformerLM) and isinstance(cli.trainer, pl.Trainer)
    assert isinstance(cli.datamodule, pl.LightningDataModule) and callable(cli.datamodule.heldout_episodes)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size, "data.vocab_size is linked into the model"
    assert cli.model.config.block_size >= cli.datamodule.seq_len
    assert cli.trainer.checkpoint_callback.dirpath is None, "resolved per run by lit-icl fit: checkpoints/<run_name>/"
    assert cli.trainer.checkpoint_callback.save_last


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_field_has_a_comment(path):
    missing = [
        f"{path.name}:{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if KEY_LINE.match(line) and "#" not in line
    ]
    assert not missing, "fields without a comment:\n" + "\n".join(missing)


def test_variants_differ_from_quickstart_where_named():
    def model(name):
        return yaml.safe_load((CONFIGS[0].parent / name).read_text())["model"]["config"]

    quick, momentum, softmax = model("quickstart.yaml"), model("momentum.yaml"), model("softmax.yaml")
    assert (quick["attention"], quick["feature_map"], quick["position"], quick["momentum"]) == (
        "linear", "elu", "learned", 0.0)
    assert momentum == {**quick, "momentum": 0.5}
    assert softmax["attention"] == "softmax" and softmax["momentum"] == 0.0
