"""Causal softmax attention through scaled_dot_product_attention, with an optional key/value
prefix: the exact KV-prefix form of a softmax model's context (BRIEF §2, the upper bound for
approximate conversion).

Shapes: q [B, H, T, D]; k, v [B, H_kv, T, D]; prefix_k, prefix_v [B, H_kv, P, D]; prefix_mask
[B, P] and mask [B, T] with 1 = token. H_kv divides H: with H_kv < H (grouped-query attention,
Ainslie et al. 2023) query head h reads key/value head h // (H / H_kv). A query attends to every real prefix key and to the real keys at or
before it; it always sees itself, so a padding query never has an empty row (its output is
ignored by the caller).
"""
from __future__ import annotations

import math

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


def softmax_attention_biased(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fq: Tensor,
    S: Tensor,
    z: Tensor,
    mask: Tensor | None = None,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    prefix_mask: Tensor | None = None,
) -> Tensor:
    """ICLAA (BRIEF §2): exact softmax over the input's own keys plus a context that is known
    only through feature-map sums b_KV = S [B, H, F, D] and b_D = z [B, H, F]:

        o_t = (sum_{j<=t} exp(q_t.k_j/sqrt d) v_j + phi(q_t)^T b_KV)
              / (sum_{j<=t} exp(q_t.k_j/sqrt d) + phi(q_t)^T b_D)

    fq = phi(q) [B, H, T, F]; S and z may have H_kv heads, like k and v. An exact KV prefix (a decoding cache of earlier input tokens) joins
    the exact sums. Computed with the row max m subtracted from the exact scores and the
    context terms scaled by exp(-m), so nothing overflows that the exact part would not.
    """
    B, H, T, d = q.shape
    if prefix_k is not None:
        if prefix_mask is None:
            prefix_mask = torch.ones(B, prefix_k.shape[2], dtype=torch.bool, device=q.device)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    k, v, S, z = (repeat_kv(t, H) for t in (k, v, S, z))
    allowed = attention_mask(B, T, q.device, prefix_mask, mask)[:, None]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - m)
    scale = torch.exp(-m)
    num = p @ v + scale * (fq @ S)
    den = p.sum(dim=-1, keepdim=True) + scale * (fq @ z[..., None])
    return num / den
