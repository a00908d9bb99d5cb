"""Causal linear attention with state in and out (Katharopoulos, Vyas, Pappas, Fleuret 2020,
"Transformers are RNNs", ICML: the causal form as a recurrence), in three equivalent forms.

All functions take feature-mapped queries and keys, q = phi(Q) and k = phi(K), of shape
[B, H, T, F], values v of shape [B, H, T, D], and an optional initial state (S0, z0) with
S0 [B, H, F, D] and z0 [B, H, F]. They return (o, (S, z)): the outputs [B, H, T, D] and the
state after the last token. A token whose k row is zero contributes nothing to the state
(that is how padding is masked: the caller zeros phi(k) at padded positions).

    S_t = S_{t-1} + k_t v_t^T,   z_t = z_{t-1} + k_t,   o_t = q_t^T S_t / (q_t^T z_t + eps)

- `linear_attention_recurrent`: the loop above; the slow, obviously correct reference.
- `linear_attention_quadratic`: masked (q k^T) v, O(T^2).
- `linear_attention_chunked_autograd`: quadratic inside chunks of C tokens, state across
  chunks, all chunks at once through plain autograd; the second reference.
- `linear_attention_chunked`: the same chunked form, fast, and the training path; it
  dispatches to `linear_attention_chunked_function` (a torch.autograd.Function with a
  hand-written backward, on any device;
  `chunked_linear_attention.py`) or on CUDA to `linear_attention_fla` (fla's Triton kernel,
  `fla_linear_attention.py`). Any T and any C >= 1.

The quadratic and chunked forms carry the normaliser as an extra value column of ones, so
numerator and denominator share every matrix product: [S | z] is the state of v_aug = [v | 1].
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_icl.ops.chunked_linear_attention import linear_attention_chunked_function
from lit_icl.ops.chunking import CHUNK_SIZE, check_chunk_size, chunk_layout, pad_time
from lit_icl.ops.fla_linear_attention import linear_attention_fla, use_fla


State = tuple[Tensor, Tensor]


def _initial_state(q: Tensor, v: Tensor, state: State | None) -> State:
    B, H, _, F = q.shape
    if state is None:
        return q.new_zeros(B, H, F, v.shape[-1]), q.new_zeros(B, H, F)
    S0, z0 = state
    if S0.shape != (B, H, F, v.shape[-1]) or z0.shape != (B, H, F):
        raise ValueError(
            f"state shapes S0={tuple(S0.shape)}, z0={tuple(z0.shape)} do not match "
            f"q {tuple(q.shape)} and v {tuple(v.shape)}; expected S0 [B, H, F, D], z0 [B, H, F]"
        )
    return S0, z0


def linear_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, state: State | None = None, eps: float = 1e-6
) -> tuple[Tensor, State]:
    """The recurrence of Katharopoulos et al. 2020, token by token: S_t = S_{t-1} + k_t v_t^T, z_t = z_{t-1} + k_t."""
    S, z = _initial_state(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = z + k[:, :, t]
        num = torch.einsum("bhf,bhfd->bhd", q[:, :, t], S)
        den = torch.einsum("bhf,bhf->bh", q[:, :, t], z)
        outs.append(num / (den[..., None] + eps))
    o = torch.stack(outs, dim=2) if outs else v.new_zeros(v.shape)
    return o, (S, z)


def _augment(v: Tensor, state: State) -> tuple[Tensor, Tensor]:
    """v_aug = [v | 1] and the matching state [S | z]."""
    S0, z0 = state
    v_aug = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
    return v_aug, torch.cat([S0, z0[..., None]], dim=-1)


def _split(o_aug: Tensor, S_aug: Tensor, eps: float) -> tuple[Tensor, State]:
    o = o_aug[..., :-1] / (o_aug[..., -1:] + eps)
    return o, (S_aug[..., :-1], S_aug[..., -1])


def linear_attention_quadratic(
    q: Tensor, k: Tensor, v: Tensor, state: State | None = None, eps: float = 1e-6
) -> tuple[Tensor, State]:
    """o = (tril(q k^T) v + q S0) / (tril(q k^T) 1 + q z0 + eps); S = S0 + k^T v."""
    v_aug, S0 = _augment(v, _initial_state(q, v, state))
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
    o_aug = scores @ v_aug + q @ S0
    return _split(o_aug, S0 + k.transpose(-1, -2) @ v_aug, eps)


def linear_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: State | None = None,
    chunk_size: int = CHUNK_SIZE,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """Chunked form, fast: o_c = tril(q_c k_c^T) v_c + q_c U_c, U_{c+1} = U_c + k_c^T v_c.

    On CUDA with flash-linear-attention installed, its chunked kernel (its own chunk size);
    otherwise the hand-written-backward Function, which also runs under torch.func.vmap/grad.
    Gradients flow to q, k, v and the initial state; the final state's gradient flows back.
    """
    check_chunk_size(chunk_size)
    S0, z0 = _initial_state(q, v, state)
    if q.shape[2] == 0:
        return v.new_zeros(v.shape), (S0, z0)
    if use_fla(q, v):
        return linear_attention_fla(q, k, v, S0, z0, eps)
    o, S, z = linear_attention_chunked_function(q, k, v, S0, z0, chunk_size, eps)
    return o, (S, z)


def linear_attention_chunked_autograd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: State | None = None,
    chunk_size: int = CHUNK_SIZE,
    eps: float = 1e-6,
) -> tuple[Tensor, State]:
    """Chunked form by plain autograd: inside each chunk the quadratic form, across chunks the state.

    With chunks c = 1..N of C tokens and U_c = [S | z] before chunk c,
        o_c = tril(q_c k_c^T) v_c + q_c U_c,   U_{c+1} = U_c + k_c^T v_c,
    U_c computed for all chunks at once by an exclusive cumulative sum. T is padded with zero
    keys (no contribution) up to a multiple of C; the padded outputs are dropped.
    """
    check_chunk_size(chunk_size)
    v_aug, U0 = _augment(v, _initial_state(q, v, state))
    B, H, T, F = q.shape
    C, N, pad = chunk_layout(T, chunk_size)
    q, k, v_aug = (pad_time(x, pad) for x in (q, k, v_aug))
    qc, kc, vc = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v_aug))
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    intra = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0) @ vc
    kv = kc.transpose(-1, -2) @ vc  # [B, H, N, F, D+1]
    before = torch.cumsum(kv, dim=2) - kv + U0[:, :, None]
    o_aug = (intra + qc @ before).reshape(B, H, N * C, -1)[:, :, :T]
    return _split(o_aug, U0 + kv.sum(dim=2), eps)
