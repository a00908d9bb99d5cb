"""`scripts/reproduce.py icl-vs-ft` (Dai et al., 2023, Tables 2-5; Deutch et al., 2024) on a pretrained LM.

The ICL callback (`lit_icl.callbacks.ICLConversionCallback`, its own `evaluate`) on the template
tasks `mr` and `bbc` with SmolLM2-135M, one run per task and shot count: zero-shot, prompted,
converted (the exact KV prefix and the ICLAA modes), finetuned accuracy, Rec2FTP, SimAOU with its
random-update baseline, SimAM(ICL, FT) and SimAM(ICL, ZSL), and the similarity metrics again on an
untrained model of the same architecture (`untrained_baseline`). The finetuning learning rate is
chosen first, per task, on held-out episodes of another seed (a small grid), as the paper tuned
its finetuning.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from lit_icl.experiments import pretrained
from lit_icl.experiments.pretrained import TEMPLATES, load, quick_texts
from lit_icl.experiments.runs import log, save_figure

FULL = dict(model="smollm2-135m", tasks=["mr", "bbc"], shots=[0, 1, 2, 4, 8], episodes=200, bbc_words=40,
            lr_grid=[1e-4, 1e-3, 1e-2, 1e-1], lr_episodes=16, lr_shots=4, lr_seed=1, batch_size=4,
            approximate=["taylor", "prf"], num_features=256, seed=0)
QUICK = dict(FULL, model="quick", shots=[0, 1, 2], episodes=4, lr_grid=[1e-2, 1e-1], lr_episodes=2, lr_shots=1,
             num_features=16, bbc_words=8)
PAPER = {"rec2ftp": (85.6, 89.4), "simaou": (0.186, 0.225), "simam_icl_ft": (0.442, 0.434),
         "simam_icl_zsl": (0.338, 0.355)}
NAME = "icl-vs-ft"
REPORT_TITLE = "# In-context learning vs finetuning on a pretrained LM (Dai et al., 2023; Deutch et al., 2024)"
README_TITLE = "### In-context learning vs finetuning (Dai et al., 2023, Tables 2-5; Deutch et al., 2024)"
FREE = ("tasks", "shots", "lr_grid", "batch_size")  # fields that pick runs, not what a run computes (runs.Store)


def config(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    for field in ("episodes", "shots", "tasks", "lr_grid", "lr_episodes", "batch_size"):
        if getattr(args, field) is not None:
            cfg[field] = getattr(args, field)
    unknown = sorted(set(cfg["tasks"]) - set(TEMPLATES))
    if unknown:
        raise ValueError(f"--tasks {unknown}: unknown; allowed: {sorted(TEMPLATES)}")
    return cfg


def task_source(task: str, cfg: dict, out: Path) -> str:
    """The folder of a task's train.jsonl / validation.jsonl: mr as fetched; bbc with each article
    cut to its first `bbc_words` words (so that 8 demonstrations fit and stay cheap); toy data
    written here for --quick."""
    if cfg["quick"]:
        folder = out / "data" / f"quick_{task}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for split, n, seed in (("train", 60, 1), ("validation", 20, 2)):
                rows = [json.dumps({"text": t, "label": c}) for t, c in quick_texts(task, n, seed)]
                (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        return str(folder)
    source = pretrained.named(task)
    if task != "bbc":
        return source
    folder = out / "data" / f"bbc_first{cfg['bbc_words']}words"
    if not folder.exists():
        folder.mkdir(parents=True)
        for split in ("train", "validation"):
            rows = [json.loads(line) for line in Path(source, f"{split}.jsonl").read_text().splitlines() if line]
            cut = [json.dumps({"text": " ".join(r["text"].split()[: cfg["bbc_words"]]), "label": r["label"]}) for r in rows]
            (folder / f"{split}.jsonl").write_text("\n".join(cut) + "\n")
    return str(folder)


def datamodule(cfg: dict, out: Path, tokenizer: str, seed: int):
    from lit_icl.data import TemplateDataModule

    tasks = [dict(name=t, source=task_source(t, cfg, out), template=TEMPLATES[t][0], verbalizer=TEMPLATES[t][1],
                  seed=seed) for t in cfg["tasks"]]
    return TemplateDataModule(templates=tasks, tokenizer=tokenizer, num_heldout=cfg["episodes"],
                              cache_dir=str(out / "cache") if cfg["quick"] else None)


def evaluate(model, dm, task: str, k: int, episodes: int, cfg: dict, lr: float, modes, untrained: bool) -> dict:
    """The ICL callback's metrics for one task and shot count (its own `evaluate`)."""
    import lightning.pytorch as pl

    from lit_icl.callbacks import ICLConversionCallback

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    cb = ICLConversionCallback(shots=[k], num_episodes=episodes, batch_size=cfg["batch_size"], finetune_params="kv",
                               finetune_lr=lr, approximate_modes=modes, num_features=cfg["num_features"],
                               seed=cfg["seed"], too_long="drop", untrained_baseline=untrained)
    cb.prepare(dm, model.config.block_size)
    row = cb.evaluate(trainer, model.to(device), device, task)[k]
    row["prompt_tokens_mean"] = float(cb.episodes[(task, k)].prompt_lengths.float().mean())
    return row


def tuned_lr(data: dict, task: str) -> float:
    """The grid's learning rate with the best finetuned accuracy (ties: the smaller one)."""
    grid = [(r["result"]["finetuned_acc"], -r["lr"], r["lr"]) for r in data["runs"].values()
            if r.get("kind") == "lr" and r["task"] == task and r["lr"] in data["config"]["lr_grid"]]
    return max(grid)[2]


def run(store, out: Path) -> None:
    cfg = store.data["config"]
    model, tokenizer = load(cfg, out)
    tuning = datamodule(dict(cfg, episodes=cfg["lr_episodes"]), out, tokenizer, cfg["lr_seed"])
    for task in cfg["tasks"]:
        for lr in cfg["lr_grid"]:
            store.run(f"lr-{task}-{lr:g}", lambda: evaluate(model, tuning, task, cfg["lr_shots"], cfg["lr_episodes"],
                                                            cfg, lr, (), False),
                      kind="lr", task=task, lr=lr, shots=cfg["lr_shots"], seed=cfg["lr_seed"])
    dm = datamodule(cfg, out, tokenizer, 0)
    for task in cfg["tasks"]:
        lr = tuned_lr(store.data, task)
        log(f"{task}: finetuning learning rate {lr:g} (tuned on {cfg['lr_episodes']} episodes of seed {cfg['lr_seed']})")
        for k in cfg["shots"]:
            store.run(f"{task}-k{k}", lambda: evaluate(model, dm, task, k, cfg["episodes"], cfg, lr, cfg["approximate"], True),
                      kind="eval", task=task, shots=k, lr=lr, seed=0)


def summarize(data: dict) -> dict:
    cfg, runs = data["config"], data["runs"]
    out = {"lr": {t: tuned_lr(data, t) for t in cfg["tasks"]}, "tasks": {}}
    for task in cfg["tasks"]:
        out["tasks"][task] = {str(k): runs[f"{task}-k{k}"]["result"] for k in cfg["shots"]}  # JSON keys are strings
    shown = [r for t in cfg["tasks"] for k, r in by_shots(out["tasks"][t]) if k > 0]
    out["mean_k>0"] = {m: mean([r[m] for r in shown]) for m in shown[0]} if shown else {}
    return out


def by_shots(per_k: dict) -> list[tuple[int, dict]]:
    """(shots, row) pairs of a task's summary, by increasing shots."""
    return sorted((int(k), row) for k, row in per_k.items())


def mean(values: list[float]) -> float:
    values = [v for v in values if v == v]  # NaN (e.g. Rec2FTP with nothing to recall) left out
    return statistics.fmean(values) if values else float("nan")


def fmt(v: float, pct: bool = False) -> str:
    return "—" if v != v else (f"{100 * v:.1f}" if pct else f"{v:.3f}")


ACC_COLUMNS = [("zero_shot_acc", "ZSL"), ("prompted_acc", "ICL"), ("converted_kv_acc", "conv. KV"),
               ("converted_taylor_acc", "conv. taylor"), ("converted_prf_acc", "conv. prf"), ("finetuned_acc", "FT")]
SIM_COLUMNS = [("rec2ftp", "Rec2FTP"), ("simaou", "SimAOU"), ("simaou_random", "SimAOU rand."),
               ("simam_icl_ft", "SimAM(ICL,FT)"), ("simam_icl_zsl", "SimAM(ICL,ZSL)")]


def tables(data: dict) -> list[str]:
    s, cfg = data["summary"], data["config"]
    acc = [(m, h) for m, h in ACC_COLUMNS if m in next(iter(next(iter(s["tasks"].values())).values()))]
    lines = ["Accuracy (%) over the candidate label words:", "",
             "| task | shots | " + " | ".join(h for _, h in acc) + " | prompt tokens |",
             "|---|---|" + "---|" * (len(acc) + 1)]
    for task, per_k in s["tasks"].items():
        for k, r in by_shots(per_k):
            lines.append(f"| {task} | {k} | " + " | ".join(fmt(r[m], True) for m, _ in acc) + f" | {r['prompt_tokens_mean']:.0f} |")
    lines += ["", "Similarity of ICL and finetuning, trained model / untrained model of the same architecture "
              "(Deutch et al., 2024); Rec2FTP in %:", "",
              "| task | shots | " + " | ".join(h for _, h in SIM_COLUMNS) + " |", "|---|---|" + "---|" * len(SIM_COLUMNS)]
    rows = [(t, k, r) for t, per_k in s["tasks"].items() for k, r in by_shots(per_k) if k > 0]
    rows.append(("**mean**", "k>0", s["mean_k>0"]))
    for task, k, r in rows:
        cells = [f"{fmt(r[m], m == 'rec2ftp')} / {fmt(r.get(m + '_untrained', float('nan')), m == 'rec2ftp')}" for m, _ in SIM_COLUMNS]
        lines.append(f"| {task} | {k} | " + " | ".join(cells) + " |")
    p = PAPER
    lines.append(f"| paper (GPT 1.3B / 2.7B) | 32 | {p['rec2ftp'][0]} / {p['rec2ftp'][1]} | {p['simaou'][0]} / {p['simaou'][1]} "
                 f"| ≈0 | {p['simam_icl_ft'][0]} / {p['simam_icl_ft'][1]} | {p['simam_icl_zsl'][0]} / {p['simam_icl_zsl'][1]} |")
    lines += ["", "(The paper row gives its two models' values, not trained / untrained.)", "",
              "Finetuning learning rate (SGD, one epoch, batch size 1, key and value projections), tuned per task "
              f"on {cfg['lr_episodes']} held-out episodes of another seed at {cfg['lr_shots']} shots, by finetuned accuracy:", "",
              "| task | " + " | ".join(f"lr={lr:g}" for lr in cfg["lr_grid"]) + " | chosen |", "|---|" + "---|" * (len(cfg["lr_grid"]) + 1)]
    for task in cfg["tasks"]:
        cells = [fmt(data["runs"][f"lr-{task}-{lr:g}"]["result"]["finetuned_acc"], True) for lr in cfg["lr_grid"]]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {s['lr'][task]:g} |")
    return lines


def findings(data: dict) -> str:
    m = data["summary"]["mean_k>0"]
    if not m:
        return ""
    return (f"Averaged over tasks and shot counts > 0: SimAOU {fmt(m['simaou'])} (random update {fmt(m['simaou_random'])}, "
            f"untrained model {fmt(m['simaou_untrained'])}); SimAM(ICL, FT) {fmt(m['simam_icl_ft'])} vs SimAM(ICL, ZSL) "
            f"{fmt(m['simam_icl_zsl'])} (untrained: {fmt(m['simam_icl_ft_untrained'])} vs {fmt(m['simam_icl_zsl_untrained'])}); "
            f"Rec2FTP {fmt(m['rec2ftp'], True)}% (untrained {fmt(m['rec2ftp_untrained'], True)}%). "
            f"Prompted accuracy {fmt(m['prompted_acc'], True)}% vs finetuned {fmt(m['finetuned_acc'], True)}% and zero-shot "
            f"{fmt(m['zero_shot_acc'], True)}%.")


def figures(data: dict, out: Path) -> list[str]:
    """icl-vs-ft.png: per task, accuracy and the similarity metrics against the shot count."""
    from lit_icl.plots import plt

    tasks = data["summary"]["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), dpi=100, squeeze=False)
    for col, (task, per_k) in enumerate(tasks.items()):
        shots, per_k = [k for k, _ in by_shots(per_k)], dict(by_shots(per_k))
        ax = axes[0][col]
        for m, label in ACC_COLUMNS:
            if m in per_k[shots[0]]:
                ax.plot(shots, [100 * per_k[k][m] for k in shots], marker="o", label=label)
        ax.set_title(f"{task}: accuracy")
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for m, label in SIM_COLUMNS[1:]:
            for suffix, style in (("", "-"), ("_untrained", ":")):
                if m + suffix in per_k[shots[0]]:
                    ax.plot(shots[1:], [per_k[k][m + suffix] for k in shots[1:]], style, marker="o",
                            label=label + (" (untrained)" if suffix else ""))
        ax.set_title(f"{task}: similarity (dotted: untrained model)")
        ax.set_xlabel("demonstrations")
        ax.legend(fontsize=6)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return save_figure(fig, out, NAME)


def setup_lines(data: dict) -> list[str]:
    cfg = data["config"]
    return [f"- Model: {pretrained.model_name(cfg)}; its untrained baseline: the same architecture initialised by "
            f"TransformerLM's own scheme (normal(0, 0.02)) from seed {cfg['seed']}.",
            f"- Tasks: {', '.join(cfg['tasks'])} ({'toy data' if cfg['quick'] else 'mr: Pang & Lee sentences; bbc: BBC News articles cut to their first ' + str(cfg['bbc_words']) + ' words'}), "
            f"{cfg['episodes']} held-out episodes per shot count {cfg['shots']}, class-balanced demonstrations; "
            "prediction = argmax over the label words' first tokens.",
            f"- Converted: the exact KV prefix and ICLAA's {', '.join(cfg['approximate'])} biases ({cfg['num_features']} random features).",
            "- Finetuned: SGD, one epoch, batch size 1, LM loss on every demonstration token, key and value projections "
            "only (Dai et al., 2023), the learning rate tuned as below.",
            "- Everything runs through `ICLConversionCallback.evaluate` (the same code `lit-icl validate` runs)."]


def differences(data: dict) -> str:
    cfg = data["config"]
    return ("Scale and setup differ: the paper uses GPT 1.3B / 2.7B with 32 demonstrations on six tasks; here a 135M "
            f"instruction-tuned model (4-bit weights), up to {max(cfg['shots'])} demonstrations, {len(cfg['tasks'])} tasks "
            f"and {cfg['episodes']} episodes per shot count. " + findings(data) +
            " Deutch et al. (2024) argue that a similarity figure is only meaningful against the untrained baseline: "
            "compare each trained value with the one after the slash.")


def report(data: dict) -> str:
    return pretrained.report(NAME, REPORT_TITLE, data, setup_lines(data), tables(data) + ["", findings(data)],
                             differences(data))


def readme_section(data: dict, rel: str) -> str:
    return pretrained.readme_section(NAME, README_TITLE, data, rel, setup_lines(data), tables(data), differences(data))
