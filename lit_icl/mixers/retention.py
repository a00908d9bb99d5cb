"""Retention (Sun, Dong, Huang, Ma, Xia, Xue, Wang, Wei 2023, "Retentive Network: A Successor to
Transformer for Large Language Models", sec. 2): linear attention with a fixed decay per head,

    S_t = gamma_h S_{t-1} + k_t v_t^T,   gamma_h = 1 - 2^(-5-h),   o_t = S_t^T q_t / sqrt(K)

then RMSNorm per head and the swish gate (`recurrent.py`). A constant gate is simple GLA's
scalar gate, so the op is `lit_icl.ops.simple_gla_chunked` with g = log gamma_h (0 at padding).
"""
from __future__ import annotations

import torch

from lit_icl.mixers.base import register
from lit_icl.mixers.recurrent import GatedMixer
from lit_icl.ops import retention_gamma, simple_gla_chunked


@register("retention")
class Retention(GatedMixer):
    """Multi-scale retention: head h keeps a fraction gamma_h of its state per token."""

    def log_gates(self, x):
        B, T, _ = x.shape
        g = torch.log(retention_gamma(self.cfg.n_head, x.device, torch.float64)).to(x.dtype)
        return g[None, :, None].expand(B, -1, T)

    def recur(self, x, q, k, v, mask, S0):
        return simple_gla_chunked(q, k, v, self.gates(x, mask), S0, None, self.cfg.chunk_size)
