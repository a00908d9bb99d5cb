"""The per-token layers of a block: its norm and its MLP, picked by the config; and token shift
(each position's previous real token), which the model adds to its input embeddings.

GPT-2: LayerNorm and Linear-GELU-Linear (tanh-approximated GELU). The Llama family: RMSNorm and
the SwiGLU MLP. Gemma: RMSNorm scaled by 1 + w and the GeGLU MLP. All act on each token alone, so they never touch the attention state.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from lit_icl.config import TransformerConfig

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}  # -> nn.GELU(approximate=...)
NORMS = ("layernorm", "rmsnorm", "rmsnorm_1p")
MLPS = ("gelu", "swiglu", "geglu")
RESIDUAL_PROJECTIONS = ("o_proj.weight", "mlp.2.weight", "mlp.down_proj.weight")  # GPT-2's scaled init


class OnePlusRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / sqrt(mean(x^2) + eps) * (1 + w), w starting at 0; computed in float32
    for half-precision inputs (as Gemma's reference does), in the input's dtype otherwise."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.to(h.dtype))
        return h.type_as(x)


def make_norm(cfg: TransformerConfig, dim: int | None = None) -> nn.Module:
    """LayerNorm (GPT-2), RMSNorm x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019; Llama),
    which has no bias and does not centre, or Gemma's RMSNorm scaled by 1 + g; over `dim`
    features (default n_embd; a head's size for the q/k norms)."""
    dim = cfg.n_embd if dim is None else dim
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    if cfg.norm == "rmsnorm_1p":
        return OnePlusRMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer"): SwiGLU
    (act = SiLU, Llama) or GeGLU (act = GELU, Gemma's tanh-approximated one)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias)
        self.act = nn.SiLU() if cfg.mlp == "swiglu" else nn.GELU(approximate=ACTIVATIONS[cfg.activation])
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


SwiGLU = GatedMLP  # the name before GeGLU joined


def make_mlp(cfg: TransformerConfig) -> nn.Module:
    """The MLP that `cfg.mlp` names: SwiGLU or GeGLU, or GPT-2's Linear-GELU-Linear."""
    if cfg.mlp in ("swiglu", "geglu"):
        return GatedMLP(cfg)
    return nn.Sequential(
        nn.Linear(cfg.n_embd, cfg.hidden, bias=cfg.bias),
        nn.GELU(approximate=ACTIVATIONS[cfg.activation]),
        nn.Linear(cfg.hidden, cfg.n_embd, bias=cfg.bias),
        nn.Dropout(cfg.dropout),
    )


def shift_tokens(input_ids: Tensor, mask: Tensor | None, last_token: Tensor) -> tuple[Tensor, Tensor]:
    """Token shift: for each position the previous real token (skipping padding; the carried
    `last_token` [B] before the first, -1 for none), and each row's last real token after the
    input. A context therefore hands its last token to the query, and conversion stays exact."""
    B, T = input_ids.shape
    if mask is None:
        previous = torch.cat([last_token[:, None], input_ids[:, :-1]], dim=1)
        return previous, (input_ids[:, -1] if T else last_token)
    index = torch.arange(T, device=input_ids.device).expand(B, T)
    latest = torch.cummax(torch.where(mask, index, -1), dim=1).values  # last real index <= t
    before = torch.cat([latest.new_full((B, 1), -1), latest[:, :-1]], dim=1)  # last real index < t
    gathered = input_ids.gather(1, before.clamp(min=0))
    previous = torch.where(before >= 0, gathered, last_token[:, None])
    if T == 0:
        return previous, last_token
    final = latest[:, -1]
    return previous, torch.where(final >= 0, input_ids.gather(1, final.clamp(min=0)[:, None])[:, 0], last_token)
