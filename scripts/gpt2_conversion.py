#!/usr/bin/env python
"""The conversion paper's GPT-2 experiment (ICLAA; Chen et al. 2024, ICML, arXiv 2406.02847) on real weights you have locally.

For each (context, prompt) pair: the relative logit error ||l_p - l|| / ||l_p|| over the
prompt's positions between the prompted model (context + prompt) and the model that sees only
the prompt with: no context, approximate biases (positive random features, Taylor), and the
exact KV prefix; then the greedy continuations side by side. The paper reports 16.56% with no
context and 9.17% with the biases on GPT-2.

    python scripts/gpt2_conversion.py --model-dir /path/to/gpt2 [--pairs pairs.jsonl] [--json out.json]

The directory holds config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json
(or vocab.json + merges.txt). pairs.jsonl: one {"context": "...", "prompt": "..."} per line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lit_icl import TransformerLM, convert
from lit_icl.generate import generate

PAIRS = [
    {"context": "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
     "prompt": " The capital of Germany is"},
    {"context": "apple -> red. banana -> yellow. grass -> green. sky ->", "prompt": " blue. snow ->"},
    {"context": "Alice lives in Boston and works as a nurse. Bob lives in Denver and works as a chef.",
     "prompt": " Alice works as a"},
]
MODES = ("none", "prf", "taylor", "kv")


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    raise FileNotFoundError(f"{path} has no tokenizer.json (or vocab.json + merges.txt)")


@torch.no_grad()
def compare(model: TransformerLM, context: list[int], prompt: list[int], num_features: int, seed: int,
            max_new_tokens: int) -> dict:
    """Relative logit errors and greedy continuations of every mode for one pair."""
    c, p = torch.tensor([context]), torch.tensor([prompt])
    prompted = model(torch.cat([c, p], 1))[:, len(context):]
    row = {"rel_err": {}, "continuation": {"prompted": generate(model, torch.cat([c, p], 1), max_new_tokens)[0].tolist()}}
    for mode in MODES:
        state = None if mode == "none" else convert(model, c, mode=mode, num_features=num_features, seed=seed)
        logits = model(p, state=state)
        row["rel_err"][mode] = float((prompted - logits).norm() / prompted.norm())
        row["continuation"][mode] = generate(model, p, max_new_tokens, state=state)[0].tolist()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--pairs", type=Path, help="JSONL of {context, prompt}; default: built-in pairs")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--num-features", type=int, default=1024, help="random features of mode prf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        model = TransformerLM.from_hf_gpt2(args.model_dir)
        tok = load_tokenizer(args.model_dir)
        pairs = PAIRS if args.pairs is None else [json.loads(l) for l in args.pairs.read_text().splitlines() if l.strip()]
    except (OSError, ValueError, KeyError) as e:
        print(f"gpt2_conversion: error: {e}", file=sys.stderr)
        return 2
    report = {"model_dir": str(args.model_dir), "pairs": []}
    print(f"{'pair':>4}  " + "  ".join(f"{m:>10}" for m in MODES) + "   (relative logit error vs prompted)")
    for i, pair in enumerate(pairs):
        try:
            row = compare(model, tok.encode(pair["context"]).ids, tok.encode(pair["prompt"]).ids,
                          args.num_features, args.seed, args.max_new_tokens)
        except (ValueError, KeyError) as e:
            print(f"gpt2_conversion: error: pair {i}: {e}", file=sys.stderr)
            return 2
        report["pairs"].append({**pair, **row})
        print(f"{i:>4}  " + "  ".join(f"{100 * row['rel_err'][m]:>9.2f}%" for m in MODES))
    mean = {m: sum(r["rel_err"][m] for r in report["pairs"]) / len(report["pairs"]) for m in MODES}
    report["mean_rel_err"] = mean
    print(f"{'mean':>4}  " + "  ".join(f"{100 * mean[m]:>9.2f}%" for m in MODES))
    for i, row in enumerate(report["pairs"]):
        print(f"\npair {i}: context {row['context']!r} prompt {row['prompt']!r}")
        for name, ids in row["continuation"].items():
            label = "no context" if name == "none" else name
            print(f"  {label:>10}: {tok.decode(ids)!r}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
