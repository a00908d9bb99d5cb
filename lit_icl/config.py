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
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" (Zhang & Sennrich 2019; Llama) | "rmsnorm_1p" (RMSNorm
    # scaled by 1 + w, w starting at 0: Gemma)
    norm_eps: float = 1e-5  # epsilon of every norm (Llama: the checkpoint's rms_norm_eps)
    mlp: str = "gelu"  # "gelu": Linear-GELU-Linear | "swiglu": down(silu(gate x) * up x) (Llama) | "geglu":
    # down(gelu(gate x) * up x), GELU as `activation` says (Shazeer 2020; Gemma: gelu_tanh)
    mlp_hidden: Optional[int] = None  # MLP width (Llama: intermediate_size); None = 4 * n_embd
    n_kv_head: Optional[int] = None  # key/value heads of softmax attention (grouped-query
    # attention, Ainslie et al. 2023): each serves n_head / n_kv_head query heads; None = n_head
    rope_theta: float = 10000.0  # RoPE base of position="rope" (Llama: the checkpoint's rope_theta)
    qk_norm: Optional[str] = None  # recurrent kinds' q and k: "l2" (SiLU, then L2-normalised per head, as in
    # DeltaNet, Yang et al. 2024) | "none" (raw); softmax kinds': "rmsnorm" (a learned norm of `norm`'s kind
    # over each head's q and k before RoPE: Gemma 3, Qwen3) | "none"; None = each kind's own ("l2" for deltanet)
    head_size: Optional[int] = None  # size of each attention head (Gemma 3 270M: 256 at width 640 with 4 heads);
    # None = n_embd // n_head. Any other value needs softmax kinds only (their projections map n_embd <-> n_head * it)
    qkv_bias: Optional[bool] = None  # biases of the query/key/value projections (Qwen2: True with bias=False);
    # None = `bias`, which sets every other bias (the output projection, the MLP, LayerNorm)
    post_norm: bool = False  # also norm the attention and MLP outputs before each residual add: a block's four
    # norms of Gemma 2/3 (input, post-attention, pre- and post-feedforward)
    scale_embedding: bool = False  # multiply the token embeddings by sqrt(n_embd) (Gemma)
    attn_scale: Optional[float] = None  # factor of q.k in softmax kinds' scores; None = 1 / sqrt(head size)
    # (Gemma 3: query_pre_attn_scalar ** -0.5)
    window: Optional[int] = None  # attention="sliding": each query sees the keys of the last `window` positions,
    # itself included (Beltagy et al. 2020, Longformer; Mistral; Gemma 3's local layers); None = no limit
    rope_local_theta: Optional[float] = None  # RoPE base of "sliding" layers (Gemma 3: rope_local_base_freq);
    # None = rope_theta

    def __post_init__(self):
        from lit_icl.layers import ACTIVATIONS, MLPS, NORMS  # the registries, looked up when validating
        from lit_icl.mixers import MIXERS
        from lit_icl.ops import FEATURE_MAPS

        optional = ("mlp_hidden", "n_kv_head", "head_size", "window")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "chunk_size", *optional):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head and self.head_size is None:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or give head_size)"
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
                raise ValueError(f"qk_norm={self.qk_norm!r} applies to the recurrent kinds only (and 'rmsnorm' to the "
                                 f"softmax kinds); attention={self.attention!r}")
            refused = [kind for kind, norms in takes.items() if self.qk_norm not in norms]
            if refused:
                raise ValueError(f"qk_norm={self.qk_norm!r} is not available for {refused[0]} attention; allowed: "
                                 f"{list(takes[refused[0]]) if self.qk_norm in allowed else allowed}")
        if self.head_size not in (None, self.n_embd // self.n_head) and not set(self.kinds) <= set(grouped):
            raise ValueError(f"head_size={self.head_size} (other than n_embd // n_head) needs attention in {grouped}")
        if self.window is not None and "sliding" not in self.kinds:
            raise ValueError(f"window={self.window} applies to attention='sliding' layers only; attention={self.attention!r}")
        for name in ("qkv_bias", "post_norm", "scale_embedding"):
            if not isinstance(getattr(self, name), bool) and not (name == "qkv_bias" and self.qkv_bias is None):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False"
                                 f"{' (or None: as bias)' if name == 'qkv_bias' else ''}")
        for name in ("attn_scale", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number or None")
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
        """Size of each attention head: head_size, or n_embd // n_head when None."""
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    @property
    def qkv_biased(self) -> bool:
        """Whether the query/key/value projections have biases: qkv_bias, or bias when None."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hidden(self) -> int:
        """MLP width: mlp_hidden, or 4 * n_embd when None."""
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden
