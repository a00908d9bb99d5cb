"""A pretrained checkpoint through lit_icl next to transformers, on real text.

    python scripts/pretrained_check.py [--model smollm2-135m] [--corpus shakespeare] [--tokens 2048]
    python scripts/pretrained_check.py --model gemma3-270m --window 1024   # past its 512-token window
    python scripts/pretrained_check.py --model qwen2.5-0.5b

Loads the model twice, as `TransformerLM.from_hf` and as transformers' `AutoModelForCausalLM`,
and reports on the same tokens (the start of the corpus's first file, in windows of --window,
each after the tokenizer's BOS when it has one): the perplexity of each, the largest logit
difference, and greedy completions of a few prompts from both (token for token). Named sources
are fetched on first use (`lit-icl data list`). Prints; asserts nothing.
"""
from __future__ import annotations

import argparse
import glob
import math
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lit_icl import TransformerLM
from lit_icl.data.tokenizer import tokenizer_file
from lit_icl.generate import generate
from lit_icl.sources import model_directory, resolve

PROMPTS = ["The capital of France is", "To be, or not to be,", "Once upon a time, there was a",
           "France -> Paris\nGermany -> Berlin\nItaly ->", "The capital of France is the city of"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a named model or a local HF directory")
    parser.add_argument("--corpus", default="shakespeare", help="a named corpus or a glob of text files")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of text to score")
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--new_tokens", type=int, default=16, help="greedy tokens per prompt")
    args = parser.parse_args()
    import transformers

    directory = model_directory(args.model)
    tokenizer = Tokenizer.from_file(tokenizer_file(directory))
    start = time.perf_counter()
    ours = TransformerLM.from_hf(directory)
    loaded = time.perf_counter() - start
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    files = sorted(glob.glob(resolve(args.corpus))) if not glob.has_magic(args.corpus) else sorted(glob.glob(args.corpus))
    text = open(files[0], encoding="utf-8").read()
    ids = torch.tensor(tokenizer.encode(text[: 20 * args.tokens], add_special_tokens=False).ids[: args.tokens])
    windows = ids[: len(ids) // args.window * args.window].view(-1, args.window)
    bos = torch.tensor(tokenizer.encode("").ids, dtype=torch.long)  # what the tokenizer puts first (Gemma: <bos>)
    windows = torch.cat([bos.expand(len(windows), -1), windows], dim=1)
    nll = {"lit_icl": 0.0, "transformers": 0.0}
    max_diff = 0.0
    with torch.no_grad():
        for w in windows:
            a, b = ours(w[None]), theirs(w[None]).logits
            max_diff = max(max_diff, float((a - b).abs().max()))
            for name, logits in (("lit_icl", a), ("transformers", b)):
                nll[name] += float(F.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
    count = windows.numel() - len(windows)  # every token but each window's first is predicted
    print(f"model {args.model} ({directory}): from_hf in {loaded:.1f} s, {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters")
    print(f"text: {files[0]}, {count} scored tokens in windows of {args.window}"
          f"{f' after {bos.tolist()} (BOS)' if len(bos) else ''}")
    for name, v in nll.items():
        print(f"  perplexity {name:>12}: {math.exp(v / count):.3f}")
    print(f"  max |logit difference|: {max_diff:.2e}")
    for prompt in PROMPTS:
        p = torch.tensor([tokenizer.encode(prompt).ids])
        a = generate(ours, p, args.new_tokens)[0].tolist()
        b = theirs.generate(p, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, p.shape[1]:].tolist()
        print(f"\n{prompt!r}\n  lit_icl:      {tokenizer.decode(a)!r}\n  transformers: {tokenizer.decode(b)!r}"
              f"\n  identical tokens: {a == b}")


if __name__ == "__main__":
    main()
