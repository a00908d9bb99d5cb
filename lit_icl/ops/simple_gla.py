"""Simple GLA: gated linear attention with one data-dependent decay per head and token (the
scalar-gate special case of GLA, Yang et al., ICML 2024; the state-space-duality form of Mamba-2,
Dao & Gu, ICML 2024, "Transformers are SSMs"), with state in and out.

Per head, a log gate g_t (scalar, g = log a_t <= 0; the layer makes it as
logsigmoid(w^T x_t + b) / tau), keys k_t [K], values v_t [V], queries q_t [K], S [K, V]:

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,     o_t = S_t^T (scale q_t)

Shapes: q, k [B, H, T, K], v [B, H, T, V], g [B, H, T], initial_state [B, H, K, V]; every
function returns (o [B, H, T, V], S_T [B, H, K, V]). A token with k = 0 and g = 0 leaves the
state unchanged. `scale` defaults to 1/sqrt(K) like fla's.

It is GLA with the gate shared by all key dimensions, so the loop and the chunked form are
`gla.py`'s with a gate column of width 1; the chunked form's intra-chunk scores are then one
matmul times the C x C decay matrix exp(G_i - G_j) (no secondary chunking needed).
"""
from __future__ import annotations

from torch import Tensor

from lit_icl.ops.chunking import CHUNK_SIZE, check_chunk_size, check_qkv, check_shape, query_scale, start_state
from lit_icl.ops.fla import fla_applicable, fla_chunk
from lit_icl.ops.gla import gated_chunked, gated_recurrent



def _check_gate(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> None:
    check_qkv(q, k, v)
    check_shape("g", g, q.shape[:3], "one log gate per head and token, [B, H, T]")


def simple_gla_recurrent(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Reference loop: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t."""
    _check_gate(q, k, v, g)
    return gated_recurrent(q, k, v, g[..., None], initial_state, scale)


def simple_gla_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Chunked simple GLA for training: any T, any chunk size, gradients to q, k, v, g and the
    initial state. On CUDA with fla installed, fla's chunk_simple_gla."""
    _check_gate(q, k, v, g)
    check_chunk_size(chunk_size)
    if q.shape[2] and fla_applicable(q, v, "simple_gla", "chunk_simple_gla"):
        return fla_chunk("simple_gla", "chunk_simple_gla", q, k, v, start_state(q, v, initial_state),
                         query_scale(q, scale), g=g)
    return gated_chunked(q, k, v, g[..., None], initial_state, scale, chunk_size)
