"""Causal softmax attention as a token mixer; its exact state is the KV prefix (a KV cache).

Softmax attention has no constant-size state: the exact way to carry a context is to keep its
keys and values (`kv_prefix.py`), the upper bound that approximate conversion (ICLAA,
`approximate.py`) is measured against (Chen et al. 2024, ICML, arXiv 2406.02847).
"""
from __future__ import annotations

import math

from lit_icl.layers import make_norm
from lit_icl.mixers.approximate import APPROXIMATE_MODES, FeatureSums
from lit_icl.mixers.base import Mixer, register
from lit_icl.mixers.kv_prefix import KVPrefix, extend
from lit_icl.ops import softmax_attention


@register("softmax")
class SoftmaxAttention(Mixer):
    """softmax(q [prefix_k | k]^T / sqrt(d) + causal/padding mask) [prefix_v | v] (the factor
    attn_scale instead of 1 / sqrt(d) when set; q and k normed per head first with
    qk_norm="rmsnorm"). Conversion modes: "kv" (exact, the default) and ICLAA's approximate
    "prf" and "taylor"."""

    states = {"kv": KVPrefix, **{mode: FeatureSums for mode in APPROXIMATE_MODES}}  # exact, then ICLAA's
    grouped_query = True
    qk_norms = ("none", "rmsnorm")

    def __init__(self, cfg):
        super().__init__(cfg)
        norms = cfg.qk_norm == "rmsnorm"  # Gemma 3 / Qwen3: a learned norm of each head's q and k
        self.q_norm = make_norm(cfg, cfg.head_dim) if norms else None
        self.k_norm = make_norm(cfg, cfg.head_dim) if norms else None

    def normalize(self, q, k):
        return (q, k) if self.q_norm is None else (self.q_norm(q), self.k_norm(k))

    @property
    def score_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.head_dim) if self.cfg.attn_scale is None else self.cfg.attn_scale

    def mix(self, x, q, k, v, mask, state, need_state):
        if state is not None and not isinstance(state, KVPrefix):  # another mode's state (ICLAA)
            if self.cfg.attn_scale is not None:  # ICLAA scores q.k / sqrt(d): fold attn_scale into q
                q = q * (self.cfg.attn_scale * math.sqrt(self.cfg.head_dim))
            return state.attend(q, k, v, mask, need_state)
        prefix = (None, None, None) if state is None else state.prefix()
        o = softmax_attention(q, k, v, *prefix, mask, scale=self.score_scale)
        return o, (extend(state, k, v, mask) if need_state else None)
