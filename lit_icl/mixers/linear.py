"""Causal linear attention (Katharopoulos, Vyas, Pappas, Fleuret 2020, "Transformers are RNNs",
ICML) as a token mixer; its state is the recurrent state (S, z).

    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t),   o_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)

After M demonstrations (S_M, z_M) are the bias terms b_KV, b_D of exact conversion (Chen, Hu,
Jin, Lee, Kawaguchi 2024, "Exact Conversion of In-Context Learning to Model Weights in
Linearized-Attention Transformers", ICML, arXiv 2406.02847, Algorithm 1): a query continues
from them exactly as it would after the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_icl.mixers.base import Mixer, State, register
from lit_icl.ops import feature_dim, feature_map, linear_attention_chunked

EPS = 1e-6  # guards the normaliser phi(q).z against 0 (relu features)


@dataclass
class LinearState(State):
    """S = b_KV [B, H, F, D] and z = b_D [B, H, F]; F = feature size of phi."""

    S: Tensor
    z: Tensor

    @classmethod
    def shapes(cls, cfg, mode):
        H, D = cfg.kv_heads, cfg.head_dim
        F = feature_dim(cfg.feature_map, D)
        return {"S": (H, F, D), "z": (H, F)}

    @classmethod
    def empty(cls, batch, cfg, mode, device=None, dtype=None, **options):
        H, D = cfg.kv_heads, cfg.head_dim
        F = feature_dim(cfg.feature_map, D)
        return cls(torch.zeros(batch, H, F, D, device=device, dtype=dtype),
                   torch.zeros(batch, H, F, device=device, dtype=dtype))


@register("linear")
class LinearAttention(Mixer):
    """phi(q), phi(k) with padding keys zeroed (they add nothing to S and z), then the chunked
    form of `lit_icl.ops.linear_attention`. Its scores are the kernel phi(q).phi(k)."""

    states = {"exact": LinearState}

    def __init__(self, cfg):
        super().__init__(cfg)
        self.phi = feature_map(cfg.feature_map)

    def featurize(self, q, k, mask):
        q, k = self.phi(q), self.phi(k)
        if mask is not None:
            k = k * mask[:, None, :, None].to(k.dtype)
        return q, k

    def mix(self, x, q, k, v, mask, state: LinearState | None, need_state):
        prior = None if state is None else (state.S, state.z)
        o, (S, z) = linear_attention_chunked(q, k, v, prior, self.cfg.chunk_size, EPS)
        return o, LinearState(S, z)
