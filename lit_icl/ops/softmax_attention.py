"""Causal softmax attention through scaled_dot_product_attention, with an optional key/value
prefix: the exact KV-prefix form of a softmax model's context (the upper bound for approximate
conversion; Chen et al. 2024, ICML, arXiv 2406.02847).

Shapes: q [B, H, T, D]; k, v [B, H_kv, T, D]; prefix_k, prefix_v [B, H_kv, P, D]; prefix_mask
[B, P] and mask [B, T] with 1 = token. H_kv divides H: with H_kv < H (grouped-query attention,
Ainslie et al. 2023) query head h reads key/value head h // (H / H_kv). A query attends to every real prefix key and to the real keys at or
before it; it always sees itself, so a padding query never has an empty row (its output is
ignored by the caller).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def repeat_kv(x: Tensor, n_head: int) -> Tensor:
    """Key/value heads [B, H_kv, ...] repeated for n_head query heads [B, n_head, ...]:
    each of the H_kv heads serves n_head / H_kv consecutive query heads (grouped-query attention)."""
    groups = n_head // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    prefix_mask: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """softmax(q [prefix_k | k]^T / sqrt(d) + causal/padding mask) [prefix_v | v]."""
    B, H, T, _ = q.shape
    if prefix_k is None and mask is None:
        return F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), is_causal=True)
    if prefix_k is not None and prefix_mask is None:
        prefix_mask = torch.ones(B, prefix_k.shape[2], dtype=torch.bool, device=q.device)
    allowed = attention_mask(B, T, q.device, prefix_mask, mask)
    if prefix_k is not None:
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    return F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), attn_mask=allowed[:, None])


def attention_mask(
    B: int, T: int, device, prefix_mask: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """Boolean [B, T, P + T]: which keys each query may attend to."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = causal.expand(B, T, T)
    if mask is not None:
        eye = torch.eye(T, dtype=torch.bool, device=device)
        allowed = (allowed & mask.bool()[:, None, :]) | eye
    if prefix_mask is not None:
        allowed = torch.cat([prefix_mask.bool()[:, None, :].expand(B, T, -1), allowed], dim=-1)
    return allowed

