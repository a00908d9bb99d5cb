"""flash-linear-attention (fla; Yang, Zhang et al., github.com/fla-org/flash-linear-attention)
from lit_icl's ops: its Triton chunk kernels on CUDA, its pure-PyTorch references anywhere.

- `fla_naive(op)` loads `fla/ops/<op>/naive.py` by file path: importing it through the package
  would import every Triton kernel, which CPU-only machines lack. These are the test oracles
  and the benchmark's peers (they need only torch and einops).
- `fla_kernel(op, name)` imports `fla.ops.<op>.<name>` (a chunk kernel) on demand.
- `fla_applicable` says whether a call may go to a kernel; `fla_chunk` makes it: fla's layout
  is [B, T, H, *], lit_icl's [B, H, T, *]; the state [B, H, K, V] is the same in both.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

MAX_HEAD_DIM = 256  # conservative: fla's chunk kernels are tuned and tested up to this K and V
HALF = (torch.float16, torch.bfloat16)


def _fla_ops_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "ops"


@functools.cache
def fla_naive(op: str) -> Optional[ModuleType]:
    """fla's pure-PyTorch reference module `fla/ops/<op>/naive.py`, loaded from its file.

    None when fla (or its einops dependency) is not installed; a ValueError when fla is there
    but has no such reference (listing the ops that have one)."""
    ops = _fla_ops_dir()
    if ops is None:
        return None
    path = ops / op / "naive.py"
    if not path.is_file():
        known = sorted(p.parent.name for p in ops.glob("*/naive.py"))
        raise ValueError(f"fla has no pure-PyTorch reference for op={op!r}; ops with one: {known}")
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{op}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:  # einops
        return None
    return module


@functools.cache
def fla_kernel(op: str, name: str) -> Optional[Callable]:
    """fla.ops.<op>.<name>, or None when fla (or Triton with a usable driver) is missing."""
    try:
        module = importlib.import_module(f"fla.ops.{op}")
    except (ImportError, RuntimeError):  # not installed, or Triton without a usable driver
        return None
    return getattr(module, name, None)


def transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad) is running: fla's kernels are opaque to it."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if check is None else bool(check())


def fla_applicable(q: Tensor, v: Tensor, op: str, name: str, dtypes: tuple = (torch.float32, *HALF)) -> bool:
    """Whether q [B, H, T, K], v [B, H, T, V] may go to fla's kernel fla.ops.<op>.<name>:
    CUDA tensors of an accepted dtype, head dims the kernels cover, outside torch.func."""
    _, H, T, K = q.shape
    V = v.shape[-1]
    half = q.dtype in HALF
    return (
        q.is_cuda
        and q.dtype in dtypes
        and K <= MAX_HEAD_DIM
        and V <= MAX_HEAD_DIM
        and not (half and (K % 2 or V % 2))  # fla asserts even K and V for 16-bit inputs
        and T >= H  # some fla versions reject T < H as a layout mistake
        and not transforms_active()
        and fla_kernel(op, name) is not None
    )


def fla_chunk(op: str, name: str, q: Tensor, k: Tensor, v: Tensor, S0: Tensor, scale: float,
              **gates: Tensor) -> tuple[Tensor, Tensor]:
    """(o [B, H, T, V] in v's dtype, S_T [B, H, K, V] float32) from fla.ops.<op>.<name> with
    initial and final state. Gates with a time axis ([B, H, T, ...]) are moved to fla's layout;
    others (a per-head [H] decay) pass as they are."""
    t = lambda x: x.transpose(1, 2)  # [B, H, T, *] <-> [B, T, H, *]
    gates = {key: t(x) if x.dim() >= 3 else x for key, x in gates.items()}
    o, S = fla_kernel(op, name)(t(q), t(k), t(v), scale=scale, initial_state=S0.float(),
                                output_final_state=True, **gates)
    return t(o).to(v.dtype), S
