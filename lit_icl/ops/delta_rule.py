"""DeltaNet: linear attention with the delta rule (Schlag, Irie, Schmidhuber, ICML 2021, "Linear
Transformers Are Secretly Fast Weight Programmers"; Yang, Wang, Zhang, Shen, Kim,
NeurIPS 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"),
with state in and out.

Per head, keys k_t [K] and queries q_t [K] (L2-normalised by the layer), values v_t [V],
writing strengths beta_t in (0, 1) (the layer's sigmoid), S [K, V]:

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale q_t)

Shapes: q, k [B, H, T, K], v [B, H, T, V], beta [B, H, T], initial_state [B, H, K, V]; every
function returns (o [B, H, T, V], S_T [B, H, K, V]). A token with beta = 0 leaves the state
unchanged. `scale` defaults to 1/sqrt(K) like fla's.

Chunked form (Yang et al. 2024, sec. 3): in a chunk of C tokens with the state S before it, the
written values u_t = beta_t (v_t - S_{t-1}^T k_t) satisfy (I + L) U = diag(beta) V - diag(beta) K S
with L = tril(diag(beta) K K^T, -1) (strictly lower). One triangular solve per chunk (the UT
transform of the WY representation) gives

    W = (I + L)^{-1} diag(beta) K,   U0 = (I + L)^{-1} diag(beta) V,   U = U0 - W S
    o = q S + tril(q k^T) U = (q - tril(q k^T) W) S + tril(q k^T) U0
    S_next = S + K^T U = (I - K^T W) S + K^T U0

so everything but the K x K state update S_next = S - (K^T W) S + K^T U0 is computed for all
chunks at once.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from lit_icl.ops.chunking import (
    CHUNK_SIZE,
    check_qkv,
    check_shape,
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
from lit_icl.ops.fla import HALF, fla_applicable, fla_chunk



def _check_beta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> None:
    check_qkv(q, k, v)
    check_shape("beta", beta, q.shape[:3], "one writing strength per head and token, [B, H, T]")


def delta_rule_recurrent(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, initial_state: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Reference loop: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = S_t^T q_t."""
    _check_beta(q, k, v, beta)
    S, q = start_state(q, v, initial_state), q * query_scale(q, scale)
    outs = []
    for q_t, k_t, v_t, b_t in zip(*(x.unbind(2) for x in (q, k, v, beta))):  # unbind: linear-time backward
        u = b_t[..., None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))
        S = S + k_t[..., None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    return (torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)), S


def _delta_segment(S0: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, C: int, scale: float):
    """(o, S) of one segment by the WY / UT form, all in the compute dtype."""
    qc, kc, vc = (to_chunks(x, C) for x in (q * scale, k, v))  # [B, H, N, C, *]
    bc = to_chunks(beta, C)[..., None]  # [B, H, N, C, 1]
    kT = kc.transpose(-1, -2)
    L = ((bc * kc) @ kT).tril(-1)
    WU = torch.linalg.solve_triangular(L, torch.cat([bc * kc, bc * vc], dim=-1), upper=False, unitriangular=True)
    W, U0 = WU.split([kc.shape[-1], vc.shape[-1]], dim=-1)
    A = (qc @ kT).tril()
    states, S = scan_chunks(S0, kT @ U0, kT @ W, lambda M_n, S: S - M_n @ S)
    o = (qc - A @ W) @ states + A @ U0
    return from_chunks(o, q.shape[2]), S


def delta_rule_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Chunked DeltaNet (the WY / UT form above) for training: any T, any chunk size, gradients to
    q, k, v, beta and the initial state; in segments (`in_segments`); computes in float32 at
    least, returns o in v's dtype and the state in the compute dtype. On CUDA with fla installed
    and 16-bit inputs, fla's chunk_delta_rule (it rejects float32)."""
    _check_beta(q, k, v, beta)
    (B, H, T, K), V, dtype, scale = q.shape, v.shape[-1], compute_dtype(q), query_scale(q, scale)
    check_chunk_size(chunk_size)
    C = chunk_layout(T, chunk_size)[0]
    if T and fla_applicable(q, v, "delta_rule", "chunk_delta_rule", dtypes=HALF):
        return fla_chunk("delta_rule", "chunk_delta_rule", q, k, v, start_state(q, v, initial_state), scale, beta=beta)
    S0 = start_state(q, v, initial_state).to(dtype)
    if T == 0:
        return v.new_zeros(v.shape), S0
    segment = functools.partial(_delta_segment, C=C, scale=scale)
    with torch.autocast(q.device.type, enabled=False):
        inputs = (x.to(dtype) for x in (q, k, v, beta))
        o, S = in_segments(segment, segment_length(C, B * H, max(K + V, C)), S0, *inputs)
    return o.to(v.dtype), S
