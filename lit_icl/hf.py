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


def llama_config(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a Llama-family config.json; ValueError for variants it cannot hold."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r}; the Llama MLP uses silu")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise ValueError("attention_bias and mlp_bias must agree (one `bias` switch)")
    C, H = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, C // H):
        raise ValueError(f"head_dim={hf['head_dim']}; only hidden_size / num_attention_heads = {C // H} is supported")
    n_kv = hf.get("num_key_value_heads") or H
    return TransformerConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=H, n_embd=C,
        block_size=hf.get("max_position_embeddings", 2048), attention="softmax", position="rope",
        norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", mlp_hidden=hf["intermediate_size"],
        n_kv_head=None if n_kv == H else n_kv, rope_theta=rope_theta(hf), bias=bool(hf.get("attention_bias", False)),
        tie_weights=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
    )


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


LOADERS = {"gpt2": (gpt2_config, gpt2_weights), "llama": (llama_config, llama_weights)}


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
