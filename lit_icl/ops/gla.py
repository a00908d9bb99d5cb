"""Gated linear attention (GLA; Yang, Wang, Shen, Panda, Kim, ICML 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training", sec. 4) with state in and out.

Per head, log gates g_t [K] (g = log alpha <= 0; the layer makes them as logsigmoid(...) / tau
from a low-rank projection), keys k_t [K], values v_t [V], queries q_t [K], S [K, V]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = S_t^T (scale q_t)

Shapes: q, k, g [B, H, T, K], v [B, H, T, V], initial_state [B, H, K, V]; every function
returns (o [B, H, T, V], S_T [B, H, K, V]). A token with k = 0 and g = 0 leaves the state
unchanged (how a layer masks padding). `scale` defaults to 1/sqrt(K) like fla's.

The machinery here also serves simple GLA (one gate per head, `simple_gla.py`): the private
functions take gates [B, H, T, G] with G = K (per key dimension) or G = 1 (per head).

Chunked form (sec. 4 of the paper), per chunk of C tokens with the cumulative log gates
G_i = g_1 + ... + g_i relative to the chunk start (`chunk_cumsum`; every exponent below <= 0):

    o_i     = (q_i * exp(G_i)) S_n + sum_{j<=i} A_ij v_j,   A_ij = sum_k q_ik k_jk exp(G_ik - G_jk)
    S_{n+1} = exp(G_C) * S_n + sum_j (k_j * exp(G_C - G_j)) v_j^T

A per key dimension cannot be one product of rescaled q and k without exp(+G) (overflow under
strong decay), so it is the paper's secondary chunking: sub-chunks of c tokens; a block of
earlier sub-chunks is one matmul with both sides taken relative to the first token r of the
later sub-chunk (exp(G_i - G_r) and exp(G_r - G_j), both <= 1), and the c x c diagonal blocks
are the elementwise sum over k. With one gate per head, A = (q k^T) * exp(G_i - G_j) directly.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lit_icl.ops.chunking import (
    CHUNK_SIZE,
    check_qkv,
    check_shape,
    chunk_cumsum,
    check_chunk_size,
    chunk_layout,
    compute_dtype,
    from_chunks,
    in_segments,
    query_scale,
    scan_chunks,
    segment_length,
    start_state,
    to_chunks,
)
from lit_icl.ops.fla import fla_applicable, fla_chunk

# c: the diagonal blocks cost about B*H*T*c*K elementwise, the earlier sub-chunks B*H*T*(C/c)*K;
# 4 was the fastest of c = 2, 4, 8 with C = 16, 32, 64 (T=2048, B=4, H=8, K=64, float32, one thread)
SUB_CHUNK = 4


def _decay(diff: Tensor, keep: Tensor) -> Tensor:
    """exp(diff) where keep, else 0: the dropped entries (positive exponents) never reach exp."""
    return diff.masked_fill(~keep, float("-inf")).exp()


def gated_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor | None, scale: float | None):
    """S_t = exp(g_t) * S_{t-1} + k_t v_t^T (g_t [G] broadcast over the rows of S), o_t = S_t^T q_t."""
    S, q = start_state(q, v, S0), q * query_scale(q, scale)
    outs = []
    for q_t, k_t, v_t, g_t in zip(*(x.unbind(2) for x in (q, k, v, g))):  # unbind: linear-time backward
        S = torch.exp(g_t)[..., None] * S + k_t[..., None] * v_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    return (torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)), S


def _intra_scores(qc: Tensor, kc: Tensor, G: Tensor, sub_chunk: int) -> Tensor:
    """A [B, H, N, C, C] with A_ij = sum_k q_ik k_jk exp(G_ik - G_jk) for j <= i, else 0."""
    C, Gd = qc.shape[-2], G.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
    if Gd == 1:  # one gate per head: the decay is a C x C matrix
        return (qc @ kc.transpose(-1, -2)) * _decay(G - G.transpose(-1, -2), causal)
    c = math.gcd(C, sub_chunk)
    qs, ks, Gs = (x.unflatten(-2, (C // c, c)) for x in (qc, kc, G))  # [B, H, N, C/c, c, K]
    decay = _decay(Gs[..., :, None, :] - Gs[..., None, :, :], causal[:c, :c, None])
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * decay).sum(-1)  # [..., C/c, c, c]
    # split once (unbind): slicing kc in the loop would make each step's backward fill a full-size gradient
    qs, ks, Gs, diag = (x.unbind(-3) for x in (qs, ks, Gs, diag))
    rows = []
    for b in range(C // c):  # row block b: sub-chunks j < b relative to b's first token r
        past = []
        if b:
            ref = Gs[b][..., :1, :]
            q_rel = qs[b] * torch.exp(Gs[b] - ref)
            k_rel = torch.cat(ks[:b], dim=-2) * torch.exp(ref - torch.cat(Gs[:b], dim=-2))
            past = [q_rel @ k_rel.transpose(-1, -2)]
        future = diag[b].new_zeros(*diag[b].shape[:-1], C - (b + 1) * c)
        rows.append(torch.cat([*past, diag[b], future], dim=-1))
    return torch.cat(rows, dim=-2)


def _gated_segment(S0: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, C: int, sub_chunk: int, scale: float):
    """(o, S) of one segment by the chunked form, all in the compute dtype."""
    qc, kc, vc = (to_chunks(x, C) for x in (q * scale, k, v))
    G = chunk_cumsum(g, C)  # [B, H, N, C, G]
    last = G[..., -1:, :]
    P = (kc * torch.exp(last - G)).transpose(-1, -2) @ vc  # [B, H, N, K, V]
    decay = torch.exp(last).transpose(-1, -2)  # [B, H, N, G, 1]
    states, S = scan_chunks(S0, P, decay, torch.mul)
    o = _intra_scores(qc, kc, G, sub_chunk) @ vc + (qc * torch.exp(G)) @ states
    return from_chunks(o, q.shape[2]), S


def gated_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor | None, scale: float | None,
                  chunk_size: int, sub_chunk: int = SUB_CHUNK) -> tuple[Tensor, Tensor]:
    """The chunked form above for gates g [B, H, T, G], G in {1, K}, by autograd, in segments
    (`in_segments`); computes in float32 at least, returns o in v's dtype and the state in the
    compute dtype."""
    (B, H, T, K), V, dtype = q.shape, v.shape[-1], compute_dtype(q)
    S0 = start_state(q, v, S0).to(dtype)
    if T == 0:
        return v.new_zeros(v.shape), S0
    C = chunk_layout(T, chunk_size)[0]
    c = math.gcd(C, sub_chunk)
    width = max(K, V, C) if g.shape[-1] == 1 else max(c, C // c) * max(K, V)  # widest temporary per token
    segment = functools.partial(_gated_segment, C=C, sub_chunk=sub_chunk, scale=query_scale(q, scale))
    with torch.autocast(q.device.type, enabled=False):
        inputs = (x.to(dtype) for x in (q, k, v, g))
        o, S = in_segments(segment, segment_length(C, B * H, width), S0, *inputs)
    return o.to(v.dtype), S


def _check_gates(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> None:
    check_qkv(q, k, v)
    check_shape("g", g, k.shape, "log gates per key dimension, [B, H, T, K] like k")


def gla_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Reference loop (Yang et al. 2024, sec. 4): S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t."""
    _check_gates(q, k, v, g)
    return gated_recurrent(q, k, v, g, initial_state, scale)


def gla_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Chunked GLA (secondary chunking, module docstring) for training: any T, any chunk size,
    gradients to q, k, v, g and the initial state. On CUDA with fla installed, fla's chunk_gla."""
    _check_gates(q, k, v, g)
    check_chunk_size(chunk_size)
    if q.shape[2] and fla_applicable(q, v, "gla", "chunk_gla"):
        return fla_chunk("gla", "chunk_gla", q, k, v, start_state(q, v, initial_state),
                         query_scale(q, scale), g=g)
    return gated_chunked(q, k, v, g, initial_state, scale, chunk_size)

