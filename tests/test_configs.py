"""Every YAML in configs/ parses through the lit-icl LightningCLI and builds its model and data; an
overlay (first line "# Overlay on configs/<base>.yaml") is loaded after its base, as users do with
`--config configs/<base>.yaml --config configs/<overlay>.yaml`."""

import dataclasses
import re
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lit_icl.cli import build_cli
from lit_icl.module import LitTransformerLM
from tests.textdata import write_corpus

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
KEY_LINE = re.compile(r"^\s*(- )?[A-Za-z_][\w.]*:")
NEEDS_PRETRAINED = {"smollm2_icl.yaml", "smollm2_functions.yaml"}  # a named model (a 93 MB download): a tiny local Llama instead
NEEDS_CORPUS = {"text_momentum.yaml", "templates.yaml", "real_tasks.yaml"}  # required, or a named source (no download in tests)
OVERLAY = re.compile(r"^# Overlay on configs/(\S+\.yaml)")


def stack(path: Path) -> list[Path]:
    """The configs to load for `path`: its base's stack, then itself."""
    match = OVERLAY.match(path.read_text())
    return [*stack(path.parent / match[1]), path] if match else [path]


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "momentum.yaml", "softmax.yaml", "induction.yaml",
                                        "label_mapping.yaml", "mixture.yaml", "text_momentum.yaml", "templates.yaml"}


def tiny_pretrained(root: Path) -> Path:
    """A random 2-layer Llama (transformers, save_pretrained) with a 300-token BPE tokenizer.json
    beside it: what a config's `pretrained` / `tokenizer` get instead of a real download."""
    import transformers

    from lit_icl.data.tokenizer import save_tokenizer, train_bpe

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    words = "Review: Sentiment: Headline: Topic: negative positive business entertainment politics sport tech"
    save_tokenizer(train_bpe([words] * 20, vocab_size=300), str(root / "tokenizer.json"))
    return root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default logger / checkpoint dirs are relative
    monkeypatch.setattr(sys, "argv", ["lit-icl"])  # parse only the args given below
    monkeypatch.setenv("LIT_ICL_CACHE", str(tmp_path / "cache"))  # nothing is fetched: see the end
    files = stack(path)
    extra = ["--data.init_args.corpus", str(write_corpus(tmp_path / "corpus.txt"))] if files[0].name in NEEDS_CORPUS else []
    if files[0].name in NEEDS_PRETRAINED:
        model = tiny_pretrained(tmp_path / "model")
        extra = ["--model.pretrained", str(model), "--data.init_args.tokenizer", str(model)]
    cli = build_cli([arg for f in files for arg in ("--config", str(f))] + extra, run=False)
    assert isinstance(cli.model, LitTransformerLM) and isinstance(cli.trainer, pl.Trainer)
    assert isinstance(cli.datamodule, pl.LightningDataModule) and callable(cli.datamodule.heldout_episodes)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size, "data.vocab_size is linked into the model"
    assert cli.model.config.block_size >= cli.datamodule.seq_len
    assert cli.trainer.checkpoint_callback.dirpath is None, "resolved per run by lit-icl fit: checkpoints/<run_name>/"
    assert cli.trainer.checkpoint_callback.save_last
    assert not (tmp_path / "cache" / "sources").exists(), "building a config downloads nothing"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_field_has_a_comment(path):
    missing = [
        f"{path.name}:{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if KEY_LINE.match(line) and "#" not in line
    ]
    assert not missing, "fields without a comment:\n" + "\n".join(missing)


def test_overlays_change_only_what_they_name():
    """momentum.yaml and softmax.yaml are a few fields on top of quickstart.yaml, not copies."""
    def model(*names):
        cli = build_cli([arg for n in names for arg in ("--config", str(CONFIGS[0].parent / n))], run=False)
        return dataclasses.asdict(cli.model.config)

    quick = model("quickstart.yaml")
    assert (quick["attention"], quick["feature_map"], quick["position"], quick["momentum"]) == (
        "linear", "elu", "learned", 0.0)
    assert model("quickstart.yaml", "momentum.yaml") == {**quick, "momentum": 0.5}
    assert model("quickstart.yaml", "softmax.yaml") == {**quick, "attention": "softmax"}
    for name in ("momentum.yaml", "softmax.yaml"):
        assert stack(CONFIGS[0].parent / name)[0].name == "quickstart.yaml"
        assert len((CONFIGS[0].parent / name).read_text().splitlines()) < 15


@pytest.mark.parametrize("name", sorted(NEEDS_CORPUS))
def test_corpus_configs_measure_icl_on_contiguous_text(name):
    """The corpus configs have the text ICL measures on by default, on whole held-out files."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    callbacks = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert "lit_icl.text_icl.TextICLCallback" in callbacks
    assert cfg["data"]["init_args"]["val_by"] == "auto"
