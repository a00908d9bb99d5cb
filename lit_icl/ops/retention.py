"""Retention (Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei, 2023, "Retentive Network: A Successor to
Transformer for Large Language Models", sec. 2.1, eq. 6) with state in and out.

Per head h, a fixed decay gamma_h in (0, 1), keys k_t [K], values v_t [V], queries q_t [K]:

    S_t = gamma_h S_{t-1} + k_t v_t^T,     o_t = S_t^T (scale q_t)

The paper's decays are gamma_h = 1 - 2^(-5-h) (sec. 2.2; `retention_gamma`). Its per-head group norm of
the output is the layer's, not the op's. Shapes: q, k [B, H, T, K], v [B, H, T, V], gamma [H],
initial_state [B, H, K, V]; every function returns (o [B, H, T, V], S_T [B, H, K, V]).
`scale` defaults to 1/sqrt(K) like fla's and RetNet's.

Retention is simple GLA (`simple_gla.py`) with the constant log gate g_t = log gamma_h, so its fast
form is simple GLA's: the Retention layer calls `simple_gla_chunked` (and on CUDA fla's
chunk_simple_gla) with these gates, set to 0 at padding. This file keeps the decays and the
paper's recurrence as the reference that form is tested against.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lit_icl.ops.chunking import check_qkv, check_shape
from lit_icl.ops.simple_gla import simple_gla_recurrent


def retention_gamma(n_heads: int, device=None, dtype=torch.float32) -> Tensor:
    """RetNet's per-head decays gamma_h = 1 - 2^(-5-h), h = 0 .. n_heads-1 (Sun et al. 2023, sec. 2.2)."""
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads={n_heads!r} must be an integer >= 1")
    return 1 - 2.0 ** (-5.0 - torch.arange(n_heads, device=device, dtype=dtype))


def retention_log_gates(q: Tensor, k: Tensor, v: Tensor, gamma: Tensor) -> Tensor:
    """g [B, H, T] = log gamma_h at every token: retention as simple GLA's gates (shapes checked)."""
    check_qkv(q, k, v)
    B, H, T, _ = q.shape
    check_shape("gamma", gamma, (H,), "one decay in (0, 1) per head")
    return torch.log(gamma.to(q.dtype))[None, :, None].expand(B, H, T)


def retention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, gamma: Tensor, initial_state: Tensor | None = None, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Reference loop (Sun et al. 2023, eq. 6): S_t = gamma S_{t-1} + k_t v_t^T, o_t = S_t^T q_t."""
    return simple_gla_recurrent(q, k, v, retention_log_gates(q, k, v, gamma), initial_state, scale)
