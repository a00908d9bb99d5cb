"""Decoding with a carried state: greedy or sampled continuation of a prompt, optionally after
a converted context.

The state that conversion produces is also the decoding cache: for linear attention it is the
recurrent state (S, z), so each new token costs the same whatever the length so far; for
softmax attention it is the KV prefix, i.e. a KV cache. `ContextState.decoding()` lets a mode
treat the tokens after its context differently: after an approximate (ICLAA) context, they are
cached exactly next to the context's feature-map sums. Decoding
after `convert(model, demos)` therefore yields, greedily, exactly the tokens that prompting
with demos + prompt yields.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_icl.context import ContextState
from lit_icl.model import TransformerLM, evaluating


def pick(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """The next token [B] from last-position logits [B, V]: argmax at temperature 0, otherwise
    a draw from softmax(logits / temperature) restricted to the top_k most likely tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.double(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt_ids: Tensor,
    max_new_tokens: int,
    state: ContextState | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """Continue prompt_ids [B, T] (T >= 1) by max_new_tokens tokens [B, N]. With `state`, the
    prompt continues the converted context. temperature 0 = greedy; seed fixes the sampling."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be [B, T] with T >= 1, got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(
            f"need max_new_tokens >= 1, temperature >= 0, top_k >= 1; got {max_new_tokens}, "
            f"{temperature}, {top_k}"
        )
    seen = 0 if state is None else int(state.offset.max())
    total = seen + prompt_ids.shape[1] + max_new_tokens - 1
    if total > model.config.block_size:
        raise ValueError(
            f"context ({seen}) + prompt ({prompt_ids.shape[1]}) + {max_new_tokens} new tokens needs "
            f"{total} positions, more than block_size={model.config.block_size}"
        )
    generator = None if seed is None else torch.Generator(prompt_ids.device).manual_seed(seed)
    tokens = []
    with evaluating(model):
        out = model.run(prompt_ids, state=None if state is None else state.decoding(), need_state=True)
        for i in range(max_new_tokens):
            tokens.append(pick(out.logits[:, -1], temperature, top_k, generator))
            if i + 1 < max_new_tokens:
                out = model.run(tokens[-1][:, None], state=out, need_state=True)
    return torch.stack(tokens, dim=1)
