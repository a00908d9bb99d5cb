"""A decoder-only transformer LM whose attention layers carry state (nanoGPT-style, one file).

TransformerConfig holds the hyperparameters; TransformerLM is a plain nn.Module (no Lightning).
Each block's attention is a token mixer that the config names (`lit_icl.mixers`: linear,
softmax, ...). Every mixer can start from a carried state and hand back its state at the end,
which is all that exact conversion of in-context learning needs (Chen et al. 2024, ICML, arXiv
2406.02847, Algorithm 1: one forward pass over the demonstrations yields every layer's state):

    out = model.run(demo_ids, need_state=True)           # one pass over the demonstrations
    model(query_ids, state=out)                          # == model(cat(demo, query))[:, M:]

What `run(state=...)` continues from is declared once, by the `ModelState` protocol: per-layer
states, offsets and last tokens. `LMOutput` (run with need_state), `lit_icl.context.ContextState`
(the public one: files, select, bake) and `BakedContext` (a state held as buffers) provide it.

The same model holds GPT-2 (LayerNorm, GELU MLP, learned positions), the Llama family
(RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases), Qwen2 (Llama with
query/key/value biases) and Gemma 3 (four norms a block, q/k norms, GeGLU, sliding-window layers
interleaved with global ones); `lit_icl.hf` loads them from a local Hugging Face directory.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

from lit_icl.config import TransformerConfig
from lit_icl.hf import read_checkpoint, translate
from lit_icl.layers import RESIDUAL_PROJECTIONS, make_mlp, make_norm, shift_tokens
from lit_icl.loss import chunked_cross_entropy
from lit_icl.mixers import MIXERS, LayerState, MixerOutput, Pass

LOGITS_AT = ("all", "last", "none")


@runtime_checkable
class ModelState(Protocol):
    """A state the model continues from: `layers` (one `lit_icl.mixers.LayerState` per block),
    `offset` ([B] long, the tokens already seen per row) and `last_token` ([B] long, the last
    token seen, -1 for none; token shift reads it). A batch-1 state serves every row."""

    layers: list[LayerState]
    offset: Tensor
    last_token: Tensor


@dataclass
class LMOutput:
    """What `TransformerLM.run` returns. `layers`/`offset`/`last_token` form the state after the
    input; `attn_outputs[l]` is layer l's attention output (after o_proj, before the residual),
    `attn_scores[l]` the last position's scores over this input's tokens [B, H, T] (q.k/sqrt(d)
    for softmax, phi(q).phi(k) for linear): filled only when asked for; `hidden` the final norm's
    output [B, T, D], the head's input (need_hidden)."""

    logits: Optional[Tensor]
    offset: Tensor
    last_token: Tensor
    layers: Optional[list[LayerState]] = None
    attn_outputs: list[Tensor] = field(default_factory=list)
    attn_scores: list[Tensor] = field(default_factory=list)
    hidden: Optional[Tensor] = None

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

    With post_norm (Gemma 2/3) the attention output passes ln_attn_out and the MLP output
    ln_mlp_out before their residual adds."""

    def __init__(self, cfg: TransformerConfig, kind: str):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = MIXERS[kind](cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = make_mlp(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_attn_out = make_norm(cfg) if cfg.post_norm else nn.Identity()
        self.ln_mlp_out = make_norm(cfg) if cfg.post_norm else nn.Identity()

    def forward(self, x: Tensor, state: LayerState | None, run: Pass) -> tuple[Tensor, MixerOutput]:
        mixed = self.attn(self.ln_1(x), state, run)
        x = x + self.drop(self.ln_attn_out(mixed.y))
        return x + self.ln_mlp_out(self.mlp(self.ln_2(x))), mixed


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
        self.init_weights()

    def init_weights(self) -> None:
        """Draw every weight as the constructor does (GPT-2's scheme: normal(0, 0.02) for linear
        layers and embeddings, zero biases, norms reset, residual projections scaled by
        1/sqrt(2 n_layer)). A model built on the meta device calls it after ``to_empty``, on
        its shards under FSDP2 (`LitTransformerLM(meta_init=True)`)."""
        for module in self.modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)) and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()  # norms: ones / zeros, no random draw
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_hf(cls, path) -> "TransformerLM":
        """A local Hugging Face directory (config.json + safetensors or pytorch_model.bin) of
        model_type "gpt2", "llama", "qwen2", "gemma3_text" or "gemma3" as a softmax TransformerLM (float32, eval mode); see
        `lit_icl.hf`. No download."""
        return cls._from_checkpoint(*read_checkpoint(path))

    @classmethod
    def from_hf_gpt2(cls, path) -> "TransformerLM":
        """`from_hf` for a GPT-2 directory only (ValueError for any other model_type)."""
        return cls._from_checkpoint(*read_checkpoint(path, gpt2_only=True))

    @classmethod
    def from_hf_state(cls, config: dict, weights: dict[str, Tensor]) -> "TransformerLM":
        """`from_hf` from a Hugging Face config dict and its state dict already in memory."""
        return cls._from_checkpoint(*translate(config, lambda: weights))

    @classmethod
    def _from_checkpoint(cls, cfg: TransformerConfig, weights: dict[str, Tensor]) -> "TransformerLM":
        with torch.device("meta"):  # no random init of weights that are overwritten next
            model = cls(cfg)
        model.load_state_dict(weights, strict=True, assign=True)
        if cfg.tie_weights:
            model.lm_head.weight = model.wte.weight
        return model.eval()

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
        self, input_ids: Tensor, state: ModelState | None = None, attention_mask: Tensor | None = None,
        check: bool = True, labels: Tensor | None = None, loss_chunk_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits [B, T, vocab]. With `state`, the input continues after the state's tokens.
        check=False skips the data-dependent input checks (needed under torch.func.vmap).

        With `labels` [B, T] (-100 where nothing is scored): (the mean cross-entropy, the argmax
        prediction [B, T]) instead, with the head and the loss computed `loss_chunk_size` rows at
        a time (`lit_icl.loss.chunked_cross_entropy`; None: `lit_icl.loss.chunk_rows`), so the
        [B, T, vocab] logits never exist. Inside forward, so FSDP's hooks and torch.compile cover it."""
        if labels is None:
            return self.run(input_ids, state, attention_mask, check=check).logits
        hidden = self.run(input_ids, state, attention_mask, check=check, logits_at="none", need_hidden=True).hidden
        loss, argmax = chunked_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                             loss_chunk_size, return_argmax=True)
        return loss, argmax.view_as(labels)

    def run(
        self,
        input_ids: Tensor,
        state: ModelState | None = None,
        attention_mask: Tensor | None = None,
        *,
        need_state: bool = False,
        need_attn: bool = False,
        need_hidden: bool = False,
        check: bool = True,
        logits_at: str | int = "all",
        attn_at: int | None = None,
    ) -> LMOutput:
        """Forward pass that can also return the new state (need_state) and per-layer attention
        outputs and scores (need_attn). logits_at: "all" positions [B, T, V], the "last" one
        [B, 1, V], an int n: the last n positions [B, n, V] (a teacher-forced answer), or "none"
        (None; the output head is the costliest layer of a small model, and conversion needs no
        logits). attn_at: the position whose scores need_attn reports, over the keys up to it
        (None: the last; a query followed by its answer reports the query's last token).
        need_hidden: also return the final norm's output at every position (`hidden`)."""
        self._check_input(input_ids, attention_mask, logits_at, check)
        B, T = input_ids.shape
        layers, offset, last_token = self._prior(state, B, input_ids.device)
        mask = None if attention_mask is None else attention_mask.bool()
        positions, new_offset = self._positions(mask, offset, T, exact=check and (layers is not None or mask is not None))
        previous, new_last = shift_tokens(input_ids, mask, last_token)
        x = self.drop(self._embed(input_ids, previous, positions))
        fwd = Pass(positions, mask, need_state, need_attn, attn_at)
        out = LMOutput(None, new_offset, new_last, layers=[] if need_state else None)
        for i, block in enumerate(self.blocks):
            x, mixed = block(x, None if layers is None else layers[i], fwd)
            out.collect(mixed, fwd)
        if need_hidden:
            x = out.hidden = self.ln_f(x)
        if logits_at != "none":
            last = {"all": T, "last": 1}.get(logits_at, logits_at)
            x = x if last == T else x[:, T - last:]
            out.logits = self.lm_head(x if need_hidden else self.ln_f(x))
        return out

    def _check_input(self, input_ids: Tensor, attention_mask: Tensor | None, logits_at: str, check: bool) -> None:
        if logits_at not in LOGITS_AT and not (isinstance(logits_at, int) and 1 <= logits_at <= input_ids.shape[-1]):
            raise ValueError(f"logits_at={logits_at!r}; allowed: {', '.join(map(repr, LOGITS_AT))} or a number of "
                             f"last positions from 1 to the input's {input_ids.shape[-1]}")
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
        if self.config.scale_embedding:  # sqrt(n_embd) rounded to float32, as Gemma's reference does
            x = x * float(torch.tensor(math.sqrt(self.config.n_embd), dtype=torch.float32))
        if self.config.token_shift:
            x = x + self.wte(previous.clamp(min=0)) * (previous >= 0)[..., None].to(x.dtype)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        return x

    def _prior(self, state: ModelState | None, B: int, device):
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

    def install_context(self, state: ModelState) -> None:
        """Carry `state` (layers, offset, last_token) as buffers, used whenever forward gets
        no state."""
        self.context = BakedContext(state.layers, state.offset, state.last_token)


class BakedContext(nn.Module):
    """A `ModelState` held as buffers "l{i}_{name}", "offset" and "last_token" (so .to(),
    state_dict() and copies carry it); `layers` rebuilds the typed states from them."""

    LEGACY = {"offset_": "offset", "last_token_": "last_token"}  # buffer names in checkpoints baked before 2026-12

    def __init__(self, layers: list[LayerState], offset: Tensor, last_token: Tensor):
        super().__init__()
        self.skeletons = [layer.map(lambda t: None) for layer in layers]  # the state types, no tensors
        for i, layer in enumerate(layers):
            for name, t in layer.tensors().items():
                self.register_buffer(f"l{i}_{name}", t.detach().clone())
        self.register_buffer("offset", offset.detach().clone())
        self.register_buffer("last_token", last_token.detach().clone())

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str, model: TransformerLM) -> "BakedContext":
        """Rebuild the buffers saved under `prefix` (e.g. "model.context.") in a state dict; each
        layer's mode is the one of `model`'s mixer whose state has those tensor names."""
        entries = {k[len(prefix):]: t for k, t in state_dict.items() if k.startswith(prefix)}
        entries = {cls.LEGACY.get(k, k): t for k, t in entries.items()}
        per_layer: list[dict[str, Tensor]] = [{} for _ in model.blocks]
        for key, t in entries.items():
            if match := re.fullmatch(r"l(\d+)_(\w+)", key):
                per_layer[int(match[1])][match[2]] = t
        layers = [mixer.state_from_tensors(named, mixer.mode_of(named)) for mixer, named in zip(model.mixers, per_layer)]
        return cls(layers, entries["offset"], entries["last_token"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self.LEGACY.items():  # a checkpoint baked before the buffers were renamed
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def layers(self) -> list[LayerState]:
        buffers = dict(self.named_buffers())
        return [skeleton.with_tensors({n.split("_", 1)[1]: t for n, t in buffers.items() if n.startswith(f"l{i}_")})
                for i, skeleton in enumerate(self.skeletons)]


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
