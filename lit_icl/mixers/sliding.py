"""Sliding-window softmax attention as a token mixer: each query sees the keys of the last
`window` positions, itself included (Beltagy et al. 2020, "Longformer"; Jiang et al. 2023,
Mistral 7B; Gemma Team 2025, Gemma 3's local layers, interleaved with global "softmax" ones).

Its exact state after a context is constant-size: the keys and values of the context's last
`window` real tokens, with their absolute positions, so that a later query at position p attends
exactly the keys p - window < j <= p that the prompted model's window shows it, however long
the context was (Chen et al. 2024's exact conversion, ICML, arXiv 2406.02847, for this kind).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_icl.mixers.base import Pass, State, register
from lit_icl.mixers.softmax import SoftmaxAttention
from lit_icl.ops import sliding_window_attention


@dataclass
class WindowKV(State):
    """The keys k and values v [B, H_kv, W, D] of at most `window` latest real tokens per row,
    kv_mask [B, W] (True = a real token, False = an empty slot) and kv_pos [B, W] (each key's
    absolute position, long)."""

    k: Tensor
    v: Tensor
    kv_mask: Tensor
    kv_pos: Tensor

    @classmethod
    def shapes(cls, cfg, mode):
        H, D = cfg.kv_heads, cfg.head_dim
        return {"k": (H, None, D), "v": (H, None, D), "kv_mask": (None,), "kv_pos": (None,)}

    @classmethod
    def empty(cls, batch, cfg, mode, device=None, dtype=None, **options):
        H, D = cfg.kv_heads, cfg.head_dim
        kv = torch.zeros(batch, H, 0, D, device=device, dtype=dtype)
        none = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        return cls(kv, kv.clone(), none, torch.zeros(batch, 0, dtype=torch.long, device=device))


def keep_window(k: Tensor, v: Tensor, real: Tensor, pos: Tensor, window: int | None) -> WindowKV:
    """The latest `window` real keys of each row (all of them when window is None), right-aligned
    in min(window, N) slots; slots without one are masked out."""
    B, H, N, D = k.shape
    L = N if window is None else min(window, N)
    if L == N and bool(real.all()):
        return WindowKV(k, v, real, pos)
    rank = real.flip(1).long().cumsum(1).flip(1)  # real tokens at or after each column
    keep = real & (rank <= L)
    slot = torch.where(keep, L - rank, L)  # slot L collects the dropped columns, then goes
    columns = torch.arange(N, device=k.device).expand(B, N)
    index = torch.zeros(B, L + 1, dtype=torch.long, device=k.device).scatter(1, slot, columns)[:, :L]
    mask = torch.zeros(B, L + 1, dtype=torch.bool, device=k.device).scatter(1, slot, keep)[:, :L]
    gather = index[:, None, :, None].expand(B, H, L, D)
    return WindowKV(k.gather(2, gather), v.gather(2, gather), mask, pos.gather(1, index))


@register("sliding")
class SlidingWindowAttention(SoftmaxAttention):
    """Softmax attention over the last `window` positions (TransformerConfig.window; None = all),
    with its own RoPE base (rope_local_theta, else rope_theta). Conversion mode: "exact" (the
    approximate ICLAA modes of softmax do not apply to a window; in a stack with softmax layers,
    such as Gemma 3's, they apply to those layers)."""

    states = {"exact": WindowKV}  # constant-size, like the recurrent kinds' states (softmax's growing prefix: "kv")

    @property
    def rope_base(self) -> float:
        return self.cfg.rope_theta if self.cfg.rope_local_theta is None else self.cfg.rope_local_theta

    def forward(self, x, state, run: Pass):
        self._positions = run.positions  # the keys' absolute positions, which `mix` needs
        try:
            return super().forward(x, state, run)
        finally:
            self._positions = None

    def mix(self, x, q, k, v, mask, state, need_state):
        positions, window = self._positions, self.cfg.window
        span = 1 << 62 if window is None else window
        if state is None or state.k.shape[2] == 0:
            o = sliding_window_attention(q, k, v, positions, span, mask=mask, scale=self.score_scale)
        else:
            o = sliding_window_attention(q, k, v, positions, span, state.k, state.v, state.kv_mask, state.kv_pos,
                                         mask, scale=self.score_scale)
        if not need_state:
            return o, None
        real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask.bool()
        if state is not None and state.k.shape[2]:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
            real, positions = torch.cat([state.kv_mask, real], dim=1), torch.cat([state.kv_pos, positions], dim=1)
        return o, keep_window(k, v, real, positions, window)
