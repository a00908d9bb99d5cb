"""Hugging Face checkpoints in TransformerLM's terms (no download): `TransformerLM.from_hf(dir)`.

This module translates; it builds no model and imports nothing of it, only the config.
`read_checkpoint(dir)` reads config.json and the weights (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin) and dispatches on `model_type` to a
TransformerConfig and a state dict under TransformerLM's names:

- "gpt2": pre-LayerNorm, learned positions, tanh-GELU MLP, biases everywhere, tied head:
  TransformerLM(position="learned", activation="gelu_tanh"). Its Conv1D layers store weights
  as [in, out] (nn.Linear's transpose), and c_attn fuses the query, key and value projections.
- "llama" (Llama, SmolLM, TinyLlama, ...): RMSNorm, SwiGLU MLP, rotary positions with the
  checkpoint's rope_theta in the rotate-half layout, grouped-query attention, no biases, tied
  or untied head: TransformerLM(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=...).

- "qwen2" (Qwen2, Qwen2.5): Llama with biases on the query/key/value projections (qkv_bias=True,
  bias=False), its own rope_theta.
- "gemma3_text" (and "gemma3", whose text_config is one; its vision tower is ignored): RMSNorm
  scaled by 1 + w (norm="rmsnorm_1p"), four norms a block (post_norm), RMSNorm of each head's q
  and k (qk_norm="rmsnorm"), the embedding times sqrt(width) (scale_embedding), GeGLU MLP with
  tanh GELU, head size 256 whatever the width (head_size), attention scale from
  query_pre_attn_scalar, and per-layer layer_types: "sliding" layers (window = sliding_window,
  RoPE base rope_local_base_freq) between "softmax" ones (rope_theta).

`translate(config, weights)` does the same from a config dict and a state dict already in memory
(for example those of a transformers model read from a GGUF file;
`TransformerLM.from_hf_state`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from lit_icl.config import TransformerConfig


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint directory: safetensors (one file or shards) or pytorch_model.bin
    (loaded with weights_only=True)."""
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    if (path / "model.safetensors.index.json").is_file():
        shards = sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
        return {k: t for shard in shards for k, t in load_file(str(path / shard)).items()}
    if (path / "pytorch_model.bin").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither model.safetensors (or its index) nor pytorch_model.bin")


def read_config(path: str | Path) -> dict:
    """config.json of a local Hugging Face directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (a local Hugging Face model directory)")
    return json.loads((path / "config.json").read_text())


def gpt2_config(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a GPT-2 config.json; ValueError for variants it cannot hold."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type={hf.get('model_type')!r}: only GPT-2 checkpoints are supported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={hf['activation_function']!r}; GPT-2 uses gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("attention scaling other than 1/sqrt(head size) is not supported")
    return TransformerConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        block_size=hf["n_positions"], attention="softmax", position="learned", activation="gelu_tanh",
        bias=True, tie_weights=True, dropout=0.0, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp_hidden=hf.get("n_inner") or None,
    )


def gpt2_weights(cfg: TransformerConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """GPT-2 tensor names and layouts -> TransformerLM's."""
    hf = {k.removeprefix("transformer."): t for k, t in hf.items()}
    C = cfg.n_embd
    ours = {"wte.weight": hf["wte.weight"], "wpe.weight": hf["wpe.weight"],
            "ln_f.weight": hf["ln_f.weight"], "ln_f.bias": hf["ln_f.bias"]}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            ours[f"{b}{ln}.weight"], ours[f"{b}{ln}.bias"] = hf[f"{h}{ln}.weight"], hf[f"{h}{ln}.bias"]
        qkv_w, qkv_b = hf[f"{h}attn.c_attn.weight"], hf[f"{h}attn.c_attn.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            ours[f"{b}attn.{name}.weight"] = qkv_w[:, j * C : (j + 1) * C].T
            ours[f"{b}attn.{name}.bias"] = qkv_b[j * C : (j + 1) * C]
        for src, dst in (("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.0"), ("mlp.c_proj", "mlp.2")):
            ours[f"{b}{dst}.weight"] = hf[f"{h}{src}.weight"].T
            ours[f"{b}{dst}.bias"] = hf[f"{h}{src}.bias"]
    return ours


def rope_theta(hf: dict) -> float:
    """The RoPE base of a Llama config: under `rope_parameters` (transformers >= 5) or at the top
    level (older files). ValueError for a rope scaling other than the plain ("default") one."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope_type={kind!r}: only the plain rotary embedding ('default') is supported")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def layer_kinds(hf: dict, n_layer: int) -> tuple[str | list[str], int | None]:
    """(attention, window) of a config's layer_types: "softmax" for full-attention layers,
    "sliding" for sliding-window ones (with the config's sliding_window); ValueError otherwise."""
    types = hf.get("layer_types")
    if not types and hf.get("model_type") == "gemma3_text":  # transformers < 4.53: every pattern-th layer global
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layer)]
    if not types and hf.get("use_sliding_window"):  # Qwen2 before layer_types: the layers from max_window_layers
        start = hf.get("max_window_layers", n_layer)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layer)]
    types = types or ["full_attention"] * n_layer
    kinds = {"full_attention": "softmax", "sliding_attention": "sliding"}
    if len(types) != n_layer or not set(types) <= set(kinds):
        raise ValueError(f"layer_types={types!r}: one of {sorted(kinds)} per layer is supported")
    if "sliding_attention" not in types:
        return "softmax", None
    if not hf.get("sliding_window"):
        raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
    return [kinds[t] for t in types], int(hf["sliding_window"])


def head_size(hf: dict) -> int | None:
    """The config's head_dim, None when it is hidden_size / num_attention_heads."""
    size = hf.get("head_dim")
    return None if size in (None, hf["hidden_size"] // hf["num_attention_heads"]) else int(size)


def llama_config(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a Llama-family config.json (model_type "llama", or "qwen2": Llama
    with biases on the query/key/value projections only, and optional sliding-window layers);
    ValueError for variants it cannot hold."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}; the Llama MLP uses silu")
    qwen2 = hf.get("model_type") == "qwen2"
    if not qwen2 and bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise ValueError("attention_bias and mlp_bias must agree (one `bias` switch)")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or H
    attention, window = layer_kinds(hf, hf["num_hidden_layers"])
    return TransformerConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=H, n_embd=C, head_size=head_size(hf),
        block_size=hf.get("max_position_embeddings", 2048), attention=attention, window=window, position="rope",
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", mlp_hidden=hf["intermediate_size"],
        n_kv_head=None if n_kv == H else n_kv, rope_theta=rope_theta(hf),
        bias=False if qwen2 else bool(hf.get("attention_bias", False)), qkv_bias=True if qwen2 else None,
        tie_weights=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
    )


def gemma3_config(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a Gemma 3 text config.json (model_type "gemma3_text", or "gemma3"
    whose text_config is one): RMSNorm scaled by 1 + w, four norms a block, q/k norms, the
    embedding times sqrt(width), GeGLU (tanh GELU), attention scale query_pre_attn_scalar^-1/2,
    sliding-window layers with rope_local_base_freq and global ones with rope_theta."""
    hf = text_config(hf)
    if hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"hidden_activation={hf['hidden_activation']!r}; Gemma 3 uses gelu_pytorch_tanh")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(name) is not None:
            raise ValueError(f"{name}={hf[name]}: logit soft-capping is not supported")
    if hf.get("use_bidirectional_attention") or hf.get("attention_bias"):
        raise ValueError("bidirectional attention and attention biases are not supported")
    params = hf.get("rope_parameters") or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    for name, p in (("full_attention", full), ("sliding_attention", local)):
        if p.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type={p['rope_type']!r} of {name}: only the plain rotary embedding is supported")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    n_kv, size = hf.get("num_key_value_heads") or H, hf.get("head_dim", 256)
    attention, window = layer_kinds(hf, hf["num_hidden_layers"])
    scalar = hf.get("query_pre_attn_scalar", 256)
    return TransformerConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=H, n_embd=C,
        head_size=None if size == C // H else size, block_size=hf.get("max_position_embeddings", 32768),
        attention=attention, window=window, position="rope", norm="rmsnorm_1p", norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="geglu", activation="gelu_tanh", mlp_hidden=hf["intermediate_size"], n_kv_head=None if n_kv == H else n_kv,
        rope_theta=float(full.get("rope_theta") or hf.get("rope_theta") or 1e6),
        rope_local_theta=float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 1e4),
        qk_norm="rmsnorm", post_norm=True, scale_embedding=True,
        attn_scale=None if scalar == size else float(scalar) ** -0.5, bias=False,
        tie_weights=bool(hf.get("tie_word_embeddings", True)), dropout=0.0,
    )


def text_config(hf: dict) -> dict:
    """A multimodal Gemma 3 config's text_config (model_type "gemma3"), else the config itself."""
    if hf.get("model_type") == "gemma3":
        return {"model_type": "gemma3_text", **hf.get("text_config", {})}
    return hf


def llama_weights(cfg: TransformerConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Llama tensor names -> TransformerLM's (the layouts already agree: nn.Linear [out, in])."""
    hf = {k.removeprefix("model."): t for k, t in hf.items()}
    ours = {"wte.weight": hf["embed_tokens.weight"], "ln_f.weight": hf["norm.weight"]}
    if not cfg.tie_weights:
        if "lm_head.weight" not in hf:
            raise ValueError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
        ours["lm_head.weight"] = hf["lm_head.weight"]
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2"}
    names |= {f"self_attn.{p}_proj": f"attn.{p}_proj" for p in "qkvo"}
    names |= {f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    for i in range(cfg.n_layer):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                if f"layers.{i}.{src}.{kind}" in hf:
                    ours[f"blocks.{i}.{dst}.{kind}"] = hf[f"layers.{i}.{src}.{kind}"]
    return ours


GEMMA3_NORMS = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_attn_out",
                "pre_feedforward_layernorm": "ln_2", "post_feedforward_layernorm": "ln_mlp_out",
                "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}


def gemma3_weights(cfg: TransformerConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Gemma 3 tensor names -> TransformerLM's: Llama's, the four block norms and the q/k norms
    (a multimodal checkpoint's language model only)."""
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if any(k.startswith(prefix) for k in hf):
            hf = {"model." + k[len(prefix):]: t for k, t in hf.items() if k.startswith(prefix)} | (
                {"lm_head.weight": hf["lm_head.weight"]} if "lm_head.weight" in hf else {})
            break
    ours = llama_weights(cfg, {k: t for k, t in hf.items() if "layernorm" not in k and "_norm." not in k})
    hf = {k.removeprefix("model."): t for k, t in hf.items()}
    for i in range(cfg.n_layer):
        for src, dst in GEMMA3_NORMS.items():
            ours[f"blocks.{i}.{dst}.weight"] = hf[f"layers.{i}.{src}.weight"]
    return ours


LOADERS = {"gpt2": (gpt2_config, gpt2_weights), "llama": (llama_config, llama_weights),
           "qwen2": (llama_config, llama_weights), "gemma3_text": (gemma3_config, gemma3_weights),
           "gemma3": (gemma3_config, gemma3_weights)}


def loader(config: dict):
    """(config builder, weight renamer) of the config's model_type; ValueError naming the
    supported ones otherwise."""
    model_type = config.get("model_type")
    if model_type not in LOADERS:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(LOADERS)}")
    return LOADERS[model_type]


def translate(config: dict, weights: Callable[[], dict[str, Tensor]]) -> tuple[TransformerConfig, dict[str, Tensor]]:
    """The TransformerConfig of a Hugging Face config dict and the state dict `weights()` renamed
    to TransformerLM's names (float32, contiguous; a tied head as the embedding). The config is
    checked first, so every config error comes before the (possibly large) weights are read."""
    make_config, rename = loader(config)
    cfg = make_config(config)
    ours = {k: v.float().contiguous() for k, v in rename(cfg, weights()).items()}
    if cfg.tie_weights:
        ours["lm_head.weight"] = ours["wte.weight"]
    return cfg, ours


def read_checkpoint(path: str | Path, gpt2_only: bool = False) -> tuple[TransformerConfig, dict[str, Tensor]]:
    """`translate` of the checkpoint in the local directory `path`; with `gpt2_only`, any other
    model_type is refused (ValueError) before the weights are read."""
    config = read_config(path)
    if gpt2_only:
        gpt2_config(config)  # raises for any other model_type, naming it
        config = {**config, "model_type": "gpt2"}
    return translate(config, lambda: read_weights(Path(path)))
