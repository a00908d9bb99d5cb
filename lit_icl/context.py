"""Exact conversion of in-context learning into attention state (Chen, Hu, Jin, Lee, Kawaguchi
2024, "Exact Conversion of In-Context Learning to Model Weights in Linearized-Attention
Transformers", ICML, arXiv 2406.02847; ICLCA).

Prepending demonstrations X' to an input changes, in every linear-attention layer, only the
sums S and z. One no-grad forward pass over X' therefore yields, for all layers at once
(the paper's Algorithm 1), the bias terms

    b_KV = sum_j phi(k'_j) v'_j^T,   b_D = sum_j phi(k'_j)

and the layer computes o_t = phi(q_t)^T (b_KV + S_t) / (phi(q_t)^T (b_D + z_t) + eps).
Every other mixer carries its own state the same way (momentum's EMA accumulator, Dai et al.
2023; softmax attention's KV prefix, or ICLAA's approximate sums): this module only asks each
layer's mixer (`lit_icl.mixers`) for its modes, its empty state and its state's shapes.

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
from dataclasses import dataclass
from importlib.metadata import version

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_icl.files import atomic_path
from lit_icl.mixers import LayerState
from lit_icl.model import TransformerLM

FORMAT = "lit_icl.ContextState/1"
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "attention", "feature_map", "momentum", "position", "token_shift",
               "n_kv_head", "rope_theta", "qk_norm", "head_size", "window", "rope_local_theta")


@dataclass
class ContextState:
    """Per-layer context state of a batch of demonstration sets, plus each row's offset.

    layers[l] is block l's `LayerState`: its mixer's typed state (e.g. `LinearState(S, z)`,
    `KVPrefix(k, v, kv_mask)`, `FeatureSums(S, z, W)`), plus `MomentumState(m)` with momentum;
    tensors have the batch first and n_kv_head key/value heads. offset [B] counts each row's
    real tokens: the converted model continues positions there. last_token [B] is each row's
    last token (-1 for none), the input of token shift. mode is a conversion mode of the
    model's mixer ("exact" for linear attention; "kv", "prf", "taylor" for softmax).
    """

    layers: list[LayerState]
    offset: Tensor
    last_token: Tensor
    mode: str = "exact"

    @property
    def batch_size(self) -> int:
        return int(self.offset.shape[0])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ContextState":
        """Moved to `device`; floating tensors cast to `dtype` (offsets and masks keep theirs)."""
        layers = [layer.to(device, dtype) for layer in self.layers]
        return ContextState(layers, self.offset.to(device), self.last_token.to(device), self.mode)

    def select(self, rows) -> "ContextState":
        """The state of some rows (an index, slice, list or bool mask), batch kept."""
        if isinstance(rows, int):
            rows = [rows]
        layers = [layer.select(rows) for layer in self.layers]
        return ContextState(layers, self.offset[rows], self.last_token[rows], self.mode)

    def decoding(self) -> "ContextState":
        """The state to decode from: each layer's `decoding()` (ICLAA caches the tokens after
        an approximate context exactly; every other state is itself)."""
        layers = [layer.decoding() for layer in self.layers]
        return ContextState(layers, self.offset, self.last_token, self.mode)

    @classmethod
    def empty(cls, model: TransformerLM, batch: int, mode: str | None = None, device=None,
              num_features: int = 256, seed: int = 0) -> "ContextState":
        """The state before any token in `mode` (default: the model's exact mode), what
        `convert` starts from. Random parts (ICLAA's random features, `num_features` of them)
        are drawn from one generator seeded with `seed`, layer after layer."""
        mode = model.modes[0] if mode is None else mode
        model.check_mode(mode)
        dtype = next(model.parameters()).dtype
        generator = torch.Generator().manual_seed(seed)
        layers = [mixer.empty_state(batch, mode, device, dtype, num_features=num_features, generator=generator)
                  for mixer in model.mixers]
        none = torch.full((batch,), -1, dtype=torch.long, device=device)
        return cls(layers, torch.zeros(batch, dtype=torch.long, device=device), none, mode)

    def save(self, path: str | os.PathLike, model: TransformerLM | None = None) -> None:
        """Write a safetensors file atomically (temp file + rename): never a partial file.
        With `model`, its architecture and weight fingerprint go into the metadata."""
        named = [(f"layers.{i}.{n}", t) for i, layer in enumerate(self.layers) for n, t in layer.tensors().items()]
        named += [("offset", self.offset), ("last_token", self.last_token)]
        tensors, seen = {}, set()
        for name, t in named:  # safetensors refuses shared storage (layers share kv_mask)
            t = t.contiguous()
            tensors[name] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        meta = {"format": FORMAT, "mode": self.mode, "n_layer": str(len(self.layers)),
                "num_tokens": json.dumps(self.offset.tolist()), "lit_icl_version": version("lit_icl")}
        if model is not None:
            meta["arch"] = json.dumps({f: getattr(model.config, f) for f in ARCH_FIELDS})
            meta["fingerprint"] = fingerprint(model)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

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
        if "arch" in meta:  # fields a file predates are not compared
            saved = json.loads(meta["arch"])
            diff = {f: (saved[f], getattr(model.config, f)) for f in ARCH_FIELDS if f in saved and saved[f] != getattr(model.config, f)}
            if diff:
                detail = ", ".join(f"{f}: state {a!r} vs model {b!r}" for f, (a, b) in diff.items())
                raise ValueError(f"{path} was made for another model ({detail})")
        if strict and "fingerprint" in meta and meta["fingerprint"] != fingerprint(model):
            raise ValueError(
                f"{path} was made with different weights than this model (fingerprint mismatch); "
                "pass strict=False to load it anyway"
            )
        if "offset" not in tensors or "last_token" not in tensors:
            raise ValueError(f"{path} lacks the offset/last_token tensors of a context file")
        mode = meta.get("mode", "exact")
        n_layer = int(meta.get("n_layer", -1))
        named = [{k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"layers.{i}.")}
                 for i in range(max(n_layer, 0))]
        check_layers(model, mode, [set(layer) for layer in named])
        layers = [mixer.state_from_tensors(layer, mode) for mixer, layer in zip(model.mixers, named)]
        state = cls(layers, tensors["offset"], tensors["last_token"], mode)
        check_compatible(state, model)
        return state


def fingerprint(model: TransformerLM) -> str:
    """sha256 over the model's parameter names and values (its baked context excluded)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_layers(model: TransformerLM, mode: str, names: list[set[str]]) -> None:
    """ValueError unless `mode` fits the model and each layer holds the tensors it needs."""
    model.check_mode(mode)
    if len(names) != model.config.n_layer:
        raise ValueError(f"state has {len(names)} layers, the model has {model.config.n_layer}")
    for i, (mixer, held) in enumerate(zip(model.mixers, names)):
        expected = mixer.state_shapes(mode)
        if held != set(expected):
            raise ValueError(f"layer {i} state holds {sorted(held)}, the model needs {sorted(expected)}")


def check_compatible(state: ContextState, model: TransformerLM) -> None:
    """ValueError naming the first mismatch between `state` and what `model` carries."""
    check_layers(model, state.mode, [set(layer.tensors()) for layer in state.layers])
    B = state.batch_size
    for i, (mixer, layer) in enumerate(zip(model.mixers, state.layers)):
        tensors = layer.tensors()
        for name, shape in mixer.state_shapes(state.mode).items():
            got = tuple(tensors[name].shape)
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
    num_features: int = 256,
    seed: int = 0,
) -> ContextState:
    """Chen et al. 2024, Algorithm 1: one no-grad forward pass over the demonstrations [B, M] gives every
    layer's bias terms (b_KV, b_D), momentum accumulator or KV prefix, and each row's offset.

    attention_mask [B, M] (1 = token) lets rows of different lengths, padded on either side,
    convert exactly. With `state`, the demonstrations continue it (incremental conversion).
    mode: one of `model.modes`, the first (exact) by default: "exact" for linear attention;
    for softmax attention "kv" (the exact KV prefix), or ICLAA's approximate biases
    b_KV = sum phi(k') v'^T, b_D = sum phi(k') with phi = positive random features ("prf",
    `num_features` of them, drawn from `seed`) or the second-order Taylor map ("taylor") of
    exp(q.k/sqrt d) (`lit_icl.mixers.approximate`).
    Put the model in eval mode first if it has dropout.
    """
    if not isinstance(model, TransformerLM):
        raise TypeError(f"model must be a TransformerLM, got {type(model).__name__}")
    mode = model.modes[0] if mode is None else mode
    model.check_mode(mode)
    if state is None:
        state = ContextState.empty(model, demo_ids.shape[0], mode, demo_ids.device, num_features, seed)
    elif state.mode != mode:
        raise ValueError(f"cannot continue a {state.mode!r} state in mode {mode!r}")
    else:
        check_compatible(state, model)
    out = model.run(demo_ids, state=state, attention_mask=attention_mask, need_state=True, logits_at="none")
    return ContextState(out.layers, out.offset, out.last_token, mode)


def bake(model: TransformerLM, state: ContextState) -> TransformerLM:
    """A copy of `model` whose forward carries the biases as buffers: baked(query) equals the
    prompted model's logits on the query, with no state argument. The model is untouched."""
    check_compatible(state, model)
    baked = copy.deepcopy(model)
    baked.install_context(state)
    return baked
