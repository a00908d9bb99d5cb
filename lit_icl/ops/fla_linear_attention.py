"""GPU path of causal linear attention (Katharopoulos et al. 2020) through flash-linear-attention (`fla`).

Install with `pip install lit_icl[gpu]`. fla's `chunk_linear_attn` (Triton, layout [B, T, H, K])
carries only the key-value state S through `initial_state` / `output_final_state`, and its
own `normalize=True` divides by q.cumsum(k) with a fixed eps and, depending on the version,
without a carried z. So fla computes the numerator with state, and the normaliser is done here:

    num_t = q_t^T S_t        fla: chunk_linear_attn(q, k, v, scale=1, initial_state=S_0,
                                  output_final_state=True, normalize=False) -> (num, S_T)
    Z_t   = z_0 + sum_{s<=t} k_s,   o_t = num_t / (q_t . Z_t + eps),   z_T = Z_T

Used only for CUDA tensors, outside torch.func transforms, when fla imports and the sizes fit
its kernels; everything else takes the pure-PyTorch chunked path. fla's pure-PyTorch reference
(`fla/ops/linear_attn/naive.py`, for the benchmark and the tests) is `fla.fla_naive("linear_attn")`.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from lit_icl.ops.fla import fla_applicable, fla_kernel


def fla_chunk_linear_attn() -> Optional[Callable]:
    """fla.ops.linear_attn.chunk_linear_attn, or None when fla (or Triton) is not installed."""
    return fla_kernel("linear_attn", "chunk_linear_attn")


def use_fla(q: Tensor, v: Tensor) -> bool:
    """Whether `linear_attention_chunked` hands q [B, H, T, F], v [B, H, T, D] to fla."""
    return fla_applicable(q, v, "linear_attn", "chunk_linear_attn")


def linear_attention_fla(
    q: Tensor, k: Tensor, v: Tensor, S0: Tensor, z0: Tensor, eps: float
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """o [B, H, T, D] (v's dtype) and the float32 state (S_T, z_T) by fla's chunked kernel;
    same arguments and meaning as `linear_attention_chunked`."""
    chunk = fla_chunk_linear_attn()
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # fla layout [B, T, H, *]
    extra = {"head_first": False} if "head_first" in inspect.signature(chunk).parameters else {}
    num, S = chunk(
        qt, kt, vt, scale=1.0, initial_state=S0.float(), output_final_state=True, normalize=False, **extra
    )
    Z = z0.float()[:, None] + torch.cumsum(kt.float(), dim=1)  # [B, T, H, F]
    den = torch.linalg.vecdot(qt.float(), Z) + eps
    o = (num.float() / den[..., None]).to(v.dtype).transpose(1, 2)
    return o, (S, Z[:, -1])

