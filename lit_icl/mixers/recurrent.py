"""What the recurrent family shares: a matrix state S per head, its per-head output norm and
output gate, and (for the gated kinds) decay-weighted attention scores.

Every kind here (retention, simple GLA, GLA, DeltaNet) updates, per head, a state S_t [K, V]
from keys k_t, values v_t and its own gates, and reads o_t = S_t^T (q_t / sqrt(K)). The output
is RMS-normalised per head and, for the gated kinds, multiplied by a swish gate of the input,
as in RetNet (Sun et al. 2023, sec. 2.2) and GLA (Yang et al., ICML 2024, sec. 4.4):

    o_t = RMSNorm(S_t^T q_t / sqrt(K)) * silu(W_g x_t)          then o_proj

Both act on each token alone, so the state after the demonstrations carries their whole effect
on later tokens: conversion is exact (the state is an initial state that later gates decay,
not a constant bias as for plain linear attention). A padding token leaves the state unchanged:
its key is zeroed and its log gate (or its delta-rule strength beta) is 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lit_icl.mixers.base import Mixer, State


@dataclass
class RecurrentState(State):
    """S [B, H, K, V]: the per-head matrix state after the tokens seen so far."""

    S: Tensor

    @classmethod
    def shapes(cls, cfg, mode):
        return {"S": (cfg.n_head, cfg.head_dim, cfg.head_dim)}

    @classmethod
    def empty(cls, batch, cfg, mode, device=None, dtype=None, **options):
        return cls(torch.zeros(batch, cfg.n_head, cfg.head_dim, cfg.head_dim, device=device, dtype=dtype))


def masked(t: Tensor, mask: Tensor | None) -> Tensor:
    """t [B, H, T, ...] with the padding positions (mask [B, T] False) set to 0."""
    if mask is None:
        return t
    return t * mask.view(mask.shape[0], 1, mask.shape[1], *[1] * (t.dim() - 3)).to(t.dtype)


def l2_features(x: Tensor) -> Tensor:
    """SiLU, then L2-normalised over the head dimension (DeltaNet's q and k, Yang et al. 2024)."""
    return F.normalize(F.silu(x), dim=-1, eps=1e-6)


class RecurrentMixer(Mixer):
    """A recurrent kind: subclasses implement `recur(x, q, k, v, mask, S0) -> (o, S)` with the
    kind's op (chunked, state in and out). q and k are raw, or with TransformerConfig.qk_norm
    "l2" SiLU-activated and L2-normalised per head (unit keys: retrieval by cosine similarity)."""

    states = {"exact": RecurrentState}
    qk_norms = ("none", "l2")
    output_gate: ClassVar[bool] = True  # the swish output gate of RetNet and GLA

    def __init__(self, cfg):
        super().__init__(cfg)
        self.o_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.g_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias) if self.output_gate else None

    @property
    def score_scale(self) -> float:
        return self.cfg.head_dim ** -0.5

    def featurize(self, q, k, mask):
        if (self.cfg.qk_norm or self.qk_norms[0]) == "l2":
            q, k = l2_features(q), l2_features(k)
        return q, masked(k, mask)  # a padding key writes nothing

    def recur(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
              S0: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def mix(self, x, q, k, v, mask, state: RecurrentState | None, need_state):
        o, S = self.recur(x, q, k, v, mask, None if state is None else state.S)
        o = self.o_norm(o)
        if self.g_proj is not None:
            B, T, _ = x.shape
            o = o * F.silu(self.g_proj(x)).view(B, T, self.cfg.n_head, self.cfg.head_dim).transpose(1, 2)
        return o, RecurrentState(S)


class GatedMixer(RecurrentMixer):
    """A kind whose state decays: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T with log gates g_t
    [H] or [H, K] from `log_gates`. Its scores are the weights of the recurrence's parallel form
    (Yang et al. 2024, eq. 2): the last query's q_T . (k_i * prod_{i<j<=T} exp(g_j)) / sqrt(K)."""

    def log_gates(self, x: Tensor) -> Tensor:
        """g [B, H, T] (one decay per head) or [B, H, T, K] (per key dimension), all <= 0."""
        raise NotImplementedError

    def gates(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return masked(self.log_gates(x), mask)  # a padding token does not decay the state

    def scores(self, x, q, k, mask):
        g = self.gates(x, mask)
        G = (g if g.dim() == 4 else g[..., None]).cumsum(2)
        decay = torch.exp(G[:, :, -1:] - G)  # prod of the gates after key i, up to the last token
        return (q[:, :, -1:] * k * decay).sum(-1) * self.score_scale
