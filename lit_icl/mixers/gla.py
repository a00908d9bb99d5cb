"""Gated linear attention (Yang, Wang, Shen, Panda, Kim, ICML 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training", sec. 4.4): a data-dependent decay per head and
key dimension from a low-rank projection,

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   alpha_t = exp(logsigmoid(W_2 W_1 x_t + b) / tau)

with rank 16 and tau = 16 (the paper's), then RMSNorm per head and the swish gate.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from lit_icl.mixers.base import register
from lit_icl.mixers.recurrent import GatedMixer
from lit_icl.mixers.simple_gla import GATE_TEMPERATURE
from lit_icl.ops import gla_chunked

GATE_RANK = 16  # the low-rank bottleneck of the gate projection


@register("gla")
class GatedLinearAttention(GatedMixer):
    """Gates [H, K] per token from x through a rank-16 bottleneck."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gk_proj = nn.Sequential(nn.Linear(cfg.n_embd, GATE_RANK, bias=False),
                                     nn.Linear(GATE_RANK, cfg.n_embd, bias=True))

    def log_gates(self, x):
        B, T, _ = x.shape
        g = F.logsigmoid(self.gk_proj(x)) / GATE_TEMPERATURE
        return g.view(B, T, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)

    def recur(self, x, q, k, v, mask, S0):
        return gla_chunked(q, k, v, self.gates(x, mask), S0, None, self.cfg.chunk_size)
