"""DeltaNet (Schlag, Irie, Schmidhuber, ICML 2021; Yang, Wang, Zhang, Shen, Kim, NeurIPS 2024,
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length"): the state is
corrected towards each new value instead of summed,

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,   beta_t = sigmoid(w_h^T x_t + b_h)

with q and k SiLU-activated and L2-normalised (the paper's and fla's default), then RMSNorm per
head (no output gate, fla's default). The context enters as an initial state, not additively:
order matters, and conversion is exact all the same.
"""
from __future__ import annotations

import torch.nn as nn

from lit_icl.mixers.base import register
from lit_icl.mixers.recurrent import RecurrentMixer, masked
from lit_icl.ops import delta_rule_chunked


@register("deltanet")
class DeltaNet(RecurrentMixer):
    """The delta rule with a writing strength beta per head and token."""

    output_gate = False
    qk_norms = ("l2",)  # unit keys keep I - beta k k^T a contraction

    def __init__(self, cfg):
        super().__init__(cfg)
        self.b_proj = nn.Linear(cfg.n_embd, cfg.n_head, bias=True)

    def recur(self, x, q, k, v, mask, S0):
        beta = masked(self.b_proj(x).sigmoid().transpose(1, 2), mask)  # a padding token writes nothing
        return delta_rule_chunked(q, k, v, beta, S0, None, self.cfg.chunk_size)
