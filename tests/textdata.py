"""Small text files the text and template tests write themselves (no network, no fixtures)."""

import json
import random
from pathlib import Path

WORDS = ("the cat sat on a mat and the dog ran far away while birds sang loud songs in green trees "
         "near blue water under warm light").split()


def write_corpus(path: Path, paragraphs: int = 120, words: int = 30, seed: int = 0) -> Path:
    """A text file of ``paragraphs`` random paragraphs (blank-line separated), with some non-ASCII."""
    rng = random.Random(seed)
    text = "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(words)) + (" café — naïve 🤖" if i % 10 == 0 else "")
        for i in range(paragraphs)
    )
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write_classification(directory: Path, train: int = 40, validation: int = 12, seed: int = 0) -> Path:
    """``train.jsonl`` and ``validation.jsonl`` with ``sentence`` (2-9 words) and ``label``
    (0 or 1; three quarters of the train examples are 0, so balance matters)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("validation", validation)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = int(i % 4 == 3) if split == "train" else i % 2
                sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
                f.write(json.dumps({"sentence": sentence, "label": label}) + "\n")
    return directory
