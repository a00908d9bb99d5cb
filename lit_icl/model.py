"""A decoder-only transformer LM with linear, momentum or softmax attention, and state.

TransformerConfig holds the hyperparameters; TransformerLM is a plain nn.Module (no Lightning).
Every attention layer can start from a carried state (the demonstrations' bias terms, BRIEF §2)
and hand back its state at the end, which is all that exact conversion needs:

    out = model.run(demo_ids, need_state=True)           # one pass over the demonstrations
    model(query_ids, state=out)                          # == model(cat(demo, query))[:, M:]

A state is any object with `layers` (one dict of tensors per layer), `offset` ([B] long, the
number of tokens already seen per row) and `last_token` ([B] long, the last token seen, -1 for
none; token shift reads it); `lit_icl.context.ContextState` is the public one.
Per-layer keys: "S", "z" (linear attention: b_KV [B, H, F, D], b_D [B, H, F]); "m" (momentum
accumulator [B, H_kv, D]); "k", "v", "kv_mask" (softmax KV prefix [B, H_kv, P, D], [B, P]), where
H_kv = n_kv_head key/value heads (grouped-query attention), each shared by n_head / n_kv_head
query heads.

The same model holds GPT-2 (LayerNorm, GELU MLP, learned positions) and the Llama family
(RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases); `lit_icl.hf`
loads either from a local Hugging Face directory.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from lit_icl.layers import ACTIVATIONS, MLPS, NORMS, RESIDUAL_PROJECTIONS, make_mlp, make_norm
from lit_icl.ops import (
    FEATURE_MAPS,
    feature_map,
    linear_attention_chunked,
    momentum_chunked,
    positive_random_features,
    repeat_kv,
    rope,
    softmax_attention,
    softmax_attention_biased,
    taylor,
)

ATTENTIONS = ("linear", "softmax")
POSITIONS = ("learned", "rope", "none")
EPS = 1e-6  # guards the linear-attention normaliser phi(q).z against 0 (relu features)


@dataclass
class TransformerConfig:
    """Model hyperparameters; invalid values raise ValueError naming the field."""

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    attention: str = "linear"  # "linear" | "softmax"
    feature_map: str = "elu"  # linear attention's phi: "elu" | "relu" | "taylor"
    momentum: float = 0.0  # eta of momentum attention (BRIEF §3); 0 = off
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
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r}; allowed: {list(ATTENTIONS)}")
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
        if self.kv_heads != self.n_head and self.attention != "softmax":
            raise ValueError(f"n_kv_head={self.n_kv_head} (grouped-query attention) needs attention='softmax'")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}; allowed: {list(NORMS)}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp={self.mlp!r}; allowed: {list(MLPS)}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")

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
    """What `TransformerLM.run` returns. `layers`/`offset` form the state after the input;
    `attn_outputs[l]` is layer l's attention output (after o_proj, before the residual),
    `attn_scores[l]` the last position's scores over this input's tokens [B, H, T]
    (q.k/sqrt(d) for softmax, phi(q).phi(k) for linear) — filled only when asked for."""

    logits: Optional[Tensor]
    offset: Tensor
    last_token: Tensor
    layers: Optional[list[dict[str, Tensor]]] = None
    attn_outputs: list[Tensor] = field(default_factory=list)
    attn_scores: list[Tensor] = field(default_factory=list)


class Attention(nn.Module):
    """Multi-head causal attention; linear or softmax, optional momentum, state in and out.
    Softmax attention may have fewer key/value heads than query heads (grouped-query): k, v
    and every state keep n_kv_head heads, repeated for the query heads only inside the op."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        kv = cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.phi = feature_map(cfg.feature_map)

    def forward(self, x, positions, mask, state, need_state, need_attn):
        cfg, (B, T, C) = self.cfg, x.shape
        q = self.q_proj(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k, v = (p(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        if cfg.position == "rope":
            q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        state = state or {}
        new: dict[str, Tensor] = {}
        if cfg.attention == "linear":
            q, k = self.phi(q), self.phi(k)
            if mask is not None:  # padding keys contribute nothing to S and z
                k = k * mask[:, None, :, None].to(k.dtype)
            prior = (state["S"], state["z"]) if "S" in state else None
            o, (new["S"], new["z"]) = linear_attention_chunked(q, k, v, prior, cfg.chunk_size, EPS)
            score_scale = 1.0
        else:
            prefix = (state.get("k"), state.get("v"), state.get("kv_mask"))
            if "S" in state:  # approximate context (ICLAA): feature-map sums of the context keys
                W = state.get("W")
                fq = approximate_features(q, None if W is None else repeat_kv(W, cfg.n_head))
                o = softmax_attention_biased(q, k, v, fq, state["S"], state["z"], mask, *prefix)
            else:
                o = softmax_attention(q, k, v, *prefix, mask)
            if need_state:
                new.update({n: state[n] for n in ("S", "z", "W") if n in state})
                if "S" in state and "k" not in state:  # convert: fold the tokens into the sums
                    fk = approximate_features(k, state.get("W"))
                    if mask is not None:
                        fk = fk * mask[:, None, :, None].to(fk.dtype)
                    new["S"] = state["S"] + fk.transpose(-1, -2) @ v
                    new["z"] = state["z"] + fk.sum(dim=2)
                else:  # exact KV prefix, or the KV cache of decoding after an approximate context
                    real = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask
                    new["k"], new["v"], new["kv_mask"] = (
                        torch.cat([state[n], t], dim=d) if n in state else t
                        for n, t, d in (("k", k, 2), ("v", v, 2), ("kv_mask", real, 1))
                    )
            score_scale = 1.0 / math.sqrt(cfg.head_dim)
        if cfg.momentum > 0:
            mo, new["m"] = momentum_chunked(v, cfg.momentum, state.get("m"), mask, cfg.chunk_size)
            o = o + repeat_kv(mo, cfg.n_head)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, C))
        scores = None
        if need_attn:
            scores = (q[:, :, -1:] @ repeat_kv(k, cfg.n_head).transpose(-1, -2))[:, :, 0] * score_scale
        return y, (new if need_state else None), scores


class Block(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, positions, mask, state, need_state, need_attn):
        a, new_state, scores = self.attn(self.ln_1(x), positions, mask, state, need_state, need_attn)
        x = x + self.drop(a)
        return x + self.mlp(self.ln_2(x)), new_state, a, scores


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
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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
        need_state: bool = False,
        need_attn: bool = False,
        check: bool = True,
        logits_at: str = "all",
    ) -> LMOutput:
        """Forward pass that can also return the new state and per-layer attention outputs.
        logits_at: "all" positions [B, T, V], the "last" one [B, 1, V], or "none" (None; the
        output head is the costliest layer of a small model, and conversion needs no logits)."""
        if logits_at not in ("all", "last", "none"):
            raise ValueError(f"logits_at={logits_at!r}; allowed: 'all', 'last', 'none'")
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a [B, T] long tensor, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if check and input_ids.device.type == "cpu" and input_ids.numel():  # CUDA asserts itself
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{lo}, {hi}]")
        B, T = input_ids.shape
        layers, offset, last_token = self._prior(state, B, input_ids.device)
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, T)}"
                )
            mask = attention_mask.bool()
        if mask is not None:
            seen = torch.cumsum(mask.long(), dim=1)  # real tokens up to and including t
        else:
            seen = torch.arange(1, T + 1, device=input_ids.device).expand(B, T)
        positions = offset[:, None] + (seen - 1).clamp(min=0)
        new_offset = offset + (seen[:, -1] if T else 0)
        if layers is None and mask is None or not check:
            longest = T
        else:
            longest = int(new_offset.max()) if B else 0
        if longest > cfg.block_size:
            raise ValueError(
                f"context + input is {longest} tokens, more than block_size={cfg.block_size}"
            )
        previous, new_last = shift_tokens(input_ids, mask, last_token)
        x = self.wte(input_ids)
        if cfg.token_shift:
            x = x + self.wte(previous.clamp(min=0)) * (previous >= 0)[..., None].to(x.dtype)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        x = self.drop(x)
        out = LMOutput(logits=x, offset=new_offset, last_token=new_last, layers=[] if need_state else None)
        for i, block in enumerate(self.blocks):
            prior = layers[i] if layers is not None else None
            x, new_state, a, scores = block(x, positions, mask, prior, need_state, need_attn)
            if need_state:
                out.layers.append(new_state)
            if need_attn:
                out.attn_outputs.append(a)
                out.attn_scores.append(scores)
        if logits_at != "none":
            out.logits = self.lm_head(self.ln_f(x[:, -1:] if logits_at == "last" else x))
        else:
            out.logits = None
        return out

    def _prior(self, state, B: int, device):
        """The carried per-layer state, offsets and last tokens, broadcast to batch B (a batch-1
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
            layers = [{n: t.expand(B, *t.shape[1:]) for n, t in layer.items()} for layer in layers]
            offset, last_token = offset.expand(B), last_token.expand(B)
        return layers, offset, last_token

    def install_context(self, state) -> None:
        """Carry `state` (layers, offset, last_token) as buffers, used whenever forward gets
        no state."""
        self.context = BakedContext(state.layers, state.offset, state.last_token)


class BakedContext(nn.Module):
    """Per-layer context state held as buffers (so .to(), state_dict() and copies carry it)."""

    def __init__(self, layers: list[dict[str, Tensor]], offset: Tensor, last_token: Tensor):
        super().__init__()
        self.names = [list(layer) for layer in layers]
        for i, layer in enumerate(layers):
            for name, t in layer.items():
                self.register_buffer(f"l{i}_{name}", t.detach().clone())
        self.register_buffer("offset_", offset.detach().clone())
        self.register_buffer("last_token_", last_token.detach().clone())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str) -> "BakedContext":
        """Rebuild the buffers saved under `prefix` (e.g. "model.context.") in a state dict."""
        entries = {k[len(prefix):]: t for k, t in state_dict.items() if k.startswith(prefix)}
        per_layer = [(re.fullmatch(r"l(\d+)_(\w+)", k), t) for k, t in entries.items()]
        layers: list[dict[str, Tensor]] = [{} for _ in range(1 + max(int(m[1]) for m, _ in per_layer if m))]
        for match, t in per_layer:
            if match:
                layers[int(match[1])][match[2]] = t
        return cls(layers, entries["offset_"], entries["last_token_"])

    @property
    def layers(self) -> list[dict[str, Tensor]]:
        return [{n: getattr(self, f"l{i}_{n}") for n in names} for i, names in enumerate(self.names)]

    @property
    def offset(self) -> Tensor:
        return self.offset_

    @property
    def last_token(self) -> Tensor:
        return self.last_token_


def approximate_features(x: Tensor, W: Tensor | None) -> Tensor:
    """phi of approximate conversion for softmax attention: positive random features with
    projection W [B, H, m, d], or (W None) the second-order Taylor map 1 + s + s^2/2 of exp(s)."""
    return taylor(x) if W is None else positive_random_features(x, W)


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
