"""A GGUF checkpoint (llama.cpp's format) as a local Hugging Face model directory.

transformers reads GGUF with the ``gguf`` package, dequantizing every tensor to float32
(``from_pretrained(dir, gguf_file=...)``, which also needs ``accelerate``), but refuses to
``save_pretrained`` a model loaded that way. So the model is built from the GGUF's config,
the dequantized tensors are loaded into it (``load_gguf_checkpoint``, the reader
``from_pretrained`` itself uses, undoing llama.cpp's query/key row permutation), and it is saved
as ``config.json`` + ``model.safetensors``, with the tokenizer's ``tokenizer.json`` (readable by
the ``tokenizers`` library alone). Loading that directory takes about a second; the conversion
takes 15-30 s for a 135M-parameter model on a CPU (27.6 s measured for SmolLM2-135M on 2 shared cores).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["convert_gguf"]


def convert_gguf(gguf: str | Path, out: str | Path) -> dict:
    """Write the Hugging Face directory of GGUF file ``gguf`` into ``out``; returns facts about it
    (architecture, parameters, seconds). Needs ``transformers`` and ``gguf``."""
    try:
        from tokenizers import Tokenizer
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as err:
        raise ValueError(f"converting a GGUF checkpoint needs transformers and gguf ({err}); "
                         "pip install 'lit_icl[dev]'") from None
    gguf, out = Path(gguf), Path(out)
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config).float()
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) != tied or unexpected:
        raise ValueError(f"{gguf.name}: tensors missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    Tokenizer.from_file(str(out / "tokenizer.json"))  # the tokenizers library reads it
    saved = json.loads((out / "config.json").read_text())
    return {"architecture": saved.get("architectures"), "model_type": saved.get("model_type"),
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
            "convert_seconds": round(time.perf_counter() - start, 1)}
