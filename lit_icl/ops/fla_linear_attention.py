"""GPU path of causal linear attention (Katharopoulos et al. 2020) through flash-linear-attention (`fla`).

Install with `pip install lit_icl[gpu]`. fla's `chunk_linear_attn` (Triton, layout [B, T, H, K])
carries only the key-value state S through `initial_state` / `output_final_state`, and its
own `normalize=True` divides by q.cumsum(k) with a fixed eps and, depending on the version,
without a carried z. So fla computes the numerator with state, and the normaliser is done here:

    num_t = q_t^T S_t        fla: chunk_linear_attn(q, k, v, scale=1, initial_state=S_0,
                                  output_final_state=True, normalize=False) -> (num, S_T)
    Z_t   = z_0 + sum_{s<=t} k_s,   o_t = num_t / (q_t . Z_t + eps),   z_T = Z_T

Used only for CUDA tensors, outside torch.func transforms, when fla imports and the sizes fit
its kernels; everything else takes the pure-PyTorch chunked path. `fla_naive_reference` loads
fla's pure-PyTorch reference functions (for the benchmark and the tests) on any machine.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

MAX_HEAD_DIM = 256  # conservative: fla's chunk kernels are tuned and tested up to this K and V


@functools.cache
def fla_chunk_linear_attn() -> Optional[Callable]:
    """fla.ops.linear_attn.chunk_linear_attn, or None when fla (or Triton) is not installed."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except (ImportError, RuntimeError):  # not installed, or Triton without a usable driver
        return None
    return chunk_linear_attn


def _transforms_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if check is None else bool(check())


def use_fla(q: Tensor, v: Tensor) -> bool:
    """Whether `linear_attention_chunked` hands q [B, H, T, F], v [B, H, T, D] to fla."""
    B, H, T, F = q.shape
    D = v.shape[-1]
    half = q.dtype in (torch.float16, torch.bfloat16)
    return (
        q.is_cuda
        and (q.dtype == torch.float32 or half)
        and F <= MAX_HEAD_DIM
        and D <= MAX_HEAD_DIM
        and not (half and (F % 2 or D % 2))  # fla asserts even K and V for 16-bit inputs
        and T >= H  # some fla versions reject T < H as a layout mistake
        and not _transforms_active()
        and fla_chunk_linear_attn() is not None
    )


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


@functools.cache
def fla_naive_reference() -> Optional[ModuleType]:
    """fla's `fla/ops/linear_attn/naive.py` (naive_recurrent_linear_attn, naive_chunk_linear_attn;
    pure PyTorch, layout [B, T, H, D]) loaded from its file: importing it through the package
    would import every Triton kernel, which CPU-only machines lack. None when fla is absent."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "linear_attn" / "naive.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("fla_linear_attn_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:  # its einops dependency
        return None
    return module
