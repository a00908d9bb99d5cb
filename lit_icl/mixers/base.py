"""What every token mixer (attention kind) shares: typed state, projections, momentum, registry.

A mixer is the attention half of a block. It projects x to per-head queries, keys and values
(grouped-query heads, RoPE), mixes them with its own op and carried state, optionally adds the
momentum EMA (Dai et al. 2023, "Why Can GPT Learn In-Context?", ACL Findings, momentum-based
attention), and
projects back. Its state after a sequence is what exact conversion carries (Chen et al. 2024,
"Exact Conversion of In-Context Learning to Model Weights in Linearized-Attention Transformers",
ICML, Algorithm 1): every state is a small dataclass of batch-first tensors that knows its
shapes, how to start empty, and how to move, select rows and save.

Adding an attention kind = a `State` dataclass, a `Mixer` subclass with `states` (conversion
mode -> state class, the exact mode first), `mix` and, if it changes q and k, `featurize` (and
`scores`, if its attention weights are not q.k); then `@register("name")`. The model, `lit_icl.context`, `lit_icl.generate` and the ICL callback
reach it only through these methods.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from lit_icl.ops import momentum_chunked, repeat_kv, rope

if TYPE_CHECKING:
    from lit_icl.config import TransformerConfig

Shapes = dict[str, tuple[Optional[int], ...]]  # tensor name -> shape without the batch (None = any length)
S = TypeVar("S", bound="State")


class State:
    """Base of a typed state: a dataclass whose fields are tensors with the batch first, None
    (a part a mode leaves out) or nested states. Field names are the names the tensors are
    saved under (`ContextState.save` writes "layers.{i}.{name}")."""

    @classmethod
    def shapes(cls, cfg: TransformerConfig, mode: str) -> Shapes:
        """The tensors of this state for a model of `cfg` converting in `mode`."""
        raise NotImplementedError

    @classmethod
    def empty(cls: type[S], batch: int, cfg: TransformerConfig, mode: str, device=None, dtype=None, **options) -> S:
        """The state before any token (what conversion starts from)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by its saved name (nested states flattened)."""
        out: dict[str, Tensor] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, State):
                out.update(value.tensors())
            elif value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_tensors(cls: type[S], tensors: dict[str, Tensor]) -> S:
        """The state of saved tensors (missing optional parts stay None)."""
        return cls(**{f.name: tensors.get(f.name) for f in fields(cls)})

    def map(self: S, fn: Callable[[Tensor], Tensor]) -> S:
        """The same state with `fn` applied to every tensor."""
        def one(value):
            return value.map(fn) if isinstance(value, State) else None if value is None else fn(value)
        return replace(self, **{f.name: one(getattr(self, f.name)) for f in fields(self)})

    def with_tensors(self: S, tensors: dict[str, Tensor]) -> S:
        """This state's structure filled with `tensors` (by saved name)."""
        def one(name, value):
            return value.with_tensors(tensors) if isinstance(value, State) else tensors.get(name)
        return replace(self, **{f.name: one(f.name, getattr(self, f.name)) for f in fields(self)})

    def to(self: S, device=None, dtype: torch.dtype | None = None) -> S:
        """Moved to `device`; floating tensors cast to `dtype` (masks keep theirs)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self: S, rows) -> S:
        """The state of some rows (an index list, slice or bool mask), batch kept."""
        return self.map(lambda t: t[rows])

    def expand(self: S, batch: int) -> S:
        """A batch-1 state broadcast to `batch` rows (a view, no copy)."""
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))

    def decoding(self) -> State:
        """The state to decode from after a context: itself, unless a mode treats the tokens
        after the context differently (ICLAA caches them exactly)."""
        return self


@dataclass
class MomentumState(State):
    """Momentum attention's accumulator c_t = eta c_{t-1} + v_t, m [B, H_kv, D] (Dai et al.
    2023's momentum-based attention; `lit_icl.ops.momentum`)."""

    m: Tensor

    @classmethod
    def shapes(cls, cfg, mode):
        return {"m": (cfg.kv_heads, cfg.head_dim)}

    @classmethod
    def empty(cls, batch, cfg, mode, device=None, dtype=None, **options):
        return cls(torch.zeros(batch, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype))


@dataclass
class LayerState(State):
    """A block's state: its mixer's, plus the momentum accumulator when momentum is on."""

    mixer: State
    momentum: Optional[MomentumState] = None

    def decoding(self) -> LayerState:
        return replace(self, mixer=self.mixer.decoding())


@dataclass
class Pass:
    """What every layer of one forward pass shares: positions [B, T] (long), the padding mask
    [B, T] (True = token) or None, and what to hand back."""

    positions: Tensor
    mask: Optional[Tensor] = None
    need_state: bool = False
    need_attn: bool = False
    attn_at: Optional[int] = None  # the position whose scores need_attn reports (None: the last)


@dataclass
class MixerOutput:
    """y: the attention output [B, T, C] (after o_proj, before the residual); state: the state
    after the input (need_state); scores: the last position's scores over the input's keys
    [B, H, T] (need_attn)."""

    y: Tensor
    state: Optional[LayerState] = None
    scores: Optional[Tensor] = None


class Mixer(nn.Module):
    """Multi-head causal attention of one kind, state in and out.

    Subclasses set `states` (conversion mode -> State class; the first is the exact mode,
    `convert`'s default) and implement `mix`. Key/value heads may be fewer than query heads
    (grouped-query attention, Ainslie et al. 2023) where `grouped_query` is True: k, v and
    every state keep n_kv_head heads, repeated for the query heads only inside the op.
    """

    states: ClassVar[dict[str, type[State]]] = {}
    grouped_query: ClassVar[bool] = False
    kind: ClassVar[str] = ""  # the name it is registered under
    qk_norms: ClassVar[tuple[str, ...]] = ()  # the values of TransformerConfig.qk_norm it takes, its default first

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        kv, inner = cfg.kv_heads * cfg.head_dim, cfg.n_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, inner, bias=cfg.qkv_biased)
        self.k_proj = nn.Linear(cfg.n_embd, kv, bias=cfg.qkv_biased)
        self.v_proj = nn.Linear(cfg.n_embd, kv, bias=cfg.qkv_biased)
        self.o_proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.states)

    @property
    def rope_base(self) -> float:
        """The RoPE base of this layer (position="rope")."""
        return self.cfg.rope_theta

    def normalize(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q, k of each head before RoPE (softmax kinds with qk_norm="rmsnorm": their learned norms)."""
        return q, k

    @property
    def score_scale(self) -> float:
        """Factor of q.k in the attention scores that `need_attn` reports."""
        return 1.0

    def featurize(self, q: Tensor, k: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """q, k as the op reads them (linear attention: phi(q), phi(k) with padding keys zeroed)."""
        return q, k

    def mix(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, state: State | None,
            need_state: bool) -> tuple[Tensor, State | None]:
        """(o [B, H, T, D], the mixer's state after the input) from the block input x [B, T, C]
        (for data-dependent gates), q [B, H, T, *], k, v [B, H_kv, T, *] and the carried state
        (None: no context)."""
        raise NotImplementedError

    def scores(self, x: Tensor, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        """The last position's attention weights over the input's keys [B, H, T], what SimAM
        compares (Dai et al. 2023): by default score_scale * q_T.k_i (before any softmax)."""
        return (q[:, :, -1:] @ repeat_kv(k, self.cfg.n_head).transpose(-1, -2))[:, :, 0] * self.score_scale

    def forward(self, x: Tensor, state: LayerState | None, run: Pass) -> MixerOutput:
        cfg, (B, T, C) = self.cfg, x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k, v = (p(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        q, k = self.normalize(q, k)
        if cfg.position == "rope":
            q, k = rope(q, run.positions, self.rope_base), rope(k, run.positions, self.rope_base)
        q, k = self.featurize(q, k, run.mask)
        o, new = self.mix(x, q, k, v, run.mask, None if state is None else state.mixer, run.need_state)
        momentum = None
        if cfg.momentum > 0:  # MoAttn = Attn + sum_{i<t} eta^{t-i} v_i (Dai et al. 2023)
            prior = None if state is None or state.momentum is None else state.momentum.m
            term, c = momentum_chunked(v, cfg.momentum, prior, run.mask, cfg.chunk_size)
            o, momentum = o + repeat_kv(term, cfg.n_head), MomentumState(c)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))
        scores = None
        if run.need_attn:  # scores of position attn_at: causal, so the input up to it is all they need
            n = T if run.attn_at is None else run.attn_at + 1
            scores = self.scores(x[:, :n], q[:, :, :n], k[:, :, :n], None if run.mask is None else run.mask[:, :n])
        return MixerOutput(y, LayerState(new, momentum) if run.need_state else None, scores)

    # -- the states of this mixer, by the model's conversion mode (TransformerLM.check_mode) --
    def layer_mode(self, mode: str) -> str:
        """This layer's mode when the model converts in `mode`: `mode` where the layer has it,
        else the layer's exact mode (a hybrid's recurrent layers stay exact when its softmax
        layers convert approximately)."""
        return mode if mode in self.states else self.modes[0]

    def state_shapes(self, mode: str) -> Shapes:
        """Every tensor of a block's `mode` state (mixer and momentum), without the batch."""
        mode = self.layer_mode(mode)
        shapes = dict(self.states[mode].shapes(self.cfg, mode))
        if self.cfg.momentum > 0:
            shapes.update(MomentumState.shapes(self.cfg, mode))
        return shapes

    def empty_state(self, batch: int, mode: str, device=None, dtype=None, **options) -> LayerState:
        """A block's state before any token in `mode` (options: e.g. ICLAA's num_features)."""
        mode = self.layer_mode(mode)
        momentum = MomentumState.empty(batch, self.cfg, mode, device, dtype) if self.cfg.momentum > 0 else None
        return LayerState(self.states[mode].empty(batch, self.cfg, mode, device, dtype, **options), momentum)

    def state_from_tensors(self, tensors: dict[str, Tensor], mode: str) -> LayerState:
        """A block's `mode` state from its saved tensors (names checked by the caller)."""
        mode = self.layer_mode(mode)
        momentum = MomentumState.from_tensors(tensors) if self.cfg.momentum > 0 else None
        return LayerState(self.states[mode].from_tensors(tensors), momentum)

    def mode_of(self, names) -> str:
        """The mode whose state holds exactly the tensors `names`; ValueError if none does."""
        for mode in self.modes:
            if set(self.state_shapes(mode)) == set(names):
                return mode
        raise ValueError(f"a state holding {sorted(names)} fits no mode of {self.kind} attention")


MIXERS: dict[str, type[Mixer]] = {}


def register(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
    """Class decorator: the mixer that `TransformerConfig(attention=name)` builds."""
    def add(cls: type[Mixer]) -> type[Mixer]:
        if name in MIXERS:
            raise ValueError(f"attention={name!r} is registered twice ({MIXERS[name].__name__}, {cls.__name__})")
        MIXERS[name] = cls
        cls.kind = name
        return cls
    return add
