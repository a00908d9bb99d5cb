"""`scripts/reproduce.py icl-vs-ft` (Dai et al., 2023, Tables 2-5; Deutch et al., 2024) on a pretrained LM.

The comparison of in-context learning with explicit finetuning, `lit_icl.evaluation.evaluate`
called directly (no Trainer), on SmolLM2-135M: the 13 function tasks of the `functions` source
("apple -> APPLE", "France -> Paris"; Hendel et al., 2023; Todd et al., 2024), open-vocabulary
and scored by teacher-forced exact match, and the label tasks `mr` and `bbc`. One run per task
(every shot count in one `evaluate` call, so the zero-shot pass is shared): zero-shot, prompted,
converted (the exact KV prefix; ICLAA's approximate modes in --quick, `iclaa` measures them), finetuned accuracy, the share of
episodes finetuning changed, Rec2FTP, SimAOU with its random-update baseline, SimAM(ICL, FT) and
SimAM(ICL, ZSL), the same similarity metrics on an untrained model of the same architecture
(Deutch et al., 2024), and the phase times. The finetuning learning rate is chosen per task and
shot count from a grid by the finetuned copies' mean loss on the answers of `lr_episodes`
held-out episodes after the evaluated ones. The report is `icl_vs_ft_report`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lit_icl.experiments import icl_vs_ft_report, pretrained
from lit_icl.experiments.pretrained import QUICK_WORDS, TEMPLATES, load, quick_texts
from lit_icl.experiments.runs import log
from lit_icl.sources.functions import TASKS as FUNCTION_TASKS

FUNCTION_TEMPLATE = "{text} -> {label}\n"
# toy versions of the word tasks for --quick, on self-written words (no download)
QUICK_FUNCTIONS = {"uppercase": str.upper, "capitalize": str.capitalize, "first_letter": lambda w: w[0],
                   "last_letter": lambda w: w[-1], "word_length": lambda w: str(len(w))}
QUICK_EXTRA_WORDS = "apple river stone cloud green table chair light water paper house garden".split()

FULL = dict(model="smollm2-135m", tasks=[*FUNCTION_TASKS, "mr", "bbc"], shots=[0, 1, 2, 4, 8], episodes=200,
            bbc_words=40, lr_grid=[1e-4, 1e-3, 1e-2, 1e-1], lr_episodes=8, batch_size=4,
            approximate=[], num_features=256, seed=0)  # ICLAA's modes: scripts/reproduce.py iclaa
QUICK = dict(FULL, model="quick", tasks=["uppercase", "first_letter", "mr", "bbc"], shots=[0, 1, 2], episodes=4,
             approximate=["taylor", "prf"],
             lr_grid=[1e-2, 1e-1], lr_episodes=2, num_features=16, bbc_words=8)
NAME = "icl-vs-ft"
# fields that pick runs (one per task) or only change the grouping of the work, not what a run computes
FREE = ("tasks", "batch_size")

# the module interface of lit_icl.experiments.reproduce
summarize, figures, report, readme_section = (icl_vs_ft_report.summarize, icl_vs_ft_report.figures,
                                              icl_vs_ft_report.report, icl_vs_ft_report.readme_section)


def allowed_tasks(quick: bool) -> list[str]:
    return [*QUICK_FUNCTIONS, "mr", "bbc"] if quick else [*FUNCTION_TASKS, "mr", "bbc"]


def config(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    for field in ("episodes", "shots", "tasks", "lr_grid", "lr_episodes", "batch_size"):
        if getattr(args, field, None) is not None:
            cfg[field] = getattr(args, field)
    cfg["tasks"] = list(dict.fromkeys(cfg["tasks"]))
    cfg["shots"] = sorted(set(cfg["shots"]))
    allowed = allowed_tasks(cfg["quick"])
    unknown = [t for t in cfg["tasks"] if t not in allowed]
    if unknown:
        raise ValueError(f"--tasks {unknown}: unknown{' with --quick (toy data)' if cfg['quick'] else ''}; "
                         f"allowed: {allowed}")
    if any(k < 0 for k in cfg["shots"]):
        raise ValueError(f"--shots {cfg['shots']}: shot counts must be >= 0")
    if not cfg["lr_grid"] or any(not 0 < lr < float("inf") for lr in cfg["lr_grid"]):
        raise ValueError(f"--lr-grid {cfg['lr_grid']}: learning rates must be > 0 and finite")
    cfg["lr_grid"] = sorted(set(cfg["lr_grid"]))
    return cfg


def quick_function_rows(task: str) -> dict[str, list[dict]]:
    """A toy function task on self-written words: split -> rows {input, output} (seeded)."""
    words = sorted({w for classes in QUICK_WORDS.values() for ws in classes.values() for w in ws.split()}
                   | set(QUICK_EXTRA_WORDS))
    random.Random(0).shuffle(words)
    rows = [{"input": w, "output": QUICK_FUNCTIONS[task](w)} for w in words]
    return {"validation": rows[:12], "train": rows[12:]}


def write_jsonl(folder: Path, rows: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))


def task_spec(task: str, cfg: dict, out: Path) -> dict:
    """The TemplateTask of `task` (keyword dict): a function task open-vocabulary from
    `functions/<task>` (toy words for --quick), mr as fetched, bbc with each article cut to its
    first `bbc_words` words (so that 8 demonstrations fit and stay cheap); toy data for --quick."""
    if task not in ("mr", "bbc"):
        source = f"functions/{task}"
        if cfg["quick"]:
            folder = out / "data" / f"quick_{task}"
            if not folder.exists():
                write_jsonl(folder, quick_function_rows(task))
            source = str(folder)
        return dict(name=task, source=source, text_field="input", label_field="output", verbalizer={},
                    template=FUNCTION_TEMPLATE)
    spec = dict(name=task, template=TEMPLATES[task][0], verbalizer=TEMPLATES[task][1])
    if cfg["quick"]:
        folder = out / "data" / f"quick_{task}"
        if not folder.exists():
            write_jsonl(folder, {split: [{"text": t, "label": c} for t, c in quick_texts(task, n, seed)]
                                 for split, n, seed in (("train", 60, 1), ("validation", 20, 2))})
        return dict(spec, source=str(folder))
    source = pretrained.named(task)
    if task == "bbc":
        folder = out / "data" / f"bbc_first{cfg['bbc_words']}words"
        if not folder.exists():
            cut = {}
            for split in ("train", "validation"):
                rows = [json.loads(line) for line in Path(source, f"{split}.jsonl").read_text().splitlines() if line]
                cut[split] = [{"text": " ".join(r["text"].split()[: cfg["bbc_words"]]), "label": r["label"]} for r in rows]
            write_jsonl(folder, cut)
        source = str(folder)
    return dict(spec, source=source)


def evaluate_task(model, untrained, dm, task: str, cfg: dict) -> dict:
    """One task's run: `lit_icl.evaluation.evaluate` over every shot count at once."""
    from lit_icl.evaluation import evaluate

    examples = dm.tasks.examples(task)
    n, m = cfg["episodes"], cfg["lr_episodes"]
    episodes, select, dropped = {}, {}, {}
    for k in cfg["shots"]:
        # the same n + m queries (and padding) for every k: the zero-shot pass is shared by all of them
        more = dm.heldout_episodes(k, n + m, task=task)
        # a prompt longer than the model's context loses its longest demonstrations (counted)
        episodes[k], dropped[k] = more[:n].drop_longest(model.config.block_size)
        if k > 0:
            select[k], _ = more[n:].drop_longest(model.config.block_size)
    seconds: dict[str, float] = {}
    approximate = {mode: dict(mode=mode, num_features=cfg["num_features"], seed=cfg["seed"])
                   for mode in cfg["approximate"]}
    rows = evaluate(model, episodes, finetune=dict(params="kv", lr=cfg["lr_grid"][0], epochs=1),
                    approximate=approximate, batch_size=cfg["batch_size"], untrained=untrained, seed=cfg["seed"],
                    select=select, lr_grid=cfg["lr_grid"], check_batches=1, seconds=seconds)
    first = episodes[cfg["shots"][0]]
    return {
        "shots": {str(k): row for k, row in rows.items()},  # JSON keys are strings
        "seconds": {phase: round(s, 2) for phase, s in seconds.items()},
        "prompt_tokens": {str(k): float(e.prompt_lengths.float().mean()) for k, e in episodes.items()},
        "dropped_demos": {str(k): d for k, d in dropped.items()},
        "query_tokens": float(first.query_mask.float().sum(1).mean()) if first.query_mask is not None
        else float(first.query_ids.shape[1]),
        "answer_tokens": float(first.targets[1].float().sum(1).mean()),
        "open_vocabulary": first.open_vocabulary,
        "validation_size": len(examples.eval_labels),
        "train_size": len(examples.train_labels),
    }


def run(store, out: Path) -> None:
    from lit_icl.data import TemplateDataModule
    from lit_icl.evaluation import untrained_model

    cfg = store.data["config"]
    model, tokenizer = load(cfg, out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    untrained = untrained_model(model, cfg["seed"])
    dm = TemplateDataModule(templates=[task_spec(t, cfg, out) for t in cfg["tasks"]], tokenizer=tokenizer,
                            num_heldout=cfg["episodes"], cache_dir=str(out / "cache") if cfg["quick"] else None)
    for i, task in enumerate(cfg["tasks"], 1):
        log(f"{NAME}: task {i}/{len(cfg['tasks'])} {task}, shots {cfg['shots']}, {cfg['episodes']} episodes")
        store.run(task, lambda: evaluate_task(model, untrained, dm, task, cfg), kind="task", task=task,
                  shots=cfg["shots"], seed=cfg["seed"])
