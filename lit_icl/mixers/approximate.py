"""Approximate conversion of a softmax context (ICLAA; Chen, Hu, Jin, Lee, Kawaguchi 2024, "Exact
Conversion of In-Context Learning to Model Weights in Linearized-Attention Transformers", ICML,
arXiv 2406.02847): everything about it lives in this file.

The M context tokens' exp-kernel is replaced by a feature map phi with phi(q).phi(k) ~
exp(q.k / sqrt d): positive random features (mode "prf"; Choromanski et al. 2021, FAVOR+) or the
second-order Taylor map (mode "taylor"; Arora et al. 2024, Based). The context then enters as
bias terms, b_KV = sum_j phi(k'_j) v'_j^T and b_D = sum_j phi(k'_j), next to the input's exact
softmax sums:

    o_t = (sum_{j<=t} exp(q_t.k_j/sqrt d) v_j + phi(q_t)^T b_KV) / (sum_{j<=t} exp(q_t.k_j/sqrt d) + phi(q_t)^T b_D)

Only context-to-input attention is approximated. Converting folds the tokens into the sums
(`FeatureSums`); decoding after such a context caches the new tokens exactly next to the sums
(`ApproximateDecoding`). Under grouped-query attention the query heads of a group share their
key head's sums and random features.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lit_icl.mixers.base import State
from lit_icl.mixers.kv_prefix import KVPrefix, extend
from lit_icl.ops import attention_mask, feature_dim, positive_random_features, repeat_kv, taylor

APPROXIMATE_MODES = ("prf", "taylor")


def approximate_features(x: Tensor, W: Tensor | None) -> Tensor:
    """phi of ICLAA: positive random features with projection W [B, H, m, d], or (W None) the
    second-order Taylor map 1 + s + s^2/2 of exp(s)."""
    return taylor(x) if W is None else positive_random_features(x, W)


def softmax_attention_biased(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, S: Tensor, z: Tensor, mask: Tensor | None = None,
    prefix_k: Tensor | None = None, prefix_v: Tensor | None = None, prefix_mask: Tensor | None = None,
) -> Tensor:
    """The ICLAA output above: exact softmax over the input's own keys (and an exact KV prefix,
    a decoding cache of earlier input tokens) plus a context known only through b_KV = S
    [B, H, F, D] and b_D = z [B, H, F]; fq = phi(q) [B, H, T, F]. k, v, S, z may have H_kv
    heads. The row max m of the exact scores is subtracted and the context terms scaled by
    exp(-m), so nothing overflows that the exact part would not."""
    B, H, T, d = q.shape
    if prefix_k is not None:
        if prefix_mask is None:
            prefix_mask = torch.ones(B, prefix_k.shape[2], dtype=torch.bool, device=q.device)
        k, v = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    k, v, S, z = (repeat_kv(t, H) for t in (k, v, S, z))
    allowed = attention_mask(B, T, q.device, prefix_mask, mask)[:, None]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - m)
    scale = torch.exp(-m)
    num = p @ v + scale * (fq @ S)
    den = p.sum(dim=-1, keepdim=True) + scale * (fq @ z[..., None])
    return num / den


@dataclass
class FeatureSums(State):
    """The context as feature-map sums: S = b_KV [B, H_kv, F, D], z = b_D [B, H_kv, F], and for
    mode "prf" the random projection W [B, H_kv, m, D] (None for "taylor"). Running the model
    on this state folds the input tokens into the sums (conversion)."""

    S: Tensor
    z: Tensor
    W: Optional[Tensor] = None

    @classmethod
    def shapes(cls, cfg, mode):
        H, D = cfg.kv_heads, cfg.head_dim
        if mode == "taylor":
            F = feature_dim("taylor", D)
            return {"S": (H, F, D), "z": (H, F)}
        return {"S": (H, None, D), "z": (H, None), "W": (H, None, D)}

    @classmethod
    def empty(cls, batch, cfg, mode, device=None, dtype=None, num_features: int = 256,
              generator: torch.Generator | None = None, **options):
        """Zero sums; for "prf" one N(0, I) projection [m, d] per key/value head, drawn from
        `generator` (shared by the layers, so a seed fixes them all)."""
        if num_features < 1:
            raise ValueError(f"num_features={num_features} must be >= 1")
        H, D = cfg.kv_heads, cfg.head_dim
        F = num_features if mode == "prf" else feature_dim("taylor", D)
        W = None
        if mode == "prf":
            W = torch.randn(H, num_features, D, generator=generator, dtype=torch.float64)
            W = W.to(dtype=dtype, device=device).expand(batch, H, num_features, D)
        return cls(torch.zeros(batch, H, F, D, dtype=dtype, device=device),
                   torch.zeros(batch, H, F, dtype=dtype, device=device), W)

    def query_features(self, q: Tensor) -> Tensor:
        return approximate_features(q, None if self.W is None else repeat_kv(self.W, q.shape[1]))

    def attend(self, q, k, v, mask, need_state):
        """Conversion: the input attends exactly to itself and approximately to the context;
        its own tokens are then folded into the sums."""
        o = softmax_attention_biased(q, k, v, self.query_features(q), self.S, self.z, mask)
        if not need_state:
            return o, None
        fk = approximate_features(k, self.W)
        if mask is not None:
            fk = fk * mask[:, None, :, None].to(fk.dtype)
        return o, FeatureSums(self.S + fk.transpose(-1, -2) @ v, self.z + fk.sum(dim=2), self.W)

    def decoding(self) -> ApproximateDecoding:
        return ApproximateDecoding(self, None)


@dataclass
class ApproximateDecoding(State):
    """Decoding after an approximate context: its sums, and an exact KV cache of the tokens
    after it (None before the first)."""

    sums: FeatureSums
    cache: Optional[KVPrefix] = None

    def attend(self, q, k, v, mask, need_state):
        prefix = (None, None, None) if self.cache is None else self.cache.prefix()
        s = self.sums
        o = softmax_attention_biased(q, k, v, s.query_features(q), s.S, s.z, mask, *prefix)
        return o, (ApproximateDecoding(s, extend(self.cache, k, v, mask)) if need_state else None)

