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
    scale: float | None = None,
) -> Tensor:
    """softmax(q [prefix_k | k]^T * scale + causal/padding mask) [prefix_v | v]; scale defaults
    to 1 / sqrt(d)."""
    if prefix_k is None and mask is None:
        H = q.shape[1]
        return F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), is_causal=True, scale=scale)
    return _masked(q, k, v, prefix_k, prefix_v, prefix_mask, mask, scale)


def _masked(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None,
            prefix_mask: Tensor | None, mask: Tensor | None, scale: float | None,
            limit: Tensor | None = None) -> Tensor:
    """Attention under `attention_mask`, further restricted to `limit` [B, T, P + T] when given."""
    B, H, T, _ = q.shape
    if prefix_k is not None and prefix_mask is None:
        prefix_mask = torch.ones(B, prefix_k.shape[2], dtype=torch.bool, device=q.device)
    allowed = attention_mask(B, T, q.device, prefix_mask, mask)
    if limit is not None:
        allowed = allowed & limit
    if prefix_k is not None:
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    return F.scaled_dot_product_attention(q, repeat_kv(k, H), repeat_kv(v, H), attn_mask=allowed[:, None], scale=scale)


def sliding_window_attention(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, window: int,
    prefix_k: Tensor | None = None, prefix_v: Tensor | None = None, prefix_mask: Tensor | None = None,
    prefix_positions: Tensor | None = None, mask: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """`softmax_attention` in which a query at position p sees only the keys at positions
    p - window < j <= p (Beltagy et al. 2020, Longformer; Gemma 3's local layers). positions
    [B, T] are the input's, prefix_positions [B, P] the prefix keys' (long)."""
    keys = positions if prefix_k is None else torch.cat([prefix_positions, positions], dim=1)
    inside = keys[:, None, :] > positions[:, :, None] - window  # [B, T, P + T]
    return _masked(q, k, v, prefix_k, prefix_v, prefix_mask, mask, scale, limit=inside)


def sliding_window_reference(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, window: int,
    prefix_k: Tensor | None = None, prefix_v: Tensor | None = None, prefix_mask: Tensor | None = None,
    prefix_positions: Tensor | None = None, mask: Tensor | None = None, scale: float | None = None,
) -> Tensor:
    """The obviously correct `sliding_window_attention`: for every row, head and query, the keys
    it may see listed one by one (real, at or before it, inside the window), then softmax."""
    B, H, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    P = 0 if prefix_k is None else prefix_k.shape[2]
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            seen = [(prefix_k[b, :, j], prefix_v[b, :, j]) for j in range(P)
                    if (prefix_mask is None or prefix_mask[b, j]) and positions[b, t] - prefix_positions[b, j] < window]
            seen += [(k[b, :, j], v[b, :, j]) for j in range(t + 1)
                     if (real[b, j] or j == t) and positions[b, t] - positions[b, j] < window]
            keys, values = torch.stack([s[0] for s in seen], 1), torch.stack([s[1] for s in seen], 1)  # [H_kv, N, D]
            keys, values = repeat_kv(keys[None], H)[0], repeat_kv(values[None], H)[0]
            weights = torch.softmax((keys @ q[b, :, t, :, None])[..., 0] * scale, dim=-1)  # [H, N]
            out[b, :, t] = (weights[..., None] * values).sum(1)
    return out


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

