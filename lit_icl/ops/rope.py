"""Rotary position embedding (Su et al., 2021) at explicit integer positions."""
from __future__ import annotations

import torch
from torch import Tensor


def rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x [B, H, T, d] by angle pos * base^(-2i/d).

    This pairing of the first and second halves of the head ("rotate half") is the layout of
    GPT-NeoX and of the Llama family's Hugging Face checkpoints, rather than the paper's
    adjacent pairs (2i, 2i + 1); base is the checkpoint's rope_theta. positions is [B, T]
    (long): each row may start at its own offset.
    """
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float64) * 2 / d)
    angles = (positions.to(torch.float64)[..., None] * inv_freq)[:, None]  # [B, 1, T, d/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
