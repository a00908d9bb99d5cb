"""TransformerConfig: the hyperparameters of a `lit_icl.model.TransformerLM`, validated.

A plain dataclass with short names (nanoGPT's `GPTConfig`, litgpt's `Config`); it imports nothing
of the model at module level, so anything can import it. Its checks look the registries up when a
config is built: the attention kinds (`lit_icl.mixers.MIXERS`), feature maps (`lit_icl.ops`),
norms, MLPs and activations (`lit_icl.layers`). Every invalid value raises ValueError naming the
field and what is allowed. It is also importable as `lit_icl.model.TransformerConfig`, the path
that saved checkpoints and users' YAML files name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

POSITIONS = ("learned", "rope", "none")


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
    chunk_size: int = 32  # chunk length C of every chunked op (lit_icl.ops.chunking.CHUNK_SIZE: bench.py sweep)
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
        from lit_icl.layers import ACTIVATIONS, MLPS, NORMS  # the registries, looked up when validating
        from lit_icl.mixers import MIXERS
        from lit_icl.ops import FEATURE_MAPS

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
