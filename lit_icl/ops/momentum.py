"""Momentum attention's EMA term (Dai, Sun, Dong, Hao, Ma, Sui, Wei 2023, "Why Can GPT Learn
In-Context?", ACL Findings, arXiv 2212.10559: momentum-based attention) with state in and out.

    MoAttn(V, K, q_t) = Attn(V, K, q_t) + sum_{i<t} eta^{t-i} v_i

The carried state is the accumulator c_t = sum_{i<=t} eta^{t-i} v_i = eta c_{t-1} + v_t, so
the term at token t is m_t = eta c_{t-1} (equivalently m_t = eta (m_{t-1} + v_{t-1})). Positions
count real tokens only: a masked (padding) token neither adds its value nor decays the
accumulator, so padded rows give the same numbers as unpadded ones.

Shapes: v [B, H, T, D], mask [B, T] (1 = token) or None, state c [B, H, D] or None.
Both functions return (m [B, H, T, D], c_T [B, H, D]).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_icl.ops.chunking import check_chunk_size, chunk_layout, pad_time


def _initial(v: Tensor, state: Tensor | None) -> Tensor:
    B, H, _, D = v.shape
    if state is None:
        return v.new_zeros(B, H, D)
    if state.shape != (B, H, D):
        raise ValueError(f"momentum state shape {tuple(state.shape)} != expected {(B, H, D)}")
    return state


def _mask(v: Tensor, mask: Tensor | None) -> Tensor:
    B, _, T, _ = v.shape
    if mask is None:
        return torch.ones(B, T, dtype=v.dtype, device=v.device)
    return mask.to(v.dtype)


def momentum_recurrent(
    v: Tensor, eta: float, state: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference loop: m_t = eta c_{t-1}; c_t = eta c_{t-1} + v_t at real tokens."""
    c = _initial(v, state)
    m = _mask(v, mask)[:, None, :, None]  # [B, 1, T, 1]
    outs = []
    for t in range(v.shape[2]):
        outs.append(eta * c)
        c = torch.where(m[:, :, t] > 0, eta * c + v[:, :, t], c)
    return (torch.stack(outs, dim=2) if outs else torch.zeros_like(v)), c


def momentum_chunked(
    v: Tensor,
    eta: float,
    state: Tensor | None = None,
    mask: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked EMA: a C x C decay matrix W[t, i] = eta^(p_t - p_i) (i < t, i real) inside each
    chunk, the accumulator carried across chunks; p counts real tokens. Exponents stay within
    a chunk, so no eta^(-n) ever overflows. chunk_size >= T gives the plain quadratic form.
    """
    check_chunk_size(chunk_size)
    c = _initial(v, state)
    B, H, T, D = v.shape
    C, N, pad = chunk_layout(T, chunk_size)
    v, m = pad_time(v, pad), pad_time(_mask(v, mask), pad, dim=-1)
    p = torch.cumsum(m, dim=-1).reshape(B, N, C)  # real tokens up to and including t
    mc = m.reshape(B, N, C)
    at = p + 1 - mc  # position token t has (or would have, were it real)
    start = p[:, :, :1] - mc[:, :, :1]  # real tokens before the chunk
    strict = torch.ones(C, C, dtype=torch.bool, device=v.device).tril(-1)
    diff = at[..., :, None] - p[..., None, :]
    W = torch.pow(eta, diff.clamp(min=0)) * strict * mc[..., None, :]  # [B, N, C, C]
    vc = v.reshape(B, H, N, C, D)
    intra = W[:, None] @ vc  # [B, H, N, C, D]
    into = torch.pow(eta, at - start)  # weight of the incoming accumulator at each token
    end = p[:, :, -1:]
    out_w = torch.pow(eta, end - p) * mc  # weight of each token in the outgoing accumulator
    chunk_sum = (out_w[:, None, :, :, None] * vc).sum(dim=3)  # [B, H, N, D]
    chunk_decay = torch.pow(eta, end - start)[:, None, :, 0]  # [B, 1, N]
    inter = []
    for n in range(N):
        inter.append(into[:, None, n, :, None] * c[:, :, None, :])
        c = chunk_decay[:, :, n, None] * c + chunk_sum[:, :, n]
    out = intra + torch.stack(inter, dim=2)
    return out.reshape(B, H, N * C, D)[:, :, :T], c
