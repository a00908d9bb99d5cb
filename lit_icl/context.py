"""Exact conversion of in-context learning into attention bias terms (BRIEF §2, ICLCA).

Prepending demonstrations X' to an input changes, in every linear-attention layer, only the
sums S and z. One no-grad forward pass over X' therefore yields, for all layers at once
(the paper's Algorithm 1), the bias terms

    b_KV = sum_j phi(k'_j) v'_j^T,   b_D = sum_j phi(k'_j)

and the layer computes o_t = phi(q_t)^T (b_KV + S_t) / (phi(q_t)^T (b_D + z_t) + eps).
Momentum attention carries its EMA accumulator the same way (BRIEF §3); softmax attention
keeps the context's keys and values (mode "kv", the exact but non-constant-size prefix).

    state = convert(model, demo_ids)             # ContextState
    model(query_ids, state=state)                # == model(cat(demo, query))[:, M:]
    convert(model, more_ids, state=state)        # == convert(model, cat(demo, more))
    baked = bake(model, state)                   # baked(query_ids) == the same logits
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_icl.model import TransformerLM

FORMAT = "lit_icl.ContextState/1"
MODES = {"linear": ("exact",), "softmax": ("kv",)}
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "attention", "feature_map", "momentum", "position", "token_shift")


@dataclass
class ContextState:
    """Per-layer context state of a batch of demonstration sets, plus each row's offset.

    layers[l] maps names to tensors with the batch first: "S" (b_KV [B, H, F, D]) and "z"
    (b_D [B, H, F]) for linear attention, "k", "v" [B, H, M, D] and "kv_mask" [B, M] for a
    softmax KV prefix, "m" [B, H, D] for momentum. offset [B] counts each row's real tokens:
    the converted model continues positions there. last_token [B] is each row's last token
    (-1 for none), the input of token shift. mode is "exact" or "kv".
    """

    layers: list[dict[str, Tensor]]
    offset: Tensor
    last_token: Tensor
    mode: str = "exact"

    @property
    def batch_size(self) -> int:
        return int(self.offset.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ContextState":
        """Moved to `device`; floating tensors cast to `dtype` (offsets and masks keep theirs)."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        layers = [{n: move(t) for n, t in layer.items()} for layer in self.layers]
        return ContextState(layers, move(self.offset), move(self.last_token), self.mode)

    def select(self, rows) -> "ContextState":
        """The state of some rows (an index, slice, list or bool mask), batch kept."""
        if isinstance(rows, int):
            rows = [rows]
        layers = [{n: t[rows] for n, t in layer.items()} for layer in self.layers]
        return ContextState(layers, self.offset[rows], self.last_token[rows], self.mode)

    def save(self, path: str | os.PathLike, model: TransformerLM | None = None) -> None:
        """Write a safetensors file atomically (temp file + rename): never a partial file.
        With `model`, its architecture and weight fingerprint go into the metadata."""
        tensors = {f"layers.{i}.{n}": t.contiguous() for i, layer in enumerate(self.layers) for n, t in layer.items()}
        tensors["offset"] = self.offset.contiguous()
        tensors["last_token"] = self.last_token.contiguous()
        meta = {"format": FORMAT, "mode": self.mode, "n_layer": str(len(self.layers))}
        if model is not None:
            meta["arch"] = json.dumps({f: getattr(model.config, f) for f in ARCH_FIELDS})
            meta["fingerprint"] = fingerprint(model)
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, model: TransformerLM, strict: bool = True) -> "ContextState":
        """Read a state saved by `save` and check it fits `model`: layers, heads, sizes and
        attention kind; with strict=True also the weight fingerprint when one was saved."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path} is not a readable safetensors context file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a lit_icl context file (format={meta.get('format')!r})")
        if "arch" in meta:
            saved = json.loads(meta["arch"])
            diff = {f: (saved.get(f), getattr(model.config, f)) for f in ARCH_FIELDS if saved.get(f) != getattr(model.config, f)}
            if diff:
                detail = ", ".join(f"{f}: state {a!r} vs model {b!r}" for f, (a, b) in diff.items())
                raise ValueError(f"{path} was made for another model ({detail})")
        if strict and "fingerprint" in meta and meta["fingerprint"] != fingerprint(model):
            raise ValueError(
                f"{path} was made with different weights than this model (fingerprint mismatch); "
                "pass strict=False to load it anyway"
            )
        n_layer = int(meta.get("n_layer", -1))
        layers = [
            {k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"layers.{i}.")}
            for i in range(max(n_layer, 0))
        ]
        if "offset" not in tensors or "last_token" not in tensors:
            raise ValueError(f"{path} lacks the offset/last_token tensors of a context file")
        state = cls(layers, tensors["offset"], tensors["last_token"], meta.get("mode", "exact"))
        check_compatible(state, model)
        return state


def fingerprint(model: TransformerLM) -> str:
    """sha256 over the model's parameter names and values (its baked context excluded)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_compatible(state: ContextState, model: TransformerLM) -> None:
    """ValueError naming the first mismatch between `state` and what `model` carries."""
    cfg = model.config
    allowed = MODES[cfg.attention]
    if state.mode not in allowed:
        raise ValueError(f"state mode {state.mode!r} does not fit {cfg.attention} attention (allowed: {allowed})")
    if len(state.layers) != cfg.n_layer:
        raise ValueError(f"state has {len(state.layers)} layers, the model has {cfg.n_layer}")
    expected = model.state_shapes()
    B = state.batch_size
    for i, layer in enumerate(state.layers):
        if set(layer) != set(expected):
            raise ValueError(f"layer {i} state holds {sorted(layer)}, the model needs {sorted(expected)}")
        for name, shape in expected.items():
            got = tuple(layer[name].shape)
            if len(got) != len(shape) + 1 or got[0] != B or any(
                s is not None and g != s for g, s in zip(got[1:], shape)
            ):
                raise ValueError(f"layer {i} state {name!r} has shape {got}, the model needs [B={B}, {shape}]")


@torch.no_grad()
def convert(
    model: TransformerLM,
    demo_ids: Tensor,
    attention_mask: Tensor | None = None,
    state: ContextState | None = None,
    mode: str | None = None,
) -> ContextState:
    """ICLCA, Algorithm 1: one no-grad forward pass over the demonstrations [B, M] gives every
    layer's bias terms (b_KV, b_D), momentum accumulator or KV prefix, and each row's offset.

    attention_mask [B, M] (1 = token) lets rows of different lengths, padded on either side,
    convert exactly. With `state`, the demonstrations continue it (incremental conversion).
    mode: "exact" for linear attention (the only mode), "kv" for softmax (exact KV prefix).
    Put the model in eval mode first if it has dropout.
    """
    if not isinstance(model, TransformerLM):
        raise TypeError(f"model must be a TransformerLM, got {type(model).__name__}")
    allowed = MODES[model.config.attention]
    mode = allowed[0] if mode is None else mode
    if mode not in allowed:
        raise ValueError(f"mode={mode!r} is not available for {model.config.attention} attention; allowed: {list(allowed)}")
    if state is not None:
        if state.mode != mode:
            raise ValueError(f"cannot continue a {state.mode!r} state in mode {mode!r}")
        check_compatible(state, model)
    out = model.run(demo_ids, state=state, attention_mask=attention_mask, need_state=True)
    return ContextState(out.layers, out.offset, out.last_token, mode)


def bake(model: TransformerLM, state: ContextState) -> TransformerLM:
    """A copy of `model` whose forward carries the biases as buffers: baked(query) equals the
    prompted model's logits on the query, with no state argument. The model is untouched."""
    check_compatible(state, model)
    baked = copy.deepcopy(model)
    baked.install_context(state)
    return baked
