"""Simple GLA (the scalar-gate case of GLA, Yang et al., ICML 2024; Mamba-2's state-space
duality form, Dao & Gu, ICML 2024): one data-dependent decay per head and token,

    S_t = a_t S_{t-1} + k_t v_t^T,   a_t = exp(logsigmoid(w_h^T x_t + b_h) / tau),   tau = 16

then RMSNorm per head and the swish gate (`recurrent.py`); tau is fla's gate_logit_normalizer.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from lit_icl.mixers.base import register
from lit_icl.mixers.recurrent import GatedMixer
from lit_icl.ops import simple_gla_chunked

GATE_TEMPERATURE = 16.0  # tau: a gate logit near 0 keeps exp(log(1/2) / 16) = 0.96 of the state


@register("simple_gla")
class SimpleGLA(GatedMixer):
    """A gate per head from a linear map of the block input."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gk_proj = nn.Linear(cfg.n_embd, cfg.n_head, bias=True)

    def log_gates(self, x):
        return F.logsigmoid(self.gk_proj(x)).transpose(1, 2) / GATE_TEMPERATURE

    def recur(self, x, q, k, v, mask, S0):
        return simple_gla_chunked(q, k, v, self.gates(x, mask), S0, None, self.cfg.chunk_size)
