"""Chunked causal linear attention (Katharopoulos et al. 2020) with a hand-written backward
(`linear_attention_chunked_function`). The chunking helpers every chunked op shares are in
`chunking.py`.

The normaliser rides along as an extra value column of ones: with v'_t = [v_t | 1] and the
state U = [S | z] (so that U_T = U_0 + sum_t k_t v'_t^T), per chunk c of C tokens
(q_c, k_c [C, F], v'_c [C, D+1], U_c the state before the chunk):

    A_c     = tril(q_c k_c^T)                     intra-chunk scores
    o'_c    = A_c v'_c + q_c U_c                  = [numerator | denominator - eps]
    o_c     = o'_c[:, :D] / (o'_c[:, D] + eps)
    U_{c+1} = U_c + k_c^T v'_c

Chunks are visited in order, so every temporary is one chunk for all heads ([B*H, C, *],
cache-sized; large batched products over all chunks at once run far below the matmul rate
on a CPU). Plain autograd of the same algebra keeps the scores, masked scores and cumulative
states of every chunk until the backward; this Function keeps only q, k, v', U_0 and o, and
its backward recomputes the states U_c in one sweep, then walks the chunks back. With
do' = [do / den | -(do . o) / den] (the gradient of o' per token) and g = dU_{c+1}, the
gradient reaching the state after the chunk (g = [dS_T | dz_T] after the last one):

    dA_c   = tril(do'_c v'_c^T)
    dq_c   = dA_c k_c + do'_c U_c^T
    dk_c   = dA_c^T q_c + v'_c g^T
    dv'_c  = A_c^T do'_c + k_c g                 (the ones column's gradient is dropped)
    dU_c   = g + q_c^T do'_c                      (dU_0 = [dS_0 | dz_0])

The Function composes with torch.func (vmap, grad): setup_context style with
`generate_vmap_rule = True`, and no in-place op on a tensor that a vmapped input could reach
from the outside. It computes in float32 at least (half inputs are upcast, autocast is off
inside) and returns o in v's dtype, the state in the compute dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _ChunkedLinearAttention(torch.autograd.Function):
    """(o [G, T, D], U_T [G, F, D+1]) of q, k [G, T, F], v' [G, T, D+1], U_0 [G, F, D+1]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, va, U0, chunk_size: int, eps: float):
        D, U, outs = va.shape[-1] - 1, U0, []
        for t in range(0, q.shape[1], chunk_size):
            qc, kc, vc = (x[:, t : t + chunk_size] for x in (q, k, va))
            A = torch.bmm(qc, kc.transpose(1, 2)).tril()
            oc = torch.baddbmm(torch.bmm(qc, U), A, vc)
            outs.append(oc[..., :D] / (oc[..., D:] + eps))
            U = torch.baddbmm(U, kc.transpose(1, 2), vc)
        return torch.cat(outs, dim=1), U

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, va, U0, chunk_size, eps = inputs
        ctx.chunk_size, ctx.eps = chunk_size, eps
        ctx.save_for_backward(q, k, va, U0, output[0])

    @staticmethod
    def backward(ctx, do, dU):
        q, k, va, U0, o = ctx.saved_tensors
        C, D = ctx.chunk_size, va.shape[-1] - 1
        starts = range(0, q.shape[1], C)
        states, U = [], U0  # U_c, recomputed
        for t in starts:
            states.append(U)
            U = torch.baddbmm(U, k[:, t : t + C].transpose(1, 2), va[:, t : t + C])
        dq, dk, dv, g = [], [], [], dU
        for t, U in zip(reversed(starts), reversed(states)):
            qc, kc, vc, oc, doc = (x[:, t : t + C] for x in (q, k, va, o, do))
            A = torch.bmm(qc, kc.transpose(1, 2)).tril()
            den = torch.baddbmm(torch.bmm(qc, U[..., D:]), A, vc[..., D:]) + ctx.eps
            dnum = doc / den
            dn = torch.cat([dnum, -(dnum * oc).sum(-1, keepdim=True)], dim=-1)
            dA = torch.bmm(dn, vc.transpose(1, 2)).tril()
            dq.append(torch.baddbmm(torch.bmm(dn, U.transpose(1, 2)), dA, kc))
            dk.append(torch.baddbmm(torch.bmm(vc, g.transpose(1, 2)), dA.transpose(1, 2), qc))
            dv.append(torch.baddbmm(torch.bmm(kc, g), A.transpose(1, 2), dn))
            g = torch.baddbmm(g, qc.transpose(1, 2), dn)
        dq, dk, dv = (torch.cat(x[::-1], dim=1) for x in (dq, dk, dv))
        return dq, dk, dv, g, None, None


def linear_attention_chunked_function(
    q: Tensor, k: Tensor, v: Tensor, S0: Tensor, z0: Tensor, chunk_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(o [B, H, T, D], S_T [B, H, F, D], z_T [B, H, F]) by the chunked form above.

    q, k [B, H, T, F] (feature-mapped), v [B, H, T, D], S0 [B, H, F, D], z0 [B, H, F];
    any T >= 1 (the last chunk may be shorter) and chunk_size >= 1.
    """
    (B, H, T, F), D, out_dtype = q.shape, v.shape[-1], v.dtype
    dtype = torch.promote_types(q.dtype, torch.float32)
    U0 = torch.cat([S0, z0[..., None]], dim=-1).to(dtype).reshape(B * H, F, D + 1)
    va = torch.cat([v.to(dtype), v.new_ones(B, H, T, 1, dtype=dtype)], dim=-1).reshape(B * H, T, D + 1)
    q, k = (x.to(dtype).reshape(B * H, T, F) for x in (q, k))
    with torch.autocast(q.device.type, enabled=False):
        o, U = _ChunkedLinearAttention.apply(q, k, va, U0, chunk_size, eps)
    U = U.view(B, H, F, D + 1)
    return o.view(B, H, T, D).to(out_dtype), U[..., :D], U[..., D]
