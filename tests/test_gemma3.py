"""Gemma 3 checkpoints and sliding-window attention: tiny random transformers Gemma3ForCausalLM
models (head size decoupled from the width, multi-query, q/k norms, four norms a block, local
layers with a short window and their own RoPE base between global ones) give transformers'
logits and greedy tokens; exact conversion through the sliding layers (a constant-size window
state) equals prompting, for contexts longer than the window, incrementally, padded, baked,
saved and loaded, and while decoding; the window op equals its one-query-at-a-time reference."""
import copy
import json

import pytest
import torch

from lit_icl import ContextState, TransformerConfig, TransformerLM, bake, convert
from lit_icl.generate import generate
from lit_icl.ops import sliding_window_attention, sliding_window_reference
from tests.conftest import naive_greedy

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency (pip install -e '.[dev]')")

V = 97
LOCAL, FULL = "sliding_attention", "full_attention"
GEMMAS = {  # name -> Gemma3TextConfig arguments beside the shared tiny sizes
    "mqa-256-like": dict(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                         layer_types=[LOCAL, LOCAL, FULL, LOCAL]),
    "gqa-scalar": dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=24, sliding_window=7,
                       layer_types=[LOCAL, FULL, LOCAL, FULL], tie_word_embeddings=False),
}


def hf_gemma(name: str, seed: int = 0):
    """A random tiny transformers Gemma 3; wide weights (std 0.2) and norm weights w away from 0
    (Gemma scales by 1 + w), so that a missing or swapped norm would show."""
    torch.manual_seed(seed)
    config = transformers.Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                           num_attention_heads=4, max_position_embeddings=96, initializer_range=0.2,
                                           rope_theta=1000.0, rope_local_base_freq=50.0, **GEMMAS[name])
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    out = {}
    for name in GEMMAS:
        path = tmp_path_factory.mktemp(name)
        model = hf_gemma(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def tokens(*shape, seed=1):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", GEMMAS)
def test_logits_match_transformers(gemma_dirs, name):
    path, ref = gemma_dirs[name]
    model = TransformerLM.from_hf(path)
    cfg, args = model.config, GEMMAS[name]
    assert cfg.kinds == tuple("sliding" if t == LOCAL else "softmax" for t in args["layer_types"])
    assert (cfg.window, cfg.head_dim, cfg.rope_theta, cfg.rope_local_theta) == (args["sliding_window"],
                                                                                args["head_dim"], 1000.0, 50.0)
    assert (cfg.norm, cfg.mlp, cfg.qk_norm, cfg.post_norm, cfg.scale_embedding) == ("rmsnorm_1p", "geglu", "rmsnorm",
                                                                                   True, True)
    assert model.blocks[0].attn.q_proj.weight.shape == (4 * args["head_dim"], 32)
    ids = tokens(3, 40)  # several windows long
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_multimodal_config_reads_its_text_tower(gemma_dirs):
    """model_type "gemma3": the text_config and the language model's weights (the vision tower
    and projector, here a stand-in tensor, are left out)."""
    path, ref = gemma_dirs["gqa-scalar"]
    text = json.loads((path / "config.json").read_text())
    weights = {("lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")): t
               for k, t in ref.state_dict().items()}
    weights["model.vision_tower.patch.weight"] = torch.zeros(2)
    model = TransformerLM.from_hf_state({"model_type": "gemma3", "text_config": text}, weights)
    ids = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), TransformerLM.from_hf(path)(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", GEMMAS)
def test_greedy_generate_equals_transformers(gemma_dirs, name):
    """Token for token in float64 on inputs with a margin (`naive_greedy`): transformers'
    generate, ours, and ours after converting demonstrations longer than the window; decoding
    runs past the window too."""
    path, ref = gemma_dirs[name]
    model, ref = TransformerLM.from_hf(path).double(), copy.deepcopy(ref).double()
    demo, prompt = tokens(2, 12), tokens(2, 4, seed=2)
    ids = torch.cat([demo, prompt], 1)
    expected = naive_greedy(model, ids, 14, min_margin=1e-3)  # transformers runs Gemma's norms in float32
    theirs = ref.generate(ids, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 16:]
    assert torch.equal(theirs, expected)
    assert torch.equal(generate(model, ids, 14), expected)
    assert torch.equal(generate(model, prompt, 14, state=convert(model, demo)), expected)


@pytest.mark.parametrize("name", GEMMAS)
def test_conversion_through_sliding_layers_is_exact(gemma_dirs, name, tmp_path):
    model = TransformerLM.from_hf(gemma_dirs[name][0]).double()
    W = model.config.window
    demo, more, query = tokens(2, 3 * W), tokens(2, 2, seed=2), tokens(2, W + 2, seed=3)
    prompted = model(torch.cat([demo, more, query], 1))[:, 3 * W + 2:]
    state = convert(model, demo)
    assert model.modes == ("exact", "prf", "taylor") and state.mode == "exact"  # ICLAA on the global layers only
    taylor = convert(model, demo, mode="taylor")
    assert all(type(t.mixer).__name__ == ("WindowKV" if k == "sliding" else "FeatureSums")
               for t, k in zip(taylor.layers, model.config.kinds))
    local = [i for i, kind in enumerate(model.config.kinds) if kind == "sliding"]
    for i in local:  # constant size: the window's keys, at their absolute positions
        assert state.layers[i].mixer.k.shape[2] == W
        assert state.layers[i].mixer.kv_pos.tolist() == [list(range(2 * W, 3 * W))] * 2
    step = convert(model, more, state=state)
    torch.testing.assert_close(model(query, state=step), prompted, rtol=1e-10, atol=1e-10)
    whole = convert(model, torch.cat([demo, more], 1))
    torch.testing.assert_close(bake(model, whole)(query), prompted, rtol=1e-10, atol=1e-10)
    whole.save(tmp_path / "ctx.safetensors", model)
    loaded = ContextState.load(tmp_path / "ctx.safetensors", model)
    torch.testing.assert_close(model(query, state=loaded), prompted, rtol=1e-10, atol=1e-10)
    mask = torch.ones(2, 3 * W + 2, dtype=torch.long)
    mask[1, :W + 1] = 0  # row 1: a shorter, left-padded context continues at its own offset
    padded = convert(model, torch.cat([demo, more], 1), attention_mask=mask)
    alone = model(torch.cat([demo[1:, W + 1:], more[1:], query[1:]], 1))[:, 2 * W + 1:]
    torch.testing.assert_close(model(query, state=padded)[1:], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [1, 3, 50])
def test_sliding_window_op_equals_reference(window):
    """The masked op against the one-query-at-a-time reference: a prefix with empty slots and
    its own positions, a padded input, grouped-query heads, a scale other than 1/sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, P, D = 2, 4, 2, 6, 4, 5
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    pk, pv = (torch.randn(B, Hkv, P, D, generator=g, dtype=torch.float64) for _ in range(2))
    pmask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    ppos = torch.tensor([[0, 7, 8, 9], [6, 7, 8, 9]])
    mask = torch.tensor([[True] * T, [False, True, True, False, True, True]])
    positions = 10 + (mask.long().cumsum(1) - 1).clamp(min=0)
    args = (q, k, v, positions, window, pk, pv, pmask, ppos, mask, 0.7)
    torch.testing.assert_close(sliding_window_attention(*args), sliding_window_reference(*args), rtol=1e-10, atol=1e-10)
    plain = (q, k, v, positions[:1].expand(B, T), window)
    torch.testing.assert_close(sliding_window_attention(*plain), sliding_window_reference(*plain),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kw, message",
    [(dict(window=4), "window=4 applies to attention='sliding' layers only"),
     (dict(attention="sliding", window=0), "window=0 must be a positive integer"),
     (dict(attention="linear", head_size=16), "head_size=16 .* needs attention in"),
     (dict(head_size=0), "head_size=0 must be a positive integer"),
     (dict(qkv_bias="yes"), "qkv_bias='yes' must be True or False"),
     (dict(post_norm=None), "post_norm=None must be True or False"),
     (dict(attn_scale=-1.0), "attn_scale=-1.0 must be a positive number or None"),
     (dict(rope_local_theta=0), "rope_local_theta=0 must be a positive number or None"),
     (dict(attention="linear", qk_norm="rmsnorm"), r"qk_norm='rmsnorm' applies to .*attention='linear'"),
     (dict(attention=["softmax", "gla"], n_layer=2, qk_norm="rmsnorm"), "not available for gla attention"),
     (dict(norm="gemma"), "norm='gemma'; allowed: .*rmsnorm_1p"), (dict(mlp="reglu"), "mlp='reglu'; allowed")],
)
def test_new_config_fields_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(vocab_size=V, n_head=4, n_embd=32, attention=kw.pop("attention", "softmax"), **kw)


def test_configs_without_the_new_fields_build_the_same_model():
    """Defaults reproduce the model before these fields: same parameter names and shapes."""
    cfg = TransformerConfig(vocab_size=V, n_head=4, n_embd=32, attention="softmax")
    model = TransformerLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["blocks.0.attn.q_proj.weight"] == (32, 32) and "blocks.0.attn.q_proj.bias" in shapes
    assert not any("norm" in n or "_out" in n for n in shapes)


def test_approximate_modes_use_the_attention_scale():
    """ICLAA's Taylor context on a model whose attn_scale is not 1/sqrt(d) equals it on the same
    model with that scale folded into the query weights (and attn_scale unset)."""
    import dataclasses

    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=16, attention="softmax", position="rope",
                            attn_scale=0.1)
    scaled = TransformerLM(cfg).double().eval()
    folded = TransformerLM(dataclasses.replace(cfg, attn_scale=None)).double().eval()
    weights = scaled.state_dict()
    for i in range(2):
        weights[f"blocks.{i}.attn.q_proj.weight"] = weights[f"blocks.{i}.attn.q_proj.weight"] * 0.1 * 8 ** 0.5
        weights[f"blocks.{i}.attn.q_proj.bias"] = weights[f"blocks.{i}.attn.q_proj.bias"] * 0.1 * 8 ** 0.5
    folded.load_state_dict(weights)
    demo, query = tokens(2, 9), tokens(2, 4, seed=2)
    torch.testing.assert_close(scaled(torch.cat([demo, query], 1)), folded(torch.cat([demo, query], 1)))
    for mode in ("taylor", "prf"):
        a = scaled(query, state=convert(scaled, demo, mode=mode, num_features=16))
        b = folded(query, state=convert(folded, demo, mode=mode, num_features=16))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_configs_written_before_layer_types(gemma_dirs, tmp_path):
    """transformers < 4.53 wrote sliding_window_pattern (every pattern-th layer global) and the
    rotary bases at the top level instead of layer_types and rope_parameters."""
    import shutil

    path, ref = gemma_dirs["gqa-scalar"]  # layers local, global, local, global: pattern 2
    older = tmp_path / "older"
    shutil.copytree(path, older)
    hf = json.loads((path / "config.json").read_text())
    hf = {k: v for k, v in hf.items() if k not in ("layer_types", "rope_parameters")}
    (older / "config.json").write_text(json.dumps(hf | dict(sliding_window_pattern=2, rope_theta=1000.0,
                                                            rope_local_base_freq=50.0)))
    model = TransformerLM.from_hf(older)
    assert model.config.kinds == ("sliding", "softmax") * 2 and model.config.rope_local_theta == 50.0
    ids = tokens(2, 30)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, rtol=1e-4, atol=1e-4 * ref(ids).logits.abs().max().item())
