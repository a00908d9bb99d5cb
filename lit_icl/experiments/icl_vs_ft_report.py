"""The report of `scripts/reproduce.py icl-vs-ft` (`lit_icl.experiments.icl_vs_ft`): the summary
of its runs, the accuracy and similarity tables, the cost, a "Reading" paragraph computed from the
numbers, the figure, and the README section. Nothing here holds a result: every figure is read
from the runs (the paper's own numbers, PAPER, excepted)."""
from __future__ import annotations

import statistics
from pathlib import Path

from lit_icl.experiments import pretrained
from lit_icl.experiments.runs import save_figure

NAME = "icl-vs-ft"
REPORT_TITLE = "# In-context learning vs finetuning on a pretrained LM (Dai et al., 2023; Deutch et al., 2024)"
README_TITLE = "### In-context learning vs finetuning (Dai et al., 2023, Tables 2-5; Deutch et al., 2024)"
# Dai et al. (2023), GPT 1.3B / 2.7B, averaged over their six classification tasks
PAPER = {"rec2ftp": (85.6, 89.4), "simaou": (0.186, 0.225), "simam_icl_ft": (0.442, 0.434),
         "simam_icl_zsl": (0.338, 0.355)}
SIM_COLUMNS = [("rec2ftp", "Rec2FTP (%)"), ("simaou", "SimAOU"), ("simaou_random", "SimAOU random"),
               ("simam_icl_ft", "SimAM(ICL,FT)"), ("simam_icl_zsl", "SimAM(ICL,ZSL)")]
ICL_GAIN = 0.30  # "ICL works on a function task": prompted at the largest shot count >= zero-shot + 30 points
LABEL_TASKS = ("mr", "bbc")


def mean(values) -> float:
    values = [v for v in values if v == v]  # NaN (Rec2FTP with nothing to recall) left out
    return statistics.fmean(values) if values else float("nan")


def fmt(v: float, pct: bool = False) -> str:
    if v != v:
        return "undefined"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def exact_name(row: dict) -> str:
    """The exact conversion's accuracy: converted_kv_acc (softmax KV prefix) or converted_acc."""
    return "converted_kv_acc" if "converted_kv_acc" in row else "converted_acc"


def summarize(data: dict) -> dict:
    """Per task and shot count the metrics, the chosen rates, the cost, and the facts the
    Reading paragraph states (computed here, so the JSON holds them too)."""
    cfg, runs = data["config"], data["runs"]
    tasks = {t: runs[t]["result"]["shots"] for t in cfg["tasks"]}
    shots, kmax = cfg["shots"], max(cfg["shots"])
    top = {t: per_k[str(kmax)] for t, per_k in tasks.items()}
    rows = [(t, k, per_k[str(k)]) for t, per_k in tasks.items() for k in shots]
    exact = exact_name(rows[0][2])
    functions = [t for t in tasks if t not in LABEL_TASKS]
    seconds = {t: runs[t]["seconds"] for t in tasks}
    phases: dict[str, float] = {}
    for t in tasks:
        for phase, s in runs[t]["result"]["seconds"].items():
            phases[phase] = round(phases.get(phase, 0.0) + s, 1)
    sim = [m + s for m, _ in SIM_COLUMNS for s in ("", "_untrained")]
    facts = {
        "kmax": kmax,
        "function_tasks": functions,
        "icl_gain": {t: top[t]["prompted_acc"] - top[t]["zero_shot_acc"] for t in tasks},
        "icl_works": [t for t in functions if top[t]["prompted_acc"] - top[t]["zero_shot_acc"] >= ICL_GAIN - 1e-9],
        "converted_differs": [[t, k] for t, k, r in rows if r[exact] != r["prompted_acc"]],
        "ft_changed": {t: top[t]["ft_changed"] for t in tasks},
        "ft_changed_any": max(r["ft_changed"] for _, _, r in rows),
        "ft_moved": [[t, k, r["finetuned_acc"] - r["zero_shot_acc"]] for t, k, r in rows
                     if r["finetuned_acc"] != r["zero_shot_acc"]],
        "query_tokens_functions": mean([runs[t]["result"]["query_tokens"] for t in functions]),
        "answer_tokens_functions": mean([runs[t]["result"]["answer_tokens"] for t in functions]),
        "dropped_demos": {t: {k: d for k, d in runs[t]["result"]["dropped_demos"].items() if d}
                          for t in tasks if any(runs[t]["result"]["dropped_demos"].values())},
        "short_validation": {t: runs[t]["result"]["validation_size"] for t in tasks
                             if runs[t]["result"]["validation_size"] < cfg["episodes"] + cfg["lr_episodes"]},
    }
    return {
        "kmax": kmax, "exact": exact, "tasks": tasks,
        "lr": {t: {str(k): per_k[str(k)]["finetune_lr"] for k in shots if k > 0} for t, per_k in tasks.items()},
        "mean_kmax": {m: mean([r.get(m, float("nan")) for r in top.values()])
                      for m in [*top[next(iter(top))], *sim] if not m.startswith("finetune_")},
        "conversion_error": {m: max(r[m] for _, k, r in rows if k > 0) if kmax > 0 else 0.0
                             for m in ("max_abs_logit_diff", "rel_logit_err")},
        "seconds": {"per_task": seconds, "per_phase": phases},
        "reading": facts,
    }


def lr_cell(per_k: dict) -> str:
    return " / ".join(f"{per_k[k]:g}" for k in sorted(per_k, key=int)) or "none (no demonstrations)"


def tables(data: dict) -> list[str]:
    s, cfg = data["summary"], data["config"]
    kmax, shots = s["kmax"], [k for k in cfg["shots"] if k > 0]
    head = ["zero-shot", *[f"ICL {k}" for k in shots]]
    if kmax > 0:
        head += [f"converted {kmax}", f"finetuned {kmax}", f"FT changed {kmax}",
                 "lr " + "/".join(str(k) for k in shots)]
    lines = [f"Accuracy (%) per task; the number is the shot count (prompted = ICL). Function tasks: exact match of "
             "the whole answer, teacher-forced; mr, bbc: argmax over the label words' first tokens. \"FT changed\": "
             "the share (%) of episodes whose finetuned prediction differs from the zero-shot one. lr: the finetuning "
             "rate chosen per shot count.", "",
             "| task | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for task, per_k in s["tasks"].items():
        r = per_k[str(kmax)]
        cells = [fmt(per_k[str(cfg["shots"][0])]["zero_shot_acc"], True), *[fmt(per_k[str(k)]["prompted_acc"], True)
                                                                          for k in shots]]
        if kmax > 0:
            cells += [fmt(r[s["exact"]], True), fmt(r["finetuned_acc"], True), fmt(r["ft_changed"], True),
                      lr_cell(s["lr"][task])]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if kmax == 0:
        return lines
    lines += ["", f"Similarity of ICL and finetuning at {kmax} shots, on the trained model and on an untrained model "
              "of the same architecture (Deutch et al., 2024):", "",
              "| task | " + " | ".join(f"{h} | untrained" for _, h in SIM_COLUMNS) + " |",
              "|---|" + "---|" * (2 * len(SIM_COLUMNS))]
    top = [(t, per_k[str(kmax)]) for t, per_k in s["tasks"].items()] + [("**mean**", s["mean_kmax"])]
    for task, r in top:
        cells = [fmt(r.get(m + suffix, float("nan")), m == "rec2ftp") for m, _ in SIM_COLUMNS
                 for suffix in ("", "_untrained")]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    paper = [f"{PAPER[m][0]} / {PAPER[m][1]}" if m in PAPER else "≈0" for m, _ in SIM_COLUMNS]
    lines.append("| Dai et al. (2023), GPT 1.3B / 2.7B, 32 shots | " + " | ".join(f"{p} | not reported" for p in paper) + " |")
    err = s["conversion_error"]
    lines += ["", "Rec2FTP is undefined where finetuning corrected no query that zero-shot got wrong (nothing to "
              "recall). Largest conversion error over all rows (the query on the demonstrations' KV state against "
              f"the whole prompt in one pass): max |logit difference| {err['max_abs_logit_diff']:.2e}, relative "
              f"{err['rel_logit_err']:.2e}.", "", approximate_line(data), "", cost_line(data)]
    return lines


def approximate_line(data: dict) -> str:
    s, cfg = data["summary"], data["config"]
    m = s["mean_kmax"]
    parts = [f"{mode} {fmt(m[f'converted_{mode}_acc'], True)}% (largest relative logit error "
             f"{max(r[str(s['kmax'])][f'rel_logit_err_{mode}'] for r in s['tasks'].values()):.2e})"
             for mode in cfg["approximate"] if f"converted_{mode}_acc" in m]
    return (f"ICLAA's approximate conversions (Chen et al., 2024) at {s['kmax']} shots, mean accuracy over the tasks: "
            + "; ".join(parts) + f", against prompted {fmt(m['prompted_acc'], True)}%.") if parts else ""


def cost_line(data: dict) -> str:
    sec = data["summary"]["seconds"]
    tasks = ", ".join(f"{t} {v:.0f} s" for t, v in sec["per_task"].items())
    phases = ", ".join(f"{p} {v:.1f} s" for p, v in sorted(sec["per_phase"].items(), key=lambda kv: -kv[1]))
    return (f"Cost: {sum(sec['per_task'].values()) / 60:.1f} min in all. Per task: {tasks}. Per phase, summed over "
            f"the tasks: {phases}.")


def names(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def reading(data: dict) -> str:
    """What the numbers say, in words, every figure read from the summary."""
    s, cfg = data["summary"], data["config"]
    f, kmax, m = s["reading"], s["kmax"], s["mean_kmax"]
    if kmax == 0:
        return "**Reading.** Only zero-shot was run: there is nothing to compare."
    out = []
    fn = f["function_tasks"]
    if fn:
        works = f["icl_works"]
        best = max(fn, key=lambda t: f["icl_gain"][t])
        out.append(f"In-context learning: {kmax}-shot prompting is at least {100 * ICL_GAIN:.0f} points above "
                   f"zero-shot on {len(works)} of {len(fn)} function tasks" + (f" ({names(works)})" if works else "")
                   + f"; the largest gain is {fmt(f['icl_gain'][best], True)} points ({best}).")
    for t in [t for t in s["tasks"] if t in LABEL_TASKS]:
        out.append(f"On {t}, {kmax}-shot prompting moves accuracy by {fmt(f['icl_gain'][t], True)} points from zero-shot.")
    diff = f["converted_differs"]
    out.append("The exact conversion (the query alone on the demonstrations' KV state) has the prompted accuracy on "
               "every row." if not diff else "The exact conversion differs from prompting on " +
               names(f"{t} at {k} shots" for t, k in diff) + ".")
    changed = f["ft_changed"]
    if f["ft_changed_any"] == 0:
        out.append("Finetuning on the demonstrations changed no prediction on any task or shot count: the finetuned "
                   "accuracy is the zero-shot accuracy throughout, at every chosen rate.")
    else:
        lo, hi = min(changed, key=changed.get), max(changed, key=changed.get)
        moved = f["ft_moved"]
        out.append(f"Finetuning on the demonstrations (at the rate chosen by the answers' loss) changed the "
                   f"prediction of {fmt(mean(changed.values()), True)}% of the episodes at {kmax} shots on average "
                   f"({fmt(changed[lo], True)}% on {lo} to {fmt(changed[hi], True)}% on {hi}), "
                   + ("but its accuracy never moved from zero-shot: the changed predictions were wrong before and after."
                      if not moved else
                      f"and its accuracy moved from zero-shot on {len(moved)} of {len(s['tasks']) * len(cfg['shots'])} "
                      f"task and shot rows ({span(moved)}); at {kmax} shots it averages "
                      f"{fmt(m['finetuned_acc'], True)}% against zero-shot {fmt(m['zero_shot_acc'], True)}% and "
                      f"prompted {fmt(m['prompted_acc'], True)}%."))
    out.append(paper_comparison(m))
    q = f["query_tokens_functions"]
    if q == q:
        top = [s["tasks"][t][str(kmax)] for t in fn]
        sims = "; ".join(f"{label} {fmt(mean(r[name] for r in top))} trained vs "
                         f"{fmt(mean(r[name + '_untrained'] for r in top))} untrained"
                         for name, label in (("simam_icl_ft", "SimAM(ICL,FT)"), ("simam_icl_zsl", "SimAM(ICL,ZSL)")))
        out.append(f"A function task's query is short ({q:.1f} tokens on average, e.g. \"apple ->\"), so SimAM compares "
                   "two attention distributions of its last token over only that many positions, few enough to be close "
                   "to degenerate: it means something only against the untrained baseline (function tasks, "
                   f"{kmax} shots: {sims}).")
    out.append("For answers of several tokens "
               + (f"({f['answer_tokens_functions']:.1f} tokens on average on the function tasks) " if fn else "")
               + "the similarity metrics read the query's last token, the position that predicts the answer's first "
               "token, as Dai et al. (2023) do for label words; the accuracies score the whole answer.")
    if f["short_validation"]:
        out.append(f"On {names(f'{t} ({n} queries)' for t, n in f['short_validation'].items())}, the "
                   f"{cfg['episodes']} evaluated and {cfg['lr_episodes']} rate-choosing episodes exceed the validation "
                   "split: queries repeat with other demonstrations, and the rate-choosing episodes reuse evaluated "
                   "queries.")
    for t, per_k in f["dropped_demos"].items():
        out.append(f"On {t}, prompts longer than the model's context lost their longest demonstrations: "
                   + ", ".join(f"{d} at {k} shots" for k, d in per_k.items()) + ".")
    return "**Reading.** " + " ".join(out)


def span(moved: list) -> str:
    lo, hi = min(d for *_, d in moved), max(d for *_, d in moved)
    return f"by {fmt(lo, True)} points" if lo == hi else f"by {fmt(lo, True)} to {fmt(hi, True)} points"


def paper_comparison(m: dict) -> str:
    p = PAPER
    rec = m["rec2ftp"]
    parts = [("Rec2FTP is undefined here (finetuning corrected no zero-shot error)" if rec != rec else
              f"Rec2FTP is {fmt(rec, True)}%") + f" against their {p['rec2ftp'][0]} / {p['rec2ftp'][1]}%",
             f"SimAOU {fmt(m['simaou'])} (random update {fmt(m['simaou_random'])}) against their "
             f"{p['simaou'][0]} / {p['simaou'][1]}"]
    ft, zsl = m["simam_icl_ft"], m["simam_icl_zsl"]
    paper_gap = p["simam_icl_ft"][0] - p["simam_icl_zsl"][0]
    verdict = ("above SimAM(ICL,ZSL) as in the paper" if ft - zsl > 0.5 * paper_gap else
               "not clearly above SimAM(ICL,ZSL), unlike the paper" if ft >= zsl else "below SimAM(ICL,ZSL), unlike the paper")
    parts.append(f"SimAM(ICL,FT) {fmt(ft)} is {verdict} ({fmt(zsl)}; theirs {p['simam_icl_ft'][0]} vs "
                 f"{p['simam_icl_zsl'][0]})")
    untrained = [(label, m[name], m[name + "_untrained"]) for name, label in SIM_COLUMNS[1:] if name != "simaou_random"]
    close = [n for n, a, b in untrained if abs(a - b) <= 0.5 * max(abs(a), abs(b))]
    text = (f"Against Dai et al. (2023), averaged over the tasks at the largest shot count: {'; '.join(parts)}. "
            "Against Deutch et al. (2024), who found that untrained models score comparable similarity: the "
            "untrained model scores "
            + "; ".join(f"{n} {fmt(b)} (trained {fmt(a)})" for n, a, b in untrained) + ", ")
    return text + (f"comparable (within a factor two) on {names(close)}." if close else "comparable on none of them.")


def setup_lines(data: dict) -> list[str]:
    cfg = data["config"]
    fn = [t for t in cfg["tasks"] if t not in LABEL_TASKS]
    labels = [t for t in cfg["tasks"] if t in LABEL_TASKS]
    sources = {"mr": "mr: Pang & Lee sentences", "bbc": f"bbc: BBC News articles cut to their first {cfg['bbc_words']} words"}
    data_words = ("toy data written by the experiment (function tasks on a few dozen self-written words)" if cfg["quick"]
                  else "; ".join((["the `functions` source"] if fn else []) + [sources[t] for t in labels if t in sources]))
    return [f"- Model: {pretrained.model_name(cfg)}; its untrained baseline: the same architecture initialised by "
            f"TransformerLM's own scheme (normal(0, 0.02)) from seed {cfg['seed']}.",
            "- Tasks: " + "; ".join(filter(None, [
                f"{len(fn)} function tasks ({', '.join(fn)}; Hendel et al., 2023; Todd et al., 2024), template "
                "`{input} -> {output}`, open vocabulary, scored by teacher-forced exact match of the whole answer"
                if fn else "", f"{', '.join(labels)}, label words, argmax over their first tokens" if labels else ""]))
            + f". Data: {data_words}.",
            f"- {cfg['episodes']} held-out episodes per task and shot count {cfg['shots']}: queries from the validation "
            "split, demonstrations from the train split (the demonstrations of k shots are a subset of those of more).",
            "- Converted: the query on the demonstrations' exact KV state (checked against one pass over the whole prompt "
            f"on the first {cfg['batch_size']} episodes)" + (
                f" and ICLAA's {', '.join(cfg['approximate'])} approximations ({cfg['num_features']} random features)."
                if cfg["approximate"] else "; no ICLAA approximation here (`scripts/reproduce.py iclaa` measures them: "
                "a Taylor state of SmolLM2 holds 4161 features per head, some 290 MB per episode)."),
            "- Finetuned: SGD, one epoch, batch size 1, LM loss on every demonstration token, key and value projections "
            "only (Dai et al., 2023). The rate is chosen per task and shot count from "
            f"{', '.join(f'{lr:g}' for lr in cfg['lr_grid'])} by the finetuned copies' mean loss on the answers of "
            f"{cfg['lr_episodes']} other held-out episodes (after the evaluated ones); each rate's loss is in the JSON "
            "(`finetune_select_loss/lr=...`).",
            "- SimAOU's random baseline: the ICL update against random directions. Everything runs through "
            "`lit_icl.evaluation.evaluate`, one call per task over all shot counts (the zero-shot pass shared)."]


def differences(data: dict) -> str:
    cfg = data["config"]
    return ("Scale and setup differ: Dai et al. (2023) use GPT 1.3B / 2.7B with 32 demonstrations on six classification "
            f"tasks; here a 135M instruction-tuned model (4-bit weights), up to {max(cfg['shots'])} demonstrations, "
            f"{len(cfg['tasks'])} tasks, most of them open-vocabulary function tasks, and {cfg['episodes']} episodes "
            "per shot count; the finetuning rate is chosen by loss on held-out answers rather than tuned by accuracy. "
            "Deutch et al. (2024) argue that a similarity figure is only meaningful against an untrained model: "
            "compare each value with its untrained column.")


def figures(data: dict, out: Path) -> list[str]:
    """icl-vs-ft.png: prompted accuracy against shots per function task (all tasks when none is a
    function task), zero-shot dashed, finetuned as crosses."""
    from lit_icl.plots import plt

    s = data["summary"]
    tasks = s["reading"]["function_tasks"] or list(s["tasks"])
    cols = min(len(tasks), 5)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        per_k = s["tasks"][task]
        shots = sorted(int(k) for k in per_k)
        ax.plot(shots, [100 * per_k[str(k)]["prompted_acc"] for k in shots], marker="o", label="prompted")
        ax.axhline(100 * per_k[str(shots[0])]["zero_shot_acc"], color="grey", linestyle="--", label="zero-shot")
        ax.plot(shots, [100 * per_k[str(k)]["finetuned_acc"] for k in shots], "x", color="C3", label="finetuned")
        ax.set_title(task, fontsize=9)
        ax.set_ylim(-3, 103)
        ax.set_xticks(shots)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("demonstrations")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    return save_figure(fig, out, NAME)


def report(data: dict) -> str:
    return pretrained.report(NAME, REPORT_TITLE, data, setup_lines(data), tables(data) + ["", reading(data)],
                             differences(data))


def readme_section(data: dict, rel: str) -> str:
    return pretrained.readme_section(NAME, README_TITLE, data, rel, setup_lines(data), tables(data) + ["", reading(data)],
                                     differences(data))
