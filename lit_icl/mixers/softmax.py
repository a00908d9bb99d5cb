"""Causal softmax attention as a token mixer; its exact state is the KV prefix (a KV cache).

Softmax attention has no constant-size state: the exact way to carry a context is to keep its
keys and values, the upper bound that approximate conversion (ICLAA, `approximate.py`) is
measured against (Chen et al. 2024, ICML, arXiv 2406.02847). Grouped-query attention (Ainslie
et al. 2023): the prefix keeps n_kv_head heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_icl.mixers.base import Mixer, State, register
from lit_icl.ops import softmax_attention


@dataclass
class KVPrefix(State):
    """The keys k and values v [B, H_kv, P, D] of the P tokens seen so far, and kv_mask [B, P]
    (True = a real token, False = padding)."""

    k: Tensor
    v: Tensor
    kv_mask: Tensor

    @classmethod
    def shapes(cls, cfg, mode):
        H, D = cfg.kv_heads, cfg.head_dim
        return {"k": (H, None, D), "v": (H, None, D), "kv_mask": (None,)}

    @classmethod
    def empty(cls, batch, cfg, mode, device=None, dtype=None, **options):
        H, D = cfg.kv_heads, cfg.head_dim
        kv = torch.zeros(batch, H, 0, D, device=device, dtype=dtype)
        return cls(kv, kv.clone(), torch.zeros(batch, 0, dtype=torch.bool, device=device))

    def prefix(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(k, v, kv_mask) for the op, or Nones when empty."""
        return (self.k, self.v, self.kv_mask) if self.k.shape[2] else (None, None, None)


def extend(prefix: KVPrefix | None, k: Tensor, v: Tensor, mask: Tensor | None) -> KVPrefix:
    """The prefix followed by the input's keys and values (mask [B, T] or None = all real)."""
    real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask
    if prefix is None or prefix.k.shape[2] == 0:  # nothing to join: keep the input's dtype
        return KVPrefix(k, v, real)
    return KVPrefix(torch.cat([prefix.k, k], dim=2), torch.cat([prefix.v, v], dim=2),
                    torch.cat([prefix.kv_mask, real], dim=1))


@register("softmax")
class SoftmaxAttention(Mixer):
    """softmax(q [prefix_k | k]^T / sqrt(d) + causal/padding mask) [prefix_v | v]. Conversion
    modes: "kv" (exact, the default) and ICLAA's approximate "prf" and "taylor"."""

    states = {"kv": KVPrefix}  # ICLAA's "prf" and "taylor" are added by approximate.py
    grouped_query = True

    @property
    def score_scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.head_dim)

    def mix(self, x, q, k, v, mask, state, need_state):
        if state is not None and not isinstance(state, KVPrefix):  # another mode's state (ICLAA)
            return state.attend(q, k, v, mask, need_state)
        prefix = (None, None, None) if state is None else state.prefix()
        o = softmax_attention(q, k, v, *prefix, mask)
        return o, (extend(state, k, v, mask) if need_state else None)
