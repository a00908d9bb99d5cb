"""A decoder-only transformer LM whose attention layers carry state (nanoGPT-style, one file).

TransformerConfig holds the hyperparameters; TransformerLM is a plain nn.Module (no Lightning).
Each block's attention is a token mixer that the config names (`lit_icl.mixers`: linear,
softmax, ...). Every mixer can start from a carried state and hand back its state at the end,
which is all that exact conversion of in-context learning needs (Chen et al. 2024, ICML, arXiv
2406.02847, Algorithm 1: one forward pass over the demonstrations yields every layer's state):

    out = model.run(demo_ids, need_state=True)           # one pass over the demonstrations
    model(query_ids, state=out)                          # == model(cat(demo, query))[:, M:]

A state is any object with `layers` (one `lit_icl.mixers.LayerState` per block), `offset` ([B]
long, the tokens already seen per row) and `last_token` ([B] long, the last token seen, -1 for
none; token shift reads it); `lit_icl.context.ContextState` is the public one.

The same model holds GPT-2 (LayerNorm, GELU MLP, learned positions) and the Llama family
(RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases); `lit_icl.hf`
loads either from a local Hugging Face directory.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from lit_icl.layers import ACTIVATIONS, MLPS, NORMS, RESIDUAL_PROJECTIONS, make_mlp, make_norm, shift_tokens
from lit_icl.mixers import MIXERS, LayerState, MixerOutput, Pass
from lit_icl.ops import FEATURE_MAPS

POSITIONS = ("learned", "rope", "none")
LOGITS_AT = ("all", "last", "none")


@dataclass
class TransformerConfig:
    """Model hyperparameters; invalid values raise ValueError naming the field."""

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    attention: Union[str, list[str]] = "linear"  # a registered mixer (lit_icl.mixers.MIXERS): "linear" |
    # "softmax" | "retention" | "simple_gla" | "gla" | "deltanet"; or one per layer (a hybrid stack)
    feature_map: str = "elu"  # linear attention's phi: "elu" | "relu" | "taylor"
    momentum: float = 0.0  # eta of momentum attention (Dai et al. 2023); 0 = off
    position: str = "learned"  # "learned" | "rope" | "none"
    dropout: float = 0.0
    bias: bool = True
    chunk_size: int = 32  # chunk length of the chunked linear attention / momentum (bench.py sweep)
    tie_weights: bool = True  # share token embedding and output head
    token_shift: bool = False  # add the previous token's embedding to each token's input
    activation: str = "gelu"  # GELU of mlp="gelu": "gelu" (exact) | "gelu_tanh" (GPT-2)
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" (Zhang & Sennrich 2019; Llama)
    norm_eps: float = 1e-5  # epsilon of every norm (Llama: the checkpoint's rms_norm_eps)
    mlp: str = "gelu"  # "gelu": Linear-GELU-Linear | "swiglu": down(silu(gate x) * up x) (Llama)
    mlp_hidden: Optional[int] = None  # MLP width (Llama: intermediate_size); None = 4 * n_embd
    n_kv_head: Optional[int] = None  # key/value heads of softmax attention (grouped-query
    # attention, Ainslie et al. 2023): each serves n_head / n_kv_head query heads; None = n_head
    rope_theta: float = 10000.0  # RoPE base of position="rope" (Llama: the checkpoint's rope_theta)
    qk_norm: Optional[str] = None  # recurrent kinds' q and k: "l2" (SiLU, then L2-normalised per head, as in
    # DeltaNet, Yang et al. 2024) | "none" (raw); None = each kind's own (deltanet "l2", the others "none")

    def __post_init__(self):
        optional = ("mlp_hidden", "n_kv_head")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "chunk_size", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if not isinstance(self.attention, str):
            self.attention = list(self.attention)
            if len(self.attention) != self.n_layer:
                raise ValueError(f"attention={self.attention!r} names {len(self.attention)} layers; "
                                 f"n_layer={self.n_layer} needs one kind per layer (or one name for all)")
        for kind in self.kinds:
            if kind not in MIXERS:
                raise ValueError(f"attention={kind!r}; allowed: {list(MIXERS)}, or a list of these, one per layer")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={self.feature_map!r}; allowed: {sorted(FEATURE_MAPS)}")
        if self.position not in POSITIONS:
            raise ValueError(f"position={self.position!r}; allowed: {list(POSITIONS)}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head size, got {self.head_dim}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum!r} must be in [0, 1)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; allowed: {list(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        grouped = [name for name, mixer in MIXERS.items() if mixer.grouped_query]
        if self.kv_heads != self.n_head and not set(self.kinds) <= set(grouped):
            allowed = " or ".join(repr(name) for name in grouped)
            raise ValueError(f"n_kv_head={self.n_kv_head} (grouped-query attention) needs attention={allowed}")
        if self.qk_norm is not None:
            takes = {kind: MIXERS[kind].qk_norms for kind in self.kinds if MIXERS[kind].qk_norms}
            allowed = sorted({n for norms in takes.values() for n in norms})
            if not takes:
                raise ValueError(f"qk_norm={self.qk_norm!r} applies to the recurrent kinds only; attention={self.attention!r}")
            refused = [kind for kind, norms in takes.items() if self.qk_norm not in norms]
            if refused:
                raise ValueError(f"qk_norm={self.qk_norm!r} is not available for {refused[0]} attention; allowed: "
                                 f"{list(takes[refused[0]]) if self.qk_norm in allowed else allowed}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; allowed: {list(NORMS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r}; allowed: {list(MLPS)}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")

    @property
    def kinds(self) -> tuple[str, ...]:
        """Each layer's attention kind."""
        return (self.attention,) * self.n_layer if isinstance(self.attention, str) else tuple(self.attention)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden(self) -> int:
        """MLP width: mlp_hidden, or 4 * n_embd when None."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden


@dataclass
class LMOutput:
    """What `TransformerLM.run` returns. `layers`/`offset`/`last_token` form the state after the
    input; `attn_outputs[l]` is layer l's attention output (after o_proj, before the residual),
    `attn_scores[l]` the last position's scores over this input's tokens [B, H, T] (q.k/sqrt(d)
    for softmax, phi(q).phi(k) for linear): filled only when asked for."""

    logits: Optional[Tensor]
    offset: Tensor
    last_token: Tensor
    layers: Optional[list[LayerState]] = None
    attn_outputs: list[Tensor] = field(default_factory=list)
    attn_scores: list[Tensor] = field(default_factory=list)

    def collect(self, mixed: MixerOutput, run: Pass) -> None:
        if run.need_state:
            self.layers.append(mixed.state)
        if run.need_attn:
            self.attn_outputs.append(mixed.y)
            self.attn_scores.append(mixed.scores)


class Block(nn.Module):
    """Pre-norm block:

        x ─┬─ ln_1 ─ attn (mixer; state in, state out) ─ drop ─(+)─┬─ ln_2 ─ mlp ─(+)─ out
           └────────────────────────────────────────────────────┘  └─────────────┘
    """

    def __init__(self, cfg: TransformerConfig, kind: str):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = MIXERS[kind](cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, state: LayerState | None, run: Pass) -> tuple[Tensor, MixerOutput]:
        mixed = self.attn(self.ln_1(x), state, run)
        x = x + self.drop(mixed.y)
        return x + self.mlp(self.ln_2(x)), mixed


class TransformerLM(nn.Module):
    """GPT-style LM: token (+ learned position) embeddings, n_layer blocks, final norm, head."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.kinds)
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.context: Optional[BakedContext] = None
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_hf(cls, path) -> "TransformerLM":
        """A local Hugging Face directory (config.json + safetensors or pytorch_model.bin) of
        model_type "gpt2" or "llama" as a softmax TransformerLM; see `lit_icl.hf`. No download."""
        from lit_icl.hf import from_hf

        return from_hf(path)

    @classmethod
    def from_hf_gpt2(cls, path) -> "TransformerLM":
        """`from_hf` for a GPT-2 directory only (ValueError for any other model_type)."""
        from lit_icl.hf import from_hf_gpt2

        return from_hf_gpt2(path)

    @property
    def mixers(self) -> list[nn.Module]:
        """Each block's attention mixer (`lit_icl.mixers.Mixer`)."""
        return [block.attn for block in self.blocks]

    @property
    def modes(self) -> tuple[str, ...]:
        """The conversion modes of this model; the first is exact (the default). A stack of one
        kind has its mixer's modes; a hybrid has "exact" (each layer's exact state) and every
        layer's other modes, which apply to the layers that have them (the others stay exact)."""
        per_layer = [mixer.modes for mixer in self.mixers]
        if all(modes == per_layer[0] for modes in per_layer):
            return per_layer[0]
        return ("exact", *dict.fromkeys(mode for modes in per_layer for mode in modes[1:]))

    def check_mode(self, mode: str) -> None:
        """ValueError unless `mode` is one of `modes`."""
        if mode not in self.modes:
            kinds = "/".join(dict.fromkeys(self.config.kinds))
            raise ValueError(f"mode={mode!r} is not available for {kinds} attention; allowed: {list(self.modes)}")

    def forward(
        self, input_ids: Tensor, state=None, attention_mask: Tensor | None = None, check: bool = True
    ) -> Tensor:
        """Logits [B, T, vocab]. With `state`, the input continues after the state's tokens.
        check=False skips the data-dependent input checks (needed under torch.func.vmap)."""
        return self.run(input_ids, state, attention_mask, check=check).logits

    def run(
        self,
        input_ids: Tensor,
        state=None,
        attention_mask: Tensor | None = None,
        *,
        need_state: bool = False,
        need_attn: bool = False,
        check: bool = True,
        logits_at: str = "all",
    ) -> LMOutput:
        """Forward pass that can also return the new state (need_state) and per-layer attention
        outputs and scores (need_attn). logits_at: "all" positions [B, T, V], the "last" one
        [B, 1, V], or "none" (None; the output head is the costliest layer of a small model,
        and conversion needs no logits)."""
        self._check_input(input_ids, attention_mask, logits_at, check)
        B, T = input_ids.shape
        layers, offset, last_token = self._prior(state, B, input_ids.device)
        mask = None if attention_mask is None else attention_mask.bool()
        positions, new_offset = self._positions(mask, offset, T, exact=check and (layers is not None or mask is not None))
        previous, new_last = shift_tokens(input_ids, mask, last_token)
        x = self.drop(self._embed(input_ids, previous, positions))
        run = Pass(positions, mask, need_state, need_attn)
        out = LMOutput(None, new_offset, new_last, layers=[] if need_state else None)
        for i, block in enumerate(self.blocks):
            x, mixed = block(x, None if layers is None else layers[i], run)
            out.collect(mixed, run)
        if logits_at != "none":
            out.logits = self.lm_head(self.ln_f(x[:, -1:] if logits_at == "last" else x))
        return out

    def _check_input(self, input_ids: Tensor, attention_mask: Tensor | None, logits_at: str, check: bool) -> None:
        if logits_at not in LOGITS_AT:
            raise ValueError(f"logits_at={logits_at!r}; allowed: {', '.join(map(repr, LOGITS_AT))}")
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a [B, T] long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if check and input_ids.device.type == "cpu" and input_ids.numel():  # CUDA asserts itself
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )

    def _positions(self, mask: Tensor | None, offset: Tensor, T: int, exact: bool) -> tuple[Tensor, Tensor]:
        """Each token's position [B, T] (its row's offset + the real tokens before it) and each
        row's offset after the input; ValueError past block_size (exact: by the longest row,
        a device sync; otherwise by T)."""
        B = offset.shape[0]
        if mask is not None:
            seen = torch.cumsum(mask.long(), dim=1)  # real tokens up to and including t
        else:
            seen = torch.arange(1, T + 1, device=offset.device).expand(B, T)
        positions = offset[:, None] + (seen - 1).clamp(min=0)
        new_offset = offset + (seen[:, -1] if T else 0)
        longest = (int(new_offset.max()) if B else 0) if exact else T
        if longest > self.config.block_size:
            raise ValueError(f"context + input is {longest} tokens, more than block_size={self.config.block_size}")
        return positions, new_offset

    def _embed(self, input_ids: Tensor, previous: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings (+ the previous token's under token shift, + learned positions)."""
        x = self.wte(input_ids)
        if self.config.token_shift:
            x = x + self.wte(previous.clamp(min=0)) * (previous >= 0)[..., None].to(x.dtype)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        return x

    def _prior(self, state, B: int, device):
        """The carried per-layer states, offsets and last tokens, broadcast to batch B (a batch-1
        state serves every row). Without a state, a baked context (see `lit_icl.context.bake`)."""
        if state is None and self.context is not None:
            state = self.context
        if state is None:
            none = torch.full((B,), -1, dtype=torch.long, device=device)
            return None, torch.zeros(B, dtype=torch.long, device=device), none
        layers, offset, last_token = state.layers, state.offset, state.last_token
        if len(layers) != self.config.n_layer:
            raise ValueError(f"state has {len(layers)} layers, the model has {self.config.n_layer}")
        if offset.shape[0] not in (1, B):
            raise ValueError(f"state batch size {offset.shape[0]} does not match input batch {B}")
        if offset.shape[0] == 1 and B > 1:
            layers = [layer.expand(B) for layer in layers]
            offset, last_token = offset.expand(B), last_token.expand(B)
        return layers, offset, last_token

    def install_context(self, state) -> None:
        """Carry `state` (layers, offset, last_token) as buffers, used whenever forward gets
        no state."""
        self.context = BakedContext(state.layers, state.offset, state.last_token)


class BakedContext(nn.Module):
    """Per-layer context state held as buffers "l{i}_{name}" (so .to(), state_dict() and copies
    carry it); `layers` rebuilds the typed states from them."""

    def __init__(self, layers: list[LayerState], offset: Tensor, last_token: Tensor):
        super().__init__()
        self.skeletons = [layer.map(lambda t: None) for layer in layers]  # the state types, no tensors
        for i, layer in enumerate(layers):
            for name, t in layer.tensors().items():
                self.register_buffer(f"l{i}_{name}", t.detach().clone())
        self.register_buffer("offset_", offset.detach().clone())
        self.register_buffer("last_token_", last_token.detach().clone())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str, model: TransformerLM) -> "BakedContext":
        """Rebuild the buffers saved under `prefix` (e.g. "model.context.") in a state dict; each
        layer's mode is the one of `model`'s mixer whose state has those tensor names."""
        entries = {k[len(prefix):]: t for k, t in state_dict.items() if k.startswith(prefix)}
        per_layer: list[dict[str, Tensor]] = [{} for _ in model.blocks]
        for key, t in entries.items():
            if match := re.fullmatch(r"l(\d+)_(\w+)", key):
                per_layer[int(match[1])][match[2]] = t
        layers = [mixer.state_from_tensors(named, mixer.mode_of(named)) for mixer, named in zip(model.mixers, per_layer)]
        return cls(layers, entries["offset_"], entries["last_token_"])

    @property
    def layers(self) -> list[LayerState]:
        buffers = dict(self.named_buffers())
        return [skeleton.with_tensors({n.split("_", 1)[1]: t for n, t in buffers.items() if n.startswith(f"l{i}_")})
                for i, skeleton in enumerate(self.skeletons)]

    @property
    def offset(self) -> Tensor:
        return self.offset_

    @property
    def last_token(self) -> Tensor:
        return self.last_token_


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """Put `module` in eval mode for the block, then restore each submodule's own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
