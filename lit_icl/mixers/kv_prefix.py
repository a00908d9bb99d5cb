"""The exact state of softmax attention: the keys and values of the tokens seen so far (a KV
cache), and how an input extends it. Grouped-query attention (Ainslie et al. 2023): the prefix
keeps n_kv_head heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_icl.mixers.base import State


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
