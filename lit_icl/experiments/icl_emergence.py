"""`scripts/reproduce.py icl-emergence`: in-context learning while pretraining on real text, per
attention kind (Olsson et al. 2022, "In-context Learning and Induction Heads", Transformer
Circuits: the ICL score and the per-position loss; their "phase change").

Every attention kind of the registry (linear, momentum, softmax, retention, simple GLA, GLA,
DeltaNet, and a GLA + softmax hybrid) trains from scratch on `shakespeare` through `lit-icl fit`
(configs/text_momentum.yaml, resized, with the kind's overlay), at the same budget and on the
same data order (the run seed changes the initial weights), several seeds each. Two whole works
are held out (val_by: file); at every validation `lit_icl.text_icl.TextICLCallback` measures on
their blocks the loss per position, the ICL score loss(late) - loss(early) and the converted
prefix's loss. From each run: the ICL score against training tokens (read back from TensorBoard),
the per-position loss at the end (the callback's last curve) and the conversion's loss gap.

The score at single positions (Olsson et al.'s definition) holds the same few tokens of the same
documents at every measurement, so the report also gives a binned score: the mean loss over the
last whole log bin of positions minus that over the bin of the early position (128..255 minus
16..31 for 256-token blocks). A phase change is called where one interval between validations
holds at least half of the binned score's total decrease (its peak before the minimum to the minimum) and
that decrease is at least 0.05 nats, in every seed, at the same interval; otherwise none is.
"""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from lit_icl.experiments.momentum import write_corpus
from lit_icl.experiments.runs import CONFIGS, curves, save_figure

# kind -> (overlay under configs/, momentum eta)
KINDS = {"linear": (None, 0.0), "momentum": (None, 0.5), "softmax": ("softmax.yaml", 0.0),
         "retention": ("retention.yaml", 0.0), "simple_gla": ("simple_gla.yaml", 0.0), "gla": ("gla.yaml", 0.0),
         "deltanet": ("deltanet.yaml", 0.0), "gla+softmax": ("hybrid.yaml", 0.0)}
FULL = dict(corpus="shakespeare", vocab_size=2048, block_size=256, batch_size=8, n_layer=2, n_head=4, n_embd=96,
            steps=600, val_every=30, val_batches=4, documents=128, warmup=60, lr=2e-3, seeds=[1, 2])
QUICK = dict(corpus="quick_corpus", vocab_size=300, block_size=32, batch_size=4, n_layer=2, n_head=2, n_embd=16,
             steps=4, val_every=2, val_batches=2, documents=8, warmup=2, lr=3e-3, seeds=[1, 2])
MEASUREMENTS = 20  # validations per run: val_every is steps // 20 (at least 1)
FREE = ("seeds",)  # fields that change which runs there are, not a run's result (see runs.Store)
DROP_MIN = 0.05  # a phase change: a lasting drop of the binned score of >= 0.05 nats between two validations


def config(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    for field, option in (("seeds", "seeds"), ("steps", "steps"), ("documents", "episodes")):
        if getattr(args, option, None) is not None:
            cfg[field] = getattr(args, option)
    if not cfg["quick"]:
        cfg["val_every"] = max(1, cfg["steps"] // MEASUREMENTS)
        cfg["warmup"] = max(1, cfg["steps"] // 10)
    cfg["val_every"] = min(cfg["val_every"], cfg["steps"])
    return cfg


def run_key(kind: str, seed: int) -> str:
    return f"{kind}-seed{seed}"


def fit_args(cfg: dict, out: Path, kind: str, seed: int) -> list[str]:
    """`lit-icl fit` arguments of one run: configs/text_momentum.yaml resized, the kind's overlay,
    its own folders."""
    key, runs = run_key(kind, seed), out / "icl-emergence_runs"
    overlay, eta = KINDS[kind]
    corpus = str(out / cfg["corpus"]) if cfg["quick"] else cfg["corpus"]
    sizes = {"data.init_args.corpus": corpus, "data.init_args.vocab_size": cfg["vocab_size"],
             "data.init_args.block_size": cfg["block_size"], "data.init_args.batch_size": cfg["batch_size"],
             "data.init_args.val_by": "file", "model.config.n_layer": cfg["n_layer"],
             "model.config.n_head": cfg["n_head"], "model.config.n_embd": cfg["n_embd"],
             "model.config.block_size": cfg["block_size"], "model.config.momentum": eta, "model.lr": cfg["lr"],
             "model.warmup_steps": cfg["warmup"], "seed_everything": seed, "trainer.max_steps": cfg["steps"],
             "trainer.val_check_interval": cfg["val_every"], "trainer.limit_val_batches": cfg["val_batches"],
             "trainer.log_every_n_steps": cfg["val_every"], "trainer.max_time": None,
             "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
             "trainer.num_sanity_val_steps": 0, "trainer.callbacks.init_args.num_documents": cfg["documents"],
             "trainer.callbacks.init_args.approximate_modes": "[]",  # the exact conversion only: half the cost
             "trainer.callbacks.init_args.window": 0.0,  # Olsson et al.'s single positions; the report adds bins
             "trainer.logger.init_args.save_dir": str(runs), "run_name": key,
             "checkpoint.dirpath": str(runs / key / "checkpoints")}
    if cfg["quick"]:  # float64: the --quick runs are tests, which decide nothing by float32 rounding
        sizes.update({"data.init_args.cache_dir": str(out / "cache"), "trainer.precision": "64-true"})
    args = ["fit", "--config", str(CONFIGS / "text_momentum.yaml")]
    args += ["--config", str(CONFIGS / overlay)] if overlay else []
    for k, v in sizes.items():
        args += [f"--{k}", "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)]
    last = runs / key / "checkpoints" / "last.ckpt"
    if last.exists():  # an interrupted run resumes exactly
        args += ["--ckpt_path", str(last)]
    elif (runs / key).exists():
        shutil.rmtree(runs / key)  # a run killed before its first checkpoint starts again
    return args


def train(cfg: dict, out: Path, kind: str, seed: int) -> dict:
    from lit_icl.cli import build_cli
    from lit_icl.text_icl import TextICLCallback

    cli = build_cli(fit_args(cfg, out, kind, seed))
    key = run_key(kind, seed)
    scalars = curves(out / "icl-emergence_runs" / key)
    if "icl/text/score" not in scalars:
        raise ValueError(f"run {key} logged no icl/text/score (TensorBoard tags: {sorted(scalars)})")
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TextICLCallback)]
    keep = ("icl/text/score", "icl/text/loss", "icl/text/converted_loss_diff", "icl/text/converted_max_abs_diff",
            "icl/text/seconds", "val/loss", "train/loss")
    return {"params": sum(p.numel() for p in cli.model.parameters()), "positions": [callback.early, callback.late],
            "held_out": cli.datamodule.val_held, "loss_at_end": callback.history[-1][1],
            "curves": {t: scalars[t] for t in scalars if t in keep or t.startswith("icl/text/loss_at/")},
            "final": {t.removeprefix("icl/text/"): scalars[t][-1][1] for t in scalars if t.startswith("icl/text/")}}


def run(store, out: Path) -> None:
    cfg = store.data["config"]
    if not store.reused and (out / "icl-emergence_runs").exists():
        shutil.rmtree(out / "icl-emergence_runs")  # another config's run folders: never resume them
    if cfg["quick"] and not (out / cfg["corpus"]).exists():
        (out / cfg["corpus"]).mkdir(parents=True)
        for i in range(2):  # two files: one is held out whole
            write_corpus(out / cfg["corpus"] / f"part{i}.txt", paragraphs=100, seed=i)
    for kind in KINDS:
        for seed in cfg["seeds"]:
            store.run(run_key(kind, seed), lambda: train(cfg, out, kind, seed), kind=kind, seed=seed)


def tokens_per_step(cfg: dict) -> int:
    return cfg["batch_size"] * cfg["block_size"]


def score_bins(result: dict, cfg: dict) -> tuple[int, int]:
    """The first positions of the two log bins of the binned score: the bin holding the score's
    early position, and the last whole bin (p..2p-1 within the block)."""
    early = result["positions"][0]
    late = 2 ** ((cfg["block_size"] + 1).bit_length() - 2)  # largest p with 2p - 1 <= block_size
    return 2 ** (early.bit_length() - 1), late


def binned_score(result: dict, cfg: dict) -> list[list[float]]:
    """[[step, loss over the late bin - loss over the early bin], ...]: the score from the logged
    bins, each a mean over many positions (a single position of a few documents is noisy)."""
    lo, hi = score_bins(result, cfg)
    early, late = result["curves"][f"icl/text/loss_at/{lo}"], result["curves"][f"icl/text/loss_at/{hi}"]
    return [[s, b - a] for (s, a), (_, b) in zip(early, late)]


def moves(score: list[list[float]]) -> dict:
    """One run's score curve [[step, value], ...] read for a phase change: the largest drop and the
    largest rise between consecutive validations, each as [first step, last step, nats] (steps count
    updates: a value logged at step s follows s + 1 of them), and whether the drop lasts (the score
    never returns to its level before the drop: a dip that recovers is noise or the data order, not
    a change of what the model does)."""
    steps, values = [s + 1 for s, _ in score], [v for _, v in score]
    if len(values) < 2:
        return dict(drop=None, rise=None, lasting=False, net=0.0)
    diffs = [b - a for a, b in zip(values, values[1:])]
    i, j = min(range(len(diffs)), key=diffs.__getitem__), max(range(len(diffs)), key=diffs.__getitem__)
    return dict(drop=[steps[i], steps[i + 1], -diffs[i]], rise=[steps[j], steps[j + 1], diffs[j]],
                lasting=max(values[i + 1:]) < values[i], net=values[-1] - values[0])


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(data: dict) -> dict:
    """Per kind: the final ICL score (Olsson's single positions) and binned score, mean and std
    over seeds; the held-out loss; the conversion's largest per-token loss difference; and the
    phase change of the binned score (the steps between which it happened) or None."""
    cfg, rows = data["config"], {}
    for kind in KINDS:
        results = [data["runs"][run_key(kind, s)]["result"] for s in cfg["seeds"]]
        binned = [binned_score(r, cfg) for r in results]
        found = [moves(b) for b in binned]
        called = all(f["lasting"] and f["drop"][2] >= DROP_MIN for f in found) and \
            len({tuple(f["drop"][:2]) for f in found}) == 1
        score, score_std = mean_std([r["final"]["score"] for r in results])
        bscore, bscore_std = mean_std([b[-1][1] for b in binned])
        rows[kind] = dict(
            score=score, score_std=score_std, binned=bscore, binned_std=bscore_std,
            loss=statistics.fmean(r["final"]["loss"] for r in results),
            max_abs_diff=max(r["final"]["converted_max_abs_diff"] for r in results),
            drop=[f["drop"] for f in found], lasting=[f["lasting"] for f in found], rise=[f["rise"] for f in found],
            net=[f["net"] for f in found], phase_change=found[0]["drop"][:2] if called else None,
            seconds=statistics.fmean(r["final"]["seconds"] for r in results))
    return rows


def figures(data: dict, out: Path) -> list[str]:
    """icl-emergence.png: the ICL score (left: Olsson's single positions; right: binned) against
    training tokens per kind, mean over seeds with their range shaded; icl-emergence-position.png:
    the loss against position at the end, per kind."""
    from lit_icl.plots import plt

    cfg = data["config"]
    first = next(iter(data["runs"].values()))["result"]
    (early, late), (lo, hi) = first["positions"], score_bins(first, cfg)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    panels = ((f"loss({late}) - loss({early})", lambda r: r["curves"]["icl/text/score"]),
              (f"loss({hi}..{2 * hi - 1}) - loss({lo}..{2 * lo - 1})", lambda r: binned_score(r, cfg)))
    for ax, (label, curve) in zip(axes, panels):
        for kind in KINDS:
            runs = [curve(data["runs"][run_key(kind, s)]["result"]) for s in cfg["seeds"]]
            tokens = [(s + 1) * tokens_per_step(cfg) / 1e6 for s, _ in runs[0]]  # logged at step s: s + 1 updates
            values = [[v for _, v in r] for r in runs]
            ax.plot(tokens, [statistics.fmean(c) for c in zip(*values)], marker="o", ms=3, label=kind)
            ax.fill_between(tokens, [min(c) for c in zip(*values)], [max(c) for c in zip(*values)], alpha=0.15)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel(f"ICL score: {label} (nats)")
        ax.axhline(0, color="gray", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].set_title("single positions (Olsson et al.)", fontsize=9)
    axes[1].set_title("log bins (many positions each)", fontsize=9)
    axes[1].legend(fontsize=8, ncol=2)
    names = save_figure(fig, out, "icl-emergence")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for kind in KINDS:
        curves_ = [data["runs"][run_key(kind, s)]["result"]["loss_at_end"] for s in cfg["seeds"]]
        mean = [statistics.fmean(c) for c in zip(*curves_)]
        ax.plot(range(1, len(mean) + 1), smooth(mean), label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("token position (tokens of context)")
    ax.set_ylabel("held-out loss at the end (nats, moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return names + save_figure(fig, out, "icl-emergence-position")


def smooth(values: list[float]) -> list[float]:
    """A centred moving average over +-10% of the position (per-position means of few documents are noisy)."""
    out = []
    for t in range(len(values)):
        w = t // 10
        window = values[max(0, t - w) : t + w + 1]
        out.append(sum(window) / len(window))
    return out


def scale(data: dict) -> str:
    cfg = data["config"]
    params = data["runs"][run_key("linear", cfg["seeds"][0])]["result"]["params"]
    tokens = cfg["steps"] * tokens_per_step(cfg)
    return (f"{cfg['n_layer']} layers, width {cfg['n_embd']}, {cfg['n_head']} heads ({params / 1e6:.2f}M parameters "
            f"for linear attention, vocabulary {cfg['vocab_size']}), {cfg['steps']} steps of {cfg['batch_size']} x "
            f"{cfg['block_size']} tokens = {tokens / 1e6:.2f}M training tokens, learning rate {cfg['lr']:g} (AdamW, "
            f"warmup {cfg['warmup']}, cosine), token shift on, seeds {cfg['seeds']}")


def table(data: dict) -> list[str]:
    s, cfg = data["summary"], data["config"]
    first = next(iter(data["runs"].values()))["result"]
    (early, late), (lo, hi) = first["positions"], score_bins(first, cfg)
    lines = [f"| kind | ICL score at the end: loss({late}) - loss({early}) | binned: loss({hi}..{2 * hi - 1}) - "
             f"loss({lo}..{2 * lo - 1}) | held-out loss | phase change | largest drop of the binned score between "
             "two validations, per seed (steps: nats) | largest rise, per seed | converted - prompted, max per token |",
             "|---|---|---|---|---|---|---|---|"]

    def move(m: list, lasting: bool | None = None) -> str:
        return "—" if m is None else f"{m[0]}-{m[1]}: {m[2]:.3f}" + ("" if lasting in (None, True) else " (recovers)")

    for kind, r in s.items():
        pc = f"steps {r['phase_change'][0]}-{r['phase_change'][1]}" if r["phase_change"] else "none"
        drops = "; ".join(move(m, keep) for m, keep in zip(r["drop"], r["lasting"]))
        lines.append(f"| {kind} | {r['score']:+.3f} ± {r['score_std']:.3f} | {r['binned']:+.3f} ± {r['binned_std']:.3f} | "
                     f"{r['loss']:.3f} | {pc} | {drops} | {'; '.join(move(m) for m in r['rise'])} | "
                     f"{r['max_abs_diff']:.1e} |")
    return lines


def position_bins(curve: list[float]) -> list[tuple[int, int, float]]:
    """[(first position, last position, mean loss), ...] over the log bins 1, 2..3, 4..7, ... of a
    per-position loss curve (position t: the t-th predicted token, t tokens of context)."""
    out, p = [], 1
    while p <= len(curve):
        q = min(2 * p - 1, len(curve))
        out.append((p, q, statistics.fmean(curve[p - 1 : q])))
        p *= 2
    return out


def findings(data: dict) -> str:
    s, cfg = data["summary"], data["config"]
    first = next(iter(data["runs"].values()))["result"]
    (early, late), (lo, hi) = first["positions"], score_bins(first, cfg)
    runs = [(k, i) for k in s for i in range(len(cfg["seeds"]))]
    common_rise = statistics.mode(tuple(s[k]["rise"][i][:2]) for k, i in runs)
    n_rise = sum(tuple(s[k]["rise"][i][:2]) == common_rise for k, i in runs)
    common_drop = statistics.mode(tuple(s[k]["drop"][i][:2]) for k, i in runs)
    at_drop = [(k, i) for k, i in runs if tuple(s[k]["drop"][i][:2]) == common_drop]
    recovered = sum(not s[k]["lasting"][i] for k, i in at_drop)
    sizes = [s[k]["drop"][i][2] for k, i in at_drop]
    up = sum(s[k]["net"][i] > 0 for k, i in runs)
    called = {k: r["phase_change"] for k, r in s.items() if r["phase_change"]}
    rule = (f"a drop of the binned score of at least {DROP_MIN} nats between two validations that lasts (the score "
            "never climbs back to its level before the drop), at the same steps in every seed")
    if called:
        verdict = (f"By this report's rule ({rule}) a phase change is called for " +
                   "; ".join(f"{k} between steps {v[0]} and {v[1]}" for k, v in called.items()) + ".")
    else:
        verdict = f"No kind shows a phase change by this report's rule ({rule})."
    ends = {k: [statistics.fmean(c) for c in zip(*(data["runs"][run_key(k, sd)]["result"]["loss_at_end"]
                                                  for sd in cfg["seeds"]))] for k in s}
    bins = {k: position_bins(c) for k, c in ends.items()}
    best = statistics.mode(min(b[1:], key=lambda x: x[2])[:2] for b in bins.values())  # position 1 has no context
    climb = sorted((next(x[2] for x in b if x[0] == hi) - min(x[2] for x in b[1:]), k) for k, b in bins.items())
    scores = sorted(r["score"] for r in s.values())
    binned = sorted((r["binned"], k) for k, r in s.items())
    start = statistics.fmean(binned_score(r["result"], cfg)[0][1] for r in data["runs"].values())
    tokens = cfg["steps"] * tokens_per_step(cfg)
    return (
        f"The score at single positions, loss({late}) - loss({early}), ends between {scores[0]:+.2f} and "
        f"{scores[-1]:+.2f} nats for every kind alike: it measures the same {cfg['documents']} documents at every "
        f"validation, so it mostly says how hard the few tokens at positions {early} and {late} of those documents "
        f"are, not how much the context helps. The binned score averages {hi} and {lo} positions per document: it "
        f"goes from {start:+.3f} nats at the first validation (mean over runs) to between {binned[0][0]:+.3f} "
        f"({binned[0][1]}) and {binned[-1][0]:+.3f} ({binned[-1][1]}) at the end, and ends above where it started "
        f"in {up} of {len(runs)} runs: it rises, the opposite of the drop Olsson et al. report. Its largest rise "
        f"between two validations lies between steps {common_rise[0]} and {common_rise[1]} in {n_rise} of "
        f"{len(runs)} runs (the learning-rate warmup ends at step {cfg['warmup']}). Its largest drop lies between "
        f"steps {common_drop[0]} and {common_drop[1]} in {len(at_drop)} of {len(runs)} runs ({min(sizes):.3f} to "
        f"{max(sizes):.3f} nats), and in {recovered} of those the score climbs back to its level before the drop: "
        "every run sees the same batches in the same order, so a dip shared by the kinds at the same steps more "
        f"likely comes from the data of those steps than from a change inside the models. {verdict} The loss "
        f"against position at the end says why the score is positive: it is lowest at positions {best[0]}..{best[1]} "
        f"for most kinds and climbs from there to positions {hi}..{2 * hi - 1} by {climb[0][0]:.3f} nats "
        f"({climb[0][1]}) to {climb[-1][0]:.3f} ({climb[-1][1]}), so these models use the last few tokens and are "
        "hurt by more context. A likely reason: a shakespeare document is a paragraph (one speech), a few dozen "
        "tokens, and the held-out blocks run across many of them separated by <|endoftext|>, so most of a late "
        "position's context is unrelated text that the model has to learn to ignore. How well a kind can forget "
        f"orders the climb only loosely: linear attention, which sums all of it with no decay, climbs "
        f"{dict((k, v) for v, k in climb)['linear']:.3f}; {climb[0][1]} climbs least. Whether any drop is induction heads "
        "forming cannot be told from the score alone (Olsson et al. also look for the bump in the training loss "
        "and for the heads themselves), and it is unlikely at this scale: they saw the phase change after some 2.5 "
        f"to 5 billion tokens in small attention-only models, these runs see {tokens / 1e6:.2f}M tokens and end at "
        f"a held-out loss near {statistics.fmean(r['loss'] for r in s.values()):.1f} nats, still learning which "
        "tokens are frequent and which follow which. The models also have token shift (configs/text_momentum.yaml): "
        "every layer gets the previous token's embedding for free, the previous-token head that an induction head "
        "otherwise builds in an earlier layer, so what context use there is can grow gradually. The last column is "
        "the loss of each block's second half on the state of its converted first half against its loss in the "
        f"whole block ({'float64' if cfg['quick'] else 'float32'}): rounding or nothing, for every kind.")


def report(data: dict) -> str:
    cfg = data["config"]
    held = next(iter(data["runs"].values()))["result"]["held_out"]
    early, late = next(iter(data["runs"].values()))["result"]["positions"]
    lines = ["# In-context learning while pretraining on real text, per attention kind (Olsson et al., 2022)", "",
             f"Command: `{data['command']}` — {len(data['runs'])} runs, {data['wall_seconds'] / 60:.1f} min of training.",
             "", "## Setup", "",
             f"- Data: {'a self-written toy corpus of two files (--quick)' if cfg['quick'] else 'the shakespeare corpus (42 Project Gutenberg works)'}; "
             f"held out for validation: {held}; a byte-level BPE of {cfg['vocab_size']} tokens trained on the rest; "
             "the same data order in every run.",
             f"- Models (configs/text_momentum.yaml resized, each kind's overlay, trained with `lit-icl fit`): {scale(data)}.",
             f"- Measured at every validation ({cfg['val_every']} steps) by `lit_icl.text_icl.TextICLCallback` on "
             f"{cfg['documents']} held-out blocks of {cfg['block_size'] + 1} tokens: the loss per position, the ICL "
             f"score loss({late}) - loss({early}) (Olsson et al.'s 500 - 50 does not fit {cfg['block_size']}-token "
             "blocks; the same tenfold ratio), and the loss of each block's second half on its converted first half.",
             "", "## Result", "", *table(data), "",
             "![ICL score against training tokens](icl-emergence.png)", "",
             "![loss against position at the end](icl-emergence-position.png)", "",
             "## Reading", "", findings(data), "",
             "Every number, with the config and seed of each run: `icl-emergence.json`."]
    return "\n".join(lines)


def readme_section(data: dict, rel: str) -> str:
    return "\n".join([
        "### In-context learning during pretraining, per attention kind (Olsson et al., 2022)", "",
        f"`{data['command']}` ({len(data['runs'])} runs, {data['wall_seconds'] / 60:.0f} min on this machine's CPU). "
        f"Scale: {scale(data)}.", "", *table(data), "",
        f"![ICL score against training tokens]({rel}/icl-emergence.png)", "",
        f"![loss against position at the end]({rel}/icl-emergence-position.png)", "", findings(data)])
