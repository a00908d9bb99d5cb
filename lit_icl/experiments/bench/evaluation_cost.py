"""Section 7 of the benchmark (scripts/bench.py): what the ICL-vs-finetuning comparison
(`lit_icl.evaluation.measure`, Dai et al. 2023) costs per episode, phase by phase, before and
after it was made cheaper.

- before: `check_batches` >= the number of groups (every group also runs the whole prompt in one
  pass: the former prompted pass, timed as "check"; the state-based pass, timed as "prompted",
  is then the former conversion pass) and `share_zero_shot=False` (zero-shot once per shot count);
- after: the defaults (`check_batches=1`, `share_zero_shot=True`).

FULL: SmolLM2-135M (named source smollm2-135m, float32) on the function task `uppercase`
(open vocabulary, exact match) and on `mr` (label words), finetuning the key/value projections at
1e-3 as configs/smollm2_icl.yaml does. QUICK: the quickstart-size random model with softmax
attention on toy episodes (a label task and an open-vocabulary one), with the taylor ICLAA mode so
that every phase runs. A warm-up runs both contenders once on one group of each task; then
`reps` rounds alternate the order (before, after / after, before), each a full `measure` over
every shot count. A figure is the median over rounds of the phase's seconds divided by the
episodes evaluated (episodes x shot counts); the speedup is the median of the per-round ratios
of the totals.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from lit_icl.data.episodes import Episodes
from lit_icl.evaluation import measure
from lit_icl.experiments.bench.timing import fmt_s

EVALUATION_FULL = dict(model="smollm2-135m", tasks=("uppercase", "mr"), shots=(0, 4, 8), episodes=8, batch_size=4,
                       finetune=dict(params="kv", lr=1e-3, epochs=1), approximate=(), reps=2)
EVALUATION_QUICK = dict(model="quick", tasks=("label", "open"), shots=(0, 2, 4), episodes=4, batch_size=2,
                        finetune=dict(params="kv", lr=1e-3, epochs=1), approximate=("taylor",), reps=2)
PHASES = ("zero_shot", "prompted", "check", "convert", "finetune", "finetuned", "metrics")
CONTENDERS = {"before": dict(check_batches=10**9, share_zero_shot=False), "after": dict(check_batches=1, share_zero_shot=True)}


def real_tasks(ec: dict):
    """SmolLM2 and its episodes of `uppercase` and `mr` per shot count (cached locally)."""
    import lit_icl.sources
    from lit_icl.data.templates import TemplateEpisodes, TemplateTask
    from lit_icl.data.tokenizer import read_tokenizer
    from lit_icl.experiments.pretrained import TEMPLATES
    from lit_icl.model import TransformerLM

    model = TransformerLM.from_hf(lit_icl.sources.model_directory(ec["model"])).eval()
    tokenizer = read_tokenizer(ec["model"])
    template, verbalizer = TEMPLATES["mr"]
    tasks = {"uppercase": TemplateTask(name="uppercase", source="functions/uppercase", text_field="input",
                                       label_field="output", verbalizer={}, template="{text} -> {label}\n"),
             "mr": TemplateTask(name="mr", source="mr", template=template, verbalizer=verbalizer)}
    episodes = {}
    for name in ec["tasks"]:
        examples = TemplateEpisodes(tasks[name])
        episodes[name] = {k: examples.episodes(tokenizer, k, ec["episodes"], pad_id=0) for k in ec["shots"]}
    return model, episodes


def toy_episodes(n: int, k: int, open_vocabulary: bool) -> Episodes:
    """n toy episodes of k demonstrations (keys, a value) of varying lengths, vocabulary 1..64: a
    label task (two candidate values) or an open-vocabulary one (answers of one to three tokens).
    The queries and answers are the same for every k, as TemplateEpisodes' are."""
    g = torch.Generator().manual_seed(k + 1)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))
    demos = [[[rand(1, 33) for _ in range(rand(1, 4))] + [rand(33, 65)] for _ in range(k)] for _ in range(n)]
    g.manual_seed(0)
    queries = [[rand(1, 33) for _ in range(rand(1, 4))] for _ in range(n)]
    if not open_vocabulary:
        answers = [33 + rand(0, 2) for _ in range(n)]
        return Episodes.from_lists(demos, queries, answers, [33, 34], pad_id=0)
    answer_tokens = [[rand(33, 65) for _ in range(rand(1, 4))] for _ in range(n)]
    return Episodes.from_lists(demos, queries, [0] * n, [], pad_id=0, answer_tokens=answer_tokens)


def quick_tasks(ec: dict):
    from lit_icl.model import TransformerConfig, TransformerLM

    torch.manual_seed(0)  # a quickstart-size softmax model (the package's `lm`, which this module cannot import)
    model = TransformerLM(TransformerConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128,
                                            token_shift=True, attention="softmax")).eval()
    episodes = {name: {k: toy_episodes(ec["episodes"], k, name == "open") for k in ec["shots"]}
                for name in ec["tasks"]}
    return model, episodes


def run_once(model, episodes: dict, ec: dict, contender: str) -> dict[str, float]:
    """Seconds per phase of one `measure` over every shot count, and its wall time ("total")."""
    seconds: dict[str, float] = {}
    approximate = {m: dict(mode=m) for m in ec["approximate"]}
    start = time.perf_counter()
    measure(model, episodes, finetune=ec["finetune"], approximate=approximate, batch_size=ec["batch_size"],
            seconds=seconds, **CONTENDERS[contender])
    return {**seconds, "total": time.perf_counter() - start}


def bench_evaluation(cfg: dict) -> dict:
    ec = cfg["evaluation"]
    model, tasks = quick_tasks(ec) if ec["model"] == "quick" else real_tasks(ec)
    out = {"setting": {k: v for k, v in ec.items()}, "tasks": {}}
    for name, episodes in tasks.items():
        warm = {k: e[: ec["batch_size"]] for k, e in episodes.items() if k}
        for contender in CONTENDERS:
            run_once(model, dict(list(warm.items())[:1]), ec, contender)
        rounds: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for r in range(ec["reps"]):
            for contender in (list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))):
                rounds[contender].append(run_once(model, episodes, ec, contender))
                print(f"[bench] evaluation {name}: round {r + 1} {contender} {rounds[contender][-1]['total']:.0f} s",
                      file=sys.stderr, flush=True)
        n = ec["episodes"] * len(episodes)  # episodes evaluated per measure: every shot count's
        phases = [p for p in PHASES if any(p in s for runs in rounds.values() for s in runs)]
        per_episode = {c: {p: statistics.median(s.get(p, 0.0) for s in runs) / n for p in [*phases, "total"]}
                       for c, runs in rounds.items()}
        out["tasks"][name] = {
            "shapes": {k: {"demo_tokens": e.demo_ids.shape[1], "query_tokens": e.query_ids.shape[1]}
                       for k, e in episodes.items()},
            "per_episode_s": per_episode,
            "speedup": statistics.median(b["total"] / a["total"] for b, a in zip(rounds["before"], rounds["after"])),
            "rounds_s": rounds}
    return out


def evaluation_table(cfg: dict, r: dict) -> list[str]:
    ec, res = cfg["evaluation"], r
    phases = [p for p in PHASES if any(p in t["per_episode_s"]["before"] for t in res["tasks"].values())]
    model = "a tiny random softmax model (QUICK)" if ec["model"] == "quick" else ec["model"]
    approx = ", ".join(ec["approximate"]) or "none"
    lines = [f"**7. ICL-vs-finetuning evaluation cost** (`lit_icl.evaluation.measure`: {model}; shots "
             f"{', '.join(map(str, ec['shots']))}; {ec['episodes']} episodes per shot count, batch size "
             f"{ec['batch_size']}; finetuning {ec['finetune']['params']} at lr {ec['finetune']['lr']:g}; approximate "
             f"modes: {approx}; seconds per episode and shot count, median of {ec['reps']} alternating rounds. "
             "before: every group also runs the whole prompt in one pass, zero-shot per shot count; after: "
             "the one-pass check on the first group per shot count only, zero-shot once per query set)", "",
             "| task | | " + " | ".join(phases) + " | total | speedup |", "|---|---" + "|---" * (len(phases) + 2) + "|"]
    for name, t in res["tasks"].items():
        for c in CONTENDERS:
            v = t["per_episode_s"][c]
            speed = f"{t['speedup']:.2f}x" if c == "after" else ""
            lines.append(f"| {name} | {c} | " + " | ".join(fmt_s(v.get(p, 0.0)) for p in phases)
                         + f" | {fmt_s(v['total'])} | {speed} |")
    return lines
