"""Qwen2-family checkpoints (Qwen2, Qwen2.5): tiny random transformers Qwen2ForCausalLM models
(biases on the query/key/value projections only, tied and untied head, grouped-query, and one
with sliding-window layers), saved with save_pretrained and loaded with TransformerLM.from_hf,
give transformers' logits and greedy tokens; KV-prefix conversion, bake and decoding are exact."""
import copy

import pytest
import torch

from lit_icl import TransformerLM, bake, convert
from lit_icl.generate import generate
from tests.conftest import naive_greedy

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency (pip install -e '.[dev]')")

V = 97
QWENS = {  # name -> Qwen2Config arguments beside the shared tiny sizes
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6),
    "mha-untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=500.0, rms_norm_eps=1e-5),
    "sliding": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=300.0, use_sliding_window=True,
                    sliding_window=6, max_window_layers=1),  # layer 0 full, layer 1 a 6-token window
}


def hf_qwen(name: str, seed: int = 0):
    """A random tiny transformers Qwen2; wide weights (std 0.2), norm weights away from 1 and
    biases away from 0, so that a dropped bias or a swapped norm would show."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                                      **QWENS[name])
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    out = {}
    for name in QWENS:
        path = tmp_path_factory.mktemp(name)
        model = hf_qwen(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", QWENS)
def test_logits_match_transformers(qwen_dirs, name):
    path, ref = qwen_dirs[name]
    model = TransformerLM.from_hf(path)
    cfg = model.config
    assert (cfg.bias, cfg.qkv_bias, cfg.norm, cfg.mlp, cfg.rope_theta) == (False, True, "rmsnorm", "swiglu",
                                                                         QWENS[name]["rope_theta"])
    attn = model.blocks[0].attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None and model.blocks[0].mlp.up_proj.bias is None
    assert cfg.kinds == (("softmax", "sliding") if name == "sliding" else ("softmax",) * 2)
    ids = tokens(3, 40)  # longer than the sliding layer's window
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


@pytest.mark.parametrize("name", QWENS)
def test_greedy_generate_equals_transformers_and_conversion(qwen_dirs, name):
    """Token for token in float64 on inputs with a margin (`naive_greedy`): transformers'
    generate, ours, and ours after converting the demonstrations (longer than the window)."""
    path, ref = qwen_dirs[name]
    model, ref = TransformerLM.from_hf(path).double(), copy.deepcopy(ref).double()
    demo, prompt = tokens(2, 10), tokens(2, 5, seed=2)
    ids = torch.cat([demo, prompt], 1)
    expected = naive_greedy(model, ids, 16)
    theirs = ref.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 15:]
    assert torch.equal(theirs, expected)
    assert torch.equal(generate(model, ids, 16), expected)
    state = convert(model, demo)
    assert torch.equal(generate(model, prompt, 16, state=state), expected)
    prompted = model(ids)[:, 10:]
    torch.testing.assert_close(model(prompt, state=state), prompted, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bake(model, state)(prompt), prompted, rtol=1e-10, atol=1e-10)


def test_a_config_without_layer_types_takes_use_sliding_window(qwen_dirs, tmp_path):
    """Before layer_types, Qwen2's sliding layers were those from max_window_layers on, when
    use_sliding_window was set."""
    import json
    import shutil

    path, ref = qwen_dirs["sliding"]
    older = tmp_path / "older"
    shutil.copytree(path, older)
    hf = json.loads((path / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if k != "layer_types"}))
    model = TransformerLM.from_hf(older)
    assert model.config.kinds == ("softmax", "sliding") and model.config.window == 6
    ids = tokens(2, 30)
    with torch.no_grad():
        theirs = ref(ids).logits
        torch.testing.assert_close(model(ids), theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
