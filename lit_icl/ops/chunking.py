"""What every chunked attention form shares (linear attention, momentum, the recurrent family):
chunk layout and padding (`check_chunk_size`, `chunk_layout`, `pad_time`, `to_chunks`), the
within-chunk cumulative log gates, the state scan across chunks, segments of bounded size, and
the checks of the carried state.

A chunked form splits the time axis into N chunks of C tokens (the last one zero-padded),
computes everything local to a chunk for all chunks at once, and carries the state from chunk
to chunk by a short loop (Yang et al., ICML 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training"):

    S_{n+1} = transition(A_n, S_n) + P_n   (P_n: the chunk's own contribution to the state)

Long sequences run as consecutive segments of L tokens (`in_segments`, a multiple of C), the
state carried from one to the next (the split-and-resume identity): every temporary is then
at most a fixed number of elements (`SEGMENT_ELEMENTS`), so time grows linearly in T. Whole-
sequence temporaries would not: above 32 MiB glibc's malloc maps fresh pages for every tensor
and returns them when it is freed, and the page faults cost more than the arithmetic. (The
outputs and the inputs' gradients stay whole-sequence tensors, as they must.)

The padding is neutral for every kind in this package: a zero key adds nothing to the state
(S += k v^T = 0), a zero log gate decays nothing (exp(0) = 1), a zero beta writes nothing.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# The default chunk length C of every chunked op (the model passes TransformerConfig.chunk_size,
# also 32 by default). In the chunk-size sweeps of scripts/bench.py (one CPU thread, T = 2048)
# 32 was the fastest for linear attention, retention, simple GLA and DeltaNet; GLA ran 6% faster
# at 16, too little for a default of its own.
CHUNK_SIZE = 32


def check_chunk_size(chunk_size: int) -> None:
    """ValueError unless chunk_size is an integer >= 1."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")


def chunk_layout(T: int, chunk_size: int) -> tuple[int, int, int]:
    """(C, N, pad) of a sequence of T tokens in chunks: the chunk length (chunk_size, or T when
    shorter), the number of chunks, and the positions to append so that N * C = T + pad."""
    C = min(chunk_size, max(T, 1))
    N = -(-T // C)
    return C, N, N * C - T


def pad_time(x: Tensor, pad: int, dim: int = -2) -> Tensor:
    """x with `pad` zeros appended along its time dimension `dim` (-2 for [..., T, D], -1 for [..., T])."""
    if not pad:
        return x
    widths = (0, 0) * (-dim - 1) + (0, pad)
    return torch.nn.functional.pad(x, widths)


def to_chunks(x: Tensor, C: int, dim: int = 2) -> Tensor:
    """x with time (length T) at `dim`, zero-padded to N*C = C*ceil(T/C) and split there into
    (N, C): [B, H, T, D] -> [B, H, N, C, D] for dim=2."""
    dim = dim % x.dim()
    x = pad_time(x, -x.shape[dim] % C, dim - x.dim())
    return x.unflatten(dim, (x.shape[dim] // C, C))


def from_chunks(x: Tensor, T: int, dim: int = 2) -> Tensor:
    """The inverse of `to_chunks`: merge (N, C) at dim, dim+1 and drop the padding after T."""
    return x.flatten(dim, dim + 1).narrow(dim, 0, T)


def chunk_cumsum(g: Tensor, C: int) -> Tensor:
    """Within-chunk cumulative log gates G[n, i] = sum_{j<=i} g[n, j] (inclusive, relative to
    the chunk start), g [B, H, T] or [B, H, T, K] -> [B, H, N, C] or [B, H, N, C, K].

    With log gates g <= 0, G is non-increasing along the chunk, so exp(G[i] - G[j]) for j <= i,
    exp(G[i]) and exp(G[-1] - G[j]) all lie in (0, 1]: no chunked form needs exp of a positive
    number, however strong the decay or long the sequence. Padding gets g = 0 (no decay)."""
    return to_chunks(g, C).cumsum(3)


def scan_chunks(
    S0: Tensor, P: Tensor, A: Tensor, transition: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """States before each chunk [B, H, N, K, V] and the state after the last one [B, H, K, V]:
    S_0 = S0, S_{n+1} = transition(A_n, S_n) + P_n, with P [B, H, N, K, V] and A [B, H, N, ...]
    the chunks' transition operands (a decay, a matrix). Both are split once (unbind): indexing
    P[:, :, n] in the loop would make every step's backward write a full-size gradient."""
    states, S = [], S0
    for P_n, A_n in zip(P.unbind(2), A.unbind(2)):
        states.append(S)
        S = transition(A_n, S) + P_n
    return torch.stack(states, dim=2), S


SEGMENT_ELEMENTS = 2**22  # the largest temporary of a segment, in elements (16 MiB in float32)


def segment_length(C: int, rows: int, width: int) -> int:
    """Tokens per segment: the largest multiple of C (at least C) with rows * L * width <=
    SEGMENT_ELEMENTS, for temporaries of `width` elements per token and row (batch x heads)."""
    return max(1, SEGMENT_ELEMENTS // (rows * width * C)) * C


def in_segments(
    fn: Callable[..., tuple[Tensor, Tensor]], L: int, S0: Tensor, *xs: Tensor
) -> tuple[Tensor, Tensor]:
    """fn(S, *pieces) -> (o, S) over consecutive L-token pieces of every x (time at dim 2), the
    state carried across; the outputs concatenated. split (not slicing) keeps the backward linear."""
    if xs[0].shape[2] <= L:
        return fn(S0, *xs)
    outs, S = [], S0
    for pieces in zip(*(x.split(L, dim=2) for x in xs)):
        o, S = fn(S, *pieces)
        outs.append(o)
    return torch.cat(outs, dim=2), S


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k [B, H, T, K] and v [B, H, T, V]: a ValueError naming the shapes otherwise."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"shapes q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}: "
            "expected q and k [B, H, T, K] and v [B, H, T, V]"
        )


def check_shape(name: str, x: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {tuple(expected)} ({meaning})")


def start_state(q: Tensor, v: Tensor, S0: Tensor | None) -> Tensor:
    """The state before the first token, S0 [B, H, K, V]: zeros when None, else checked."""
    B, H, _, K = q.shape
    shape = (B, H, K, v.shape[-1])
    if S0 is None:
        return q.new_zeros(shape)
    check_shape("initial_state", S0, shape, "[B, H, K, V] for q [B, H, T, K] and v [B, H, T, V]")
    return S0


def query_scale(q: Tensor, scale: float | None) -> float:
    """The factor applied to q: `scale`, or 1/sqrt(K) when None (fla's default)."""
    return q.shape[-1] ** -0.5 if scale is None else scale


def compute_dtype(x: Tensor) -> torch.dtype:
    """The chunked forms compute in float32 at least (16-bit inputs are upcast)."""
    return torch.promote_types(x.dtype, torch.float32)
