"""Template-based classification episodes: the template split, candidates, balanced seeded draws,
left-padded Episodes, and the ICL callback evaluating them through a TextDataModule."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.data import Episodes
from lit_icl.data.templates import TemplateEpisodes, TemplateTask
from lit_icl.data.text import TextDataModule
from lit_icl.data.tokenizer import train_bpe
from lit_icl.model import TransformerConfig
from lit_icl.module import LitTransformerLM
from tests.textdata import WORDS, write_classification, write_corpus

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment: {label}\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_classification(tmp_path_factory.mktemp("cls") / "toy")


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([" ".join(WORDS)] * 20 + ["Review: Sentiment: cat dog"] * 5, vocab_size=300)


def task(data, **kwargs) -> TemplateTask:
    args = dict(name="toy", source=str(data), text_field="sentence", verbalizer={0: "cat", 1: "dog"}, template=TEMPLATE)
    return TemplateTask(**{**args, **kwargs})


def test_a_tokenizer_that_adds_bos_gets_it_once_per_prompt(data, tokenizer):
    """Gemma's tokenizer puts <bos> before every encode; demonstrations and queries are encoded one
    by one, so the episodes drop it everywhere and put it back once, before the first demonstration."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    with_bos = Tokenizer.from_str(tokenizer.to_str())
    with_bos.add_special_tokens(["<bos>"])
    bos = with_bos.token_to_id("<bos>")
    with_bos.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert with_bos.encode("cat").ids[0] == bos
    source = TemplateEpisodes(task(data))
    plain, ep = (source.episodes(t, n_shots=3, num_episodes=6) for t in (tokenizer, with_bos))
    assert ep.candidates.tolist() == plain.candidates.tolist(), "candidates: the word's own first token"
    for i in range(6):
        demo = ep.demo_ids[i][ep.shot_index[i] >= 0].tolist()
        assert demo[0] == bos and demo.count(bos) == 1 and demo[1:] == plain.demo_ids[i][plain.shot_index[i] >= 0].tolist()
        assert bos not in ep.query_ids[i].tolist()
    assert (source.episodes(with_bos, n_shots=0, num_episodes=2).demo_ids.shape[1]) == 0


def test_from_lists_left_pads_demonstrations_and_queries():
    ep = Episodes.from_lists([[[5, 6], [7]], [[8], [9, 10, 11]]], [[3], [4, 2]], [1, 2], [1, 2], pad_id=0)
    assert ep.demo_ids.tolist() == [[0, 5, 6, 7], [8, 9, 10, 11]]
    assert ep.shot_index.tolist() == [[-1, 0, 0, 1], [0, 1, 1, 1]]
    assert ep.query_ids.tolist() == [[0, 3], [4, 2]] and ep.query_mask.tolist() == [[0, 1], [1, 1]]
    ids, _ = ep.demonstrations()
    assert ids.tolist() == [[[0, 5, 6], [0, 0, 7]], [[0, 0, 8], [9, 10, 11]]]
    zero = Episodes.from_lists([[], []], [[3], [4]], [1, 2], [1, 2])
    assert zero.demo_ids.shape == (2, 0) and zero.query_mask is None


def test_episodes_fill_the_template(data, tokenizer):
    source = TemplateEpisodes(task(data))
    ep = source.episodes(tokenizer, n_shots=3, num_episodes=12)
    assert len(ep) == 12 and ep.demo_mask is not None and ep.query_mask is not None
    cat, dog = (tokenizer.encode(" " + w).ids[0] for w in ("cat", "dog"))
    assert ep.candidates.tolist() == [cat, dog]
    for i in range(12):
        query = tokenizer.decode(ep.query_ids[i][ep.query_mask[i].bool()].tolist())
        assert query.startswith("Review: ") and query.endswith("\nSentiment:"), repr(query)
        assert query[len("Review: "):-len("\nSentiment:")] in source.eval_texts
        label = source.eval_labels[source.eval_texts.index(query[len("Review: "):-len("\nSentiment:")])]
        assert ep.answers[i] == (cat if label == "0" else dog)
        demos = tokenizer.decode(ep.demo_ids[i][ep.shot_index[i] >= 0].tolist())
        shots = demos.split("\n")[:-1]
        assert len(shots) == 6 and all(s.startswith("Review: ") for s in shots[0::2])
        assert sorted(s.split(": ")[1] for s in shots[1::2]) in (["cat", "cat", "dog"], ["cat", "dog", "dog"])
        for s in range(3):  # each demonstration's tokens carry its own shot index, in order
            text = tokenizer.decode(ep.demo_ids[i][ep.shot_index[i] == s].tolist())
            assert text == shots[2 * s] + "\n" + shots[2 * s + 1] + "\n"
    queries = [tuple(q[m.bool()].tolist()) for q, m in zip(ep.query_ids, ep.query_mask)]
    assert len(set(queries)) == 12, "12 distinct validation examples"


def test_episodes_are_seeded_balanced_and_nested(data, tokenizer):
    source = TemplateEpisodes(task(data))
    a, b = source.episodes(tokenizer, 4, 12), TemplateEpisodes(task(data)).episodes(tokenizer, 4, 12)
    assert a.equals(b), "deterministic"
    other = TemplateEpisodes(task(data, seed=1)).episodes(tokenizer, 4, 12)
    assert not torch.equal(a.query_ids, other.query_ids)
    for episode in range(12):
        rows = source.demonstration_rows(4, episode)
        assert sorted(source.train_labels[r] for r in rows) == ["0", "0", "1", "1"], "balanced"
        assert set(source.demonstration_rows(3, episode)) < set(rows), "more shots extend the same draw"
    unbalanced = TemplateEpisodes(task(data, balanced=False))
    counts = [sum(unbalanced.train_labels[r] == "1" for r in unbalanced.demonstration_rows(4, e)) for e in range(40)]
    assert sum(counts) / (4 * 40) < 0.4, "uniform draws follow the 3:1 train labels"
    assert len(source.episodes(tokenizer, 2, 30)) == 30, "more episodes than validation examples cycle"


def test_task_validation(data, tokenizer):
    with pytest.raises(ValueError, match="needs {text} before a single {label}"):
        task(data, template="{label}: {text}")
    with pytest.raises(ValueError, match="distinct, non-empty words"):
        task(data, verbalizer={0: "cat", 1: "cat"})
    with pytest.raises(ValueError, match="outside the verbalizer"):
        TemplateEpisodes(task(data, verbalizer={0: "cat", 2: "dog"}))
    with pytest.raises(ValueError, match="no split 'test'"):
        TemplateEpisodes(task(data, eval_split="test"))
    with pytest.raises(ValueError, match="lacks the fields"):
        TemplateEpisodes(task(data, text_field="review"))
    with pytest.raises(ValueError, match="start with distinct tokens"):
        TemplateEpisodes(task(data, verbalizer={0: "cat", 1: "catdog"})).candidates(tokenizer)
    with pytest.raises(ValueError, match="too few train examples per class"):
        TemplateEpisodes(task(data)).episodes(tokenizer, 40, 2)


def test_templates_config_describes_valid_tasks():
    config = yaml.safe_load((ROOT / "configs" / "templates.yaml").read_text())
    tasks = [TemplateTask(**t) for t in config["data"]["init_args"]["templates"]]
    assert tasks[0].verbalizer == {"0": "negative", "1": "positive"}
    assert tasks[0].parts == ("Review: {text}\nSentiment:", " ", "\n")


def test_callback_evaluates_template_episodes(data, tmp_path):
    dm = TextDataModule(corpus=str(write_corpus(tmp_path / "c.txt")), block_size=32, vocab_size=300,
                        cache_dir=str(tmp_path / "cache"), batch_size=4, val_fraction=0.1, num_heldout=8,
                        templates=[task(data), task(data, name="flipped", verbalizer={0: "dog", 1: "cat"})])
    assert dm.heldout_tasks() == ["toy", "flipped"]
    flipped = dm.heldout_episodes(2, task="flipped")
    assert torch.equal(flipped.candidates, dm.heldout_episodes(2).candidates.flip(0))
    torch.manual_seed(0)
    module = LitTransformerLM(TransformerConfig(vocab_size=dm.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                                block_size=128, token_shift=True, momentum=0.5))
    callback = ICLConversionCallback(shots=[0, 2], batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1, callbacks=[callback])
    trainer.validate(module, datamodule=dm)
    assert set(callback.results) == {0, 2}
    for row in callback.results.values():
        assert 0.0 <= row["prompted_acc"] <= 1.0
    assert callback.results[2]["max_abs_logit_diff"] < 1e-4, "padded prompts convert exactly"
    assert callback.results[0]["prompted_acc"] == callback.results[0]["zero_shot_acc"]
