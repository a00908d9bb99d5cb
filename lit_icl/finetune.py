"""The explicit-finetuning baseline of the ICL-vs-FT comparison (Dai, Sun, Dong, Hao, Ma, Sui, Wei
2023, "Why Can GPT Learn In-Context?", ACL Findings, arXiv 2212.10559).

Their baseline: a copy of the model, SGD, one epoch, batch size 1 (one demonstration per
step, in order), language-modelling loss on every token of each demonstration, only the
attention key and value projections trainable.

- `finetune`: that recipe, one episode, a deep copy trained with torch.optim.SGD; the slow,
  obviously correct reference.
- `finetune_batched`: the same SGD for N episodes at once, each with its own copy of the
  trainable parameters, through torch.func (vmap over functional_call + grad). It returns
  the per-episode parameters; `finetuned_logits` runs the queries with them.

Both work inside a Lightning validation hook: they turn gradients back on themselves.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad, vmap

from lit_icl.model import TransformerLM, evaluating

PARAMETER_SETS = {
    "kv": ("attn.k_proj.", "attn.v_proj."),
    "attention": ("attn.q_proj.", "attn.k_proj.", "attn.v_proj.", "attn.o_proj."),
    "all": ("",),
}


def trainable_names(model: TransformerLM, params: str = "kv") -> list[str]:
    """Names of the parameters that `params` ("kv" | "attention" | "all") trains."""
    if params not in PARAMETER_SETS:
        raise ValueError(f"params={params!r}; allowed: {list(PARAMETER_SETS)}")
    prefixes = PARAMETER_SETS[params]
    return [n for n, _ in model.named_parameters() if any(p in n for p in prefixes)]


def lm_loss(logits: Tensor, ids: Tensor, mask: Tensor | None) -> Tensor:
    """Mean next-token cross-entropy over every token of the demonstration that has a real
    token before it (logits [B, L, V], ids [B, L], mask [B, L] or None)."""
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return losses.mean()
    valid = (mask[:, 1:].bool() & mask[:, :-1].bool()).flatten().to(losses.dtype)
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def _check(demos: Tensor, mask: Tensor | None, dims: int, lr: float, epochs: int) -> None:
    if demos.dim() != dims or demos.dtype != torch.long:
        raise ValueError(f"demonstrations must be a {dims}-D long tensor, got {tuple(demos.shape)} {demos.dtype}")
    if mask is not None and mask.shape != demos.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != demonstrations {tuple(demos.shape)}")
    if lr <= 0 or epochs < 1:
        raise ValueError(f"need lr > 0 and epochs >= 1, got lr={lr}, epochs={epochs}")


def finetune(
    model: TransformerLM,
    demos: Tensor,
    attention_mask: Tensor | None = None,
    params: str = "kv",
    lr: float = 0.1,
    epochs: int = 1,
) -> TransformerLM:
    """A deep copy of `model` finetuned on one episode's demonstrations [D, L] (one per row,
    padded with attention_mask [D, L] where lengths differ): SGD, batch size 1, rows in order,
    `epochs` passes. The source model is untouched; the copy is returned in eval mode."""
    _check(demos, attention_mask, 2, lr, epochs)
    names = set(trainable_names(model, params))
    with torch.inference_mode(False), torch.enable_grad():
        tuned = copy.deepcopy(model).eval()  # made here, its tensors are not inference tensors
        trainable = [p for n, p in tuned.named_parameters() if n in names]
        for p in tuned.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(trainable, lr=lr)
        demos = demos.clone()
        mask = None if attention_mask is None else attention_mask.clone()
        for _ in range(epochs):
            for j in range(demos.shape[0]):
                row_mask = None if mask is None else mask[j : j + 1]
                loss = lm_loss(tuned(demos[j : j + 1], attention_mask=row_mask), demos[j : j + 1], row_mask)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        for p in tuned.parameters():
            p.requires_grad_(True)
    return tuned


def finetune_batched(
    model: TransformerLM,
    demos: Tensor,
    attention_mask: Tensor | None = None,
    params: str = "kv",
    lr: float = 0.1,
    epochs: int = 1,
) -> dict[str, Tensor]:
    """`finetune` for N episodes at once: demos [N, D, L] (+ mask). Returns, per trainable
    parameter name, the N finetuned copies stacked [N, *shape]. Each SGD step updates every
    episode's own copy with the gradient of its own demonstration j (torch.func.vmap)."""
    _check(demos, attention_mask, 3, lr, epochs)
    N = demos.shape[0]

    def loss_fn(p: dict[str, Tensor], ids: Tensor, mask: Tensor | None) -> Tensor:
        m = None if mask is None else mask[None]
        logits = functional_call(model, p, (ids[None],), {"attention_mask": m, "check": False}, strict=False)
        return lm_loss(logits, ids[None], m)

    step = vmap(grad(loss_fn), in_dims=(0, 0, None if attention_mask is None else 0))
    with torch.inference_mode(False), torch.enable_grad(), evaluating(model):
        state = dict(model.named_parameters())
        weights = {n: state[n].detach().clone().expand(N, *state[n].shape).clone() for n in trainable_names(model, params)}
        demos = demos.clone()
        mask = None if attention_mask is None else attention_mask.clone()
        for _ in range(epochs):
            for j in range(demos.shape[1]):
                grads = step(weights, demos[:, j], None if mask is None else mask[:, j])
                weights = {n: w - lr * grads[n] for n, w in weights.items()}
    return weights


class _Run(torch.nn.Module):
    """model.run as a module's forward, so torch.func.functional_call can swap parameters."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, mask: Tensor | None, need_attn: bool, logits_at: str | int, attn_at: int | None):
        out = self.model.run(ids, attention_mask=mask, need_attn=need_attn, check=False, logits_at=logits_at,
                             attn_at=attn_at)
        return out.logits, out.attn_outputs, out.attn_scores


@torch.no_grad()
def finetuned_logits(
    model: TransformerLM,
    weights: dict[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    need_attn: bool = False,
    logits_at: str | int = "all",
    attn_at: int | None = None,
):
    """Episode i's finetuned copy (weights[name][i]) run on input_ids[i] [N, T] (with its
    attention_mask row): logits [N, T, V] ([N, 1, V] with logits_at="last", [N, n, V] with an int
    n), and with need_attn also the per-layer attention outputs [N, T, C] and the scores of
    position attn_at (None: the last) [N, H, attn_at + 1] (lists over layers, empty otherwise)."""
    runner = _Run(model)

    def one(p: dict[str, Tensor], ids: Tensor, mask: Tensor | None):
        logits, outputs, scores = functional_call(
            runner, {f"model.{n}": w for n, w in p.items()},
            (ids[None], None if mask is None else mask[None], need_attn, logits_at, attn_at), strict=False,
        )
        return logits[0], [a[0] for a in outputs], [s[0] for s in scores]

    with evaluating(model):
        return vmap(one, in_dims=(0, 0, None if attention_mask is None else 0))(weights, input_ids, attention_mask)
