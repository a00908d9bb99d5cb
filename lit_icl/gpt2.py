"""Load a local Hugging Face GPT-2 directory into a softmax TransformerLM (no download).

GPT-2 is a pre-LayerNorm decoder with learned positions, tanh-GELU, biases everywhere and a
tied output head: exactly TransformerLM(attention="softmax", position="learned",
activation="gelu_tanh"). Its Conv1D layers store weights as [in, out] (nn.Linear's transpose),
and c_attn fuses the query, key and value projections.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lit_icl.model import TransformerConfig, TransformerLM


def _read_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def gpt2_config(hf: dict) -> TransformerConfig:
    """The TransformerConfig of a GPT-2 config.json; ValueError for variants it cannot hold."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type={hf.get('model_type')!r}: only GPT-2 checkpoints are supported")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function={hf['activation_function']!r}; GPT-2 uses gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("attention scaling other than 1/sqrt(head size) is not supported")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ValueError(f"layer_norm_epsilon={hf['layer_norm_epsilon']}; TransformerLM uses 1e-5")
    return TransformerConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        block_size=hf["n_positions"], attention="softmax", position="learned", activation="gelu_tanh",
        bias=True, tie_weights=True, dropout=0.0,
    )


def from_hf_gpt2(path: str | Path) -> TransformerLM:
    """TransformerLM with the weights of the GPT-2 in `path` (config.json + weights)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (a local Hugging Face GPT-2 directory)")
    cfg = gpt2_config(json.loads((path / "config.json").read_text()))
    hf = {k.removeprefix("transformer."): t for k, t in _read_weights(path).items()}
    C = cfg.n_embd
    ours: dict[str, Tensor] = {"wte.weight": hf["wte.weight"], "wpe.weight": hf["wpe.weight"],
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
    model = TransformerLM(cfg)
    ours["lm_head.weight"] = ours["wte.weight"]
    model.load_state_dict({k: v.float().contiguous() for k, v in ours.items()}, strict=True)
    return model.eval()
