"""Feature maps phi for linear attention (Katharopoulos et al. 2020): positive maps so that phi(q).phi(k) >= 0.

Each map acts on the last dimension of a tensor [..., d] and returns [..., feature_dim(name, d)].
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def elu_plus_one(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, same size as x."""
    return F.elu(x) + 1.0


def relu(x: Tensor) -> Tensor:
    """phi(x) = max(x, 0): non-negative, sparse; the normaliser can be 0 (eps guards it)."""
    return F.relu(x)


def taylor(x: Tensor) -> Tensor:
    """Second-order Taylor feature map (Based, Arora et al., 2024).

    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))], so that
    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d): the Taylor expansion of exp(s),
    always >= 1/2 > 0. Feature size 1 + d + d^2.
    """
    d = x.shape[-1]
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([ones, x / d**0.25, outer / (math.sqrt(2.0) * math.sqrt(d))], dim=-1)


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
}


def feature_map(name: str) -> Callable[[Tensor], Tensor]:
    """The feature map called `name`; ValueError listing the allowed names otherwise."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map={name!r} is not known; allowed: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def feature_dim(name: str, d: int) -> int:
    """Size of phi(x) for x of size d."""
    feature_map(name)
    return 1 + d + d * d if name == "taylor" else d


def positive_random_features(x: Tensor, W: Tensor) -> Tensor:
    """Positive random features (Performer's FAVOR+, Choromanski et al. 2021) for the softmax
    kernel: with x' = x / d^(1/4) and rows w_i ~ N(0, I) of W [..., m, d],

        phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),   E[phi(q).phi(k)] = exp(q.k / sqrt(d)).

    x [..., T, d] -> [..., T, m]; W broadcasts against x's leading dimensions.
    """
    d, m = x.shape[-1], W.shape[-2]
    xs = x / d**0.25
    proj = xs @ W.transpose(-1, -2)
    return torch.exp(proj - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(m)
