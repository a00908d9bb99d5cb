"""Where the ICL evaluation's time goes on a text model with template episodes.

    python scripts/profile_icl.py [--episodes 128] [--shots 0 1 2 4 8] [--batch_size 32]

Writes a corpus and a two-class template task itself (sentences of 15-40 words, so that 8-shot
prompts are a few hundred tokens), builds the TextDataModule pipeline on them, and times one
evaluation of ICLConversionCallback per phase (zero_shot, prompted, convert, finetune,
finetuned, metrics) on the configs/templates.yaml model shrunk to 4 layers of width 256.
Then it times training steps of the same model (batch 32 x 512 tokens) to compare the
evaluation with the 200 steps between two validations. Prints a table; measures, asserts
nothing.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lit_icl.callbacks import ICLConversionCallback
from lit_icl.data import TextDataModule
from lit_icl.data.templates import TemplateTask
from lit_icl.model import TransformerConfig, TransformerLM

WORDS = ("the film story actor scene plot music light dark long short good bad great poor slow fast "
         "funny sad warm cold old new young bright dull strong weak kind cruel rich thin deep flat "
         "moves shows tells makes keeps leaves brings finds loses wins turns holds runs falls rises "
         "and but with without into over under after before while because though a an this that").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_data(root: Path, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(sentence(rng, 40, 120) for _ in range(4000)) + "\n")
    task = root / "task"
    task.mkdir()
    for split, n in (("train", 1000), ("validation", 300)):
        rows = [{"text": sentence(rng, 15, 40), "label": i % 2} for i in range(n)]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return corpus, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=128)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--batch_size", type=int, default=32, help="episodes per forward / finetuning batch")
    parser.add_argument("--train_steps", type=int, default=5, help="training steps to time")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, task_dir = write_data(Path(tmp))
        task = TemplateTask(name="toy", source=str(task_dir), text_field="text", label_field="label",
                            verbalizer={0: "negative", 1: "positive"},
                            template="Review: {text}\nSentiment: {label}\n")
        dm = TextDataModule(corpus=str(corpus), block_size=512, vocab_size=16384, cache_dir=str(Path(tmp) / "cache"),
                            batch_size=32, templates=[task], num_heldout=args.episodes)
        dm.setup("fit")
        torch.manual_seed(0)
        cfg = TransformerConfig(vocab_size=16384, n_layer=4, n_head=4, n_embd=256, block_size=512,
                                position="rope", momentum=0.5, token_shift=True)
        model = TransformerLM(cfg)
        callback = ICLConversionCallback(shots=args.shots, num_episodes=args.episodes, batch_size=args.batch_size,
                                         finetune_lr=0.01, too_long="drop")
        callback.prepare(dm, cfg.block_size)
        lengths = {k: int(e.prompt_lengths.max()) for (_, k), e in callback.episodes.items()}
        print(f"longest prompt per shot count: {lengths}")

        class _Trainer:  # what _run reads of a Trainer: one process
            global_rank, world_size = 0, 1

        seconds: dict[str, float] = {}
        start = time.perf_counter()
        for task_name, k in callback.episodes:
            callback._run(_Trainer(), model, "cpu", task_name, k, seconds).compute()
        total = time.perf_counter() - start

        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loader = iter(dm.train_dataloader())
        step_seconds = []
        for _ in range(args.train_steps + 1):
            batch = next(loader)
            t = time.perf_counter()
            logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_seconds.append(time.perf_counter() - t)
        step = sorted(step_seconds[1:])[len(step_seconds[1:]) // 2]  # median, the first step warms up
    print(f"\nICL evaluation: {args.episodes} episodes x shots {args.shots}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'phase':>10}  {'seconds':>8}  {'share':>6}")
    for phase, v in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{phase:>10}  {v:8.2f}  {100 * v / total:5.1f}%")
    print(f"{'total':>10}  {total:8.2f}")
    print(f"\ntraining step (batch 32 x 512 tokens): {step:.2f} s median of {args.train_steps}; "
          f"200 steps ~ {200 * step:.0f} s; evaluation / 200 steps = {total / (200 * step):.2f}")


if __name__ == "__main__":
    main()
