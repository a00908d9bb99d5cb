"""What the two experiments on a pretrained LM (`icl_vs_ft`, `iclaa`) share: the model and its
tokenizer (SmolLM2-135M from its named source, or for --quick a tiny random Llama-style model
with a BPE trained on self-written toy data, nothing downloaded), the toy data, and the layout
of their reports."""
from __future__ import annotations

import random
from pathlib import Path

import torch

TEMPLATES = {"mr": ("Review: {text}\nSentiment: {label}\n", {0: "negative", 1: "positive"}),
             "bbc": ("Article: {text}\nTopic: {label}\n", {0: "business", 1: "entertainment", 2: "politics", 3: "sport",
                                                         4: "tech"})}
QUICK_WORDS = {"mr": ({0: "bad dull awful boring weak", 1: "good fine great lovely warm"}),
               "bbc": ({0: "bank market shares profit", 1: "film music actor award", 2: "party vote minister law",
                        3: "match goal team cup", 4: "phone web software chip"})}


def named(name: str) -> str:
    """The local path of a named source (`lit-icl data list`), fetched on first use."""
    from lit_icl.sources import resolve

    return resolve(name)


def quick_texts(task: str, n: int, seed: int) -> list[tuple[str, int]]:
    """Self-written examples of a toy task: a few topic words of the label among filler words."""
    rng, classes = random.Random(seed), QUICK_WORDS[task]
    filler = "the a this that it was one more very".split()
    return [(" ".join(rng.choice(classes[c].split() + filler) for _ in range(rng.randint(3, 8))), c)
            for c in (rng.randrange(len(classes)) for _ in range(n))]


def quick_corpus() -> str:
    rng = random.Random(3)
    return " ".join(rng.choice(" ".join(QUICK_WORDS["bbc"].values()).split() + ["the", "and", "of"]) for _ in range(600))


def load(cfg: dict, out: Path):
    """(model, tokenizer file): SmolLM2 from the named source, or a tiny random Llama-style model
    and a BPE trained on the toy tasks (--quick: nothing is downloaded)."""
    from lit_icl import TransformerConfig, TransformerLM

    if cfg["model"] != "quick":
        path = named(cfg["model"])
        return TransformerLM.from_hf(path).eval(), str(Path(path) / "tokenizer.json")
    from lit_icl.data.tokenizer import read_tokenizer, save_tokenizer, train_bpe

    tok_file = out / "quick_model" / "tokenizer.json"
    if not tok_file.exists():
        texts = [t for task in TEMPLATES for t, _ in quick_texts(task, 200, 0)]
        texts += [t.format(text="", label=w) for t, words in TEMPLATES.values() for w in words.values()] * 20
        texts += [quick_corpus()] * 5
        save_tokenizer(train_bpe(texts, vocab_size=400), str(tok_file))

    vocab = read_tokenizer(str(tok_file)).get_vocab_size()
    torch.manual_seed(1234)  # not the untrained baseline's seed (0): the two differ
    model = TransformerLM(TransformerConfig(
        vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=1024, attention="softmax",
        position="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    # float64: the --quick runs are tests (tests/test_reproduce.py) that compare the argmax and the
    # greedy tokens of two code paths, where float32 rounding could flip a near-tie on another CPU
    return model.double().eval(), str(tok_file)


def model_name(cfg: dict) -> str:
    """The model of a run, in words."""
    return "a tiny random Llama-style model (--quick)" if cfg["quick"] else (
        "SmolLM2-135M-Instruct (named source smollm2-135m: 30 layers, width 576, 9 query / 3 key-value heads, Q4_1 "
        "weights dequantized to fp32)")


def report(name: str, title: str, data: dict, setup: list[str], tables: list[str], differences: str) -> str:
    """DIR/NAME.md: the command, the setup, the tables and figure, and what differs from the paper."""
    return "\n".join([title, "", f"Command: `{data['command']}` — {len(data['runs'])} runs, "
                      f"{data['wall_seconds'] / 60:.1f} min.", "", "## Setup", "", *setup, "",
                      "## Result", "", *tables, "", f"![{name}]({name}.png)", "", "## What differs from the paper, and why", "",
                      differences, "", f"Every number, with the config and seed of each run: `{name}.json`."])


def readme_section(name: str, title: str, data: dict, rel: str, setup: list[str], tables: list[str],
                   differences: str) -> str:
    """The experiment's section of the README (figures under `rel`, relative to the README)."""
    return "\n".join([title, "", f"`{data['command']}` ({len(data['runs'])} runs, {data['wall_seconds'] / 60:.0f} min on "
                      "this machine's CPU).", "", *setup, "", *tables, "", f"![{name}]({rel}/{name}.png)",
                      "", differences])
