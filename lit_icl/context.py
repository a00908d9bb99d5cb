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
from dataclasses import dataclass
from importlib.metadata import version

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_icl.files import atomic_path
from lit_icl.model import TransformerConfig, TransformerLM
from lit_icl.ops import feature_dim

FORMAT = "lit_icl.ContextState/1"
MODES = {"linear": ("exact",), "softmax": ("kv", "prf", "taylor")}
APPROXIMATE = ("prf", "taylor")
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "attention", "feature_map", "momentum", "position", "token_shift",
               "n_kv_head", "rope_theta")


@dataclass
class ContextState:
    """Per-layer context state of a batch of demonstration sets, plus each row's offset.

    layers[l] maps names to tensors with the batch first: "S" (b_KV [B, H, F, D]) and "z"
    (b_D [B, H, F]) for linear attention, "k", "v" [B, H, M, D] and "kv_mask" [B, M] for a
    softmax KV prefix, "m" [B, H, D] for momentum; H is the number of key/value heads
    (n_kv_head, fewer than n_head under grouped-query attention). offset [B] counts each row's real tokens:
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
        named = [(f"layers.{i}.{n}", t) for i, layer in enumerate(self.layers) for n, t in layer.items()]
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


def expected_shapes(cfg: TransformerConfig, mode: str) -> dict[str, tuple[int | None, ...]]:
    """Per-layer state tensors of a `mode` state for a model of `cfg`, without the batch
    dimension (None = any length). Heads are key/value heads (n_kv_head)."""
    H, D = cfg.kv_heads, cfg.head_dim
    if mode == "exact":
        F = feature_dim(cfg.feature_map, D)
        shapes: dict[str, tuple[int | None, ...]] = {"S": (H, F, D), "z": (H, F)}
    elif mode == "kv":
        shapes = {"k": (H, None, D), "v": (H, None, D), "kv_mask": (None,)}
    elif mode == "taylor":
        F = feature_dim("taylor", D)
        shapes = {"S": (H, F, D), "z": (H, F)}
    else:  # prf
        shapes = {"S": (H, None, D), "z": (H, None), "W": (H, None, D)}
    if cfg.momentum > 0:
        shapes["m"] = (H, D)
    return shapes


def check_compatible(state: ContextState, model: TransformerLM) -> None:
    """ValueError naming the first mismatch between `state` and what `model` carries."""
    cfg = model.config
    allowed = MODES[cfg.attention]
    if state.mode not in allowed:
        raise ValueError(f"state mode {state.mode!r} does not fit {cfg.attention} attention (allowed: {allowed})")
    if len(state.layers) != cfg.n_layer:
        raise ValueError(f"state has {len(state.layers)} layers, the model has {cfg.n_layer}")
    expected = expected_shapes(cfg, state.mode)
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


def approximate_state(
    model: TransformerLM, batch: int, mode: str, num_features: int = 256, seed: int = 0, device=None
) -> ContextState:
    """An empty ICLAA state (zero sums) for a softmax model: what `convert` continues from in
    mode "prf" (one N(0, I) projection [m, d] per layer and key/value head, from `seed`) or
    "taylor". Under grouped-query attention the query heads of a group share their key head's
    projection, so that phi(q).phi(k) estimates exp(q.k / sqrt d) for every pair."""
    cfg = model.config
    H, D = cfg.kv_heads, cfg.head_dim
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    F = num_features if mode == "prf" else feature_dim("taylor", D)
    layers = []
    for _ in range(cfg.n_layer):
        layer = {"S": torch.zeros(batch, H, F, D, dtype=dtype, device=device),
                 "z": torch.zeros(batch, H, F, dtype=dtype, device=device)}
        if mode == "prf":
            W = torch.randn(H, num_features, D, generator=gen, dtype=torch.float64)
            layer["W"] = W.to(dtype=dtype, device=device).expand(batch, H, num_features, D)
        layers.append(layer)
    none = torch.full((batch,), -1, dtype=torch.long, device=device)
    return ContextState(layers, torch.zeros(batch, dtype=torch.long, device=device), none, mode)


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
    """ICLCA, Algorithm 1: one no-grad forward pass over the demonstrations [B, M] gives every
    layer's bias terms (b_KV, b_D), momentum accumulator or KV prefix, and each row's offset.

    attention_mask [B, M] (1 = token) lets rows of different lengths, padded on either side,
    convert exactly. With `state`, the demonstrations continue it (incremental conversion).
    mode: "exact" for linear attention (the only mode). For softmax attention "kv" (the
    exact KV prefix, default), or ICLAA's approximate biases b_KV = sum phi(k') v'^T,
    b_D = sum phi(k') with phi = positive random features ("prf", `num_features` of them,
    drawn from `seed`) or the second-order Taylor map ("taylor") of exp(q.k/sqrt d).
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
    elif mode in APPROXIMATE:
        if num_features < 1:
            raise ValueError(f"num_features={num_features} must be >= 1")
        state = approximate_state(model, demo_ids.shape[0], mode, num_features, seed, demo_ids.device)
    out = model.run(demo_ids, state=state, attention_mask=attention_mask, need_state=True, logits_at="none")
    return ContextState(out.layers, out.offset, out.last_token, mode)


def bake(model: TransformerLM, state: ContextState) -> TransformerLM:
    """A copy of `model` whose forward carries the biases as buffers: baked(query) equals the
    prompted model's logits on the query, with no state argument. The model is untouched."""
    check_compatible(state, model)
    baked = copy.deepcopy(model)
    baked.install_context(state)
    return baked
